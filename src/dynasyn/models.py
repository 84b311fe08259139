"""Load any diffusers Stable Diffusion pipeline (hub id, local directory, or the bundled micro model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dynasyn.errors import InputError

MICRO_NAMES = ("micro",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def quiet_libraries() -> None:
    """Silence the transformers/diffusers chatter that is not for our users."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def micro_model_path() -> Path:
    """Directory of the bundled micro Stable Diffusion (diffusers format)."""
    return Path(__file__).parent / "micro" / "weights" / "sd"


def resolve_model(model: str) -> str:
    """A local directory, the bundled micro model, or a hub id; refuse paths that do not exist."""
    if model in MICRO_NAMES:
        p = micro_model_path()
        if not (p / "model_index.json").exists():
            raise InputError(
                "the bundled micro model is not installed; build it with "
                "`python -m dynasyn.micro.train` or pass --model PATH_OR_HUB_ID"
            )
        return str(p)
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").exists():
            raise InputError(
                f"model directory {p} has no model_index.json; "
                "pass a diffusers Stable Diffusion pipeline directory"
            )
        return str(p)
    if p.exists() or not _HUB_ID.match(model):
        raise InputError(
            f"model {model!r} is not a local pipeline directory nor a hub id (owner/name); "
            "check the path"
        )
    return model


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def pipeline_class(path: str):
    """``StableDiffusionXLPipeline`` when the model's ``model_index.json`` names an SDXL
    pipeline, else ``StableDiffusionPipeline``."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        name = DiffusionPipeline.load_config(path).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    return StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """Load a StableDiffusionPipeline (SD 1.x / 2.x layouts, epsilon or v-prediction) or a
    StableDiffusionXLPipeline (SDXL: two text encoders), as the model's index names."""
    quiet_libraries()
    path = resolve_model(model)
    cls = pipeline_class(path)
    extra = {} if "XL" in cls.__name__ else dict(safety_checker=None,
                                                 requires_safety_checker=False)
    try:
        return cls.from_pretrained(path, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"could not load model {model!r} ({first}); pass a local diffusers directory "
            "or a reachable hub id"
        ) from None
