"""DynamicID weights directory: SAA + ID encoder (+ IMR), fp16 safetensors and one JSON file.

Layout::

    DIR/dynamicid.json       format, version, sizes, the UNet's processor names, configs
    DIR/saa.safetensors      "<processor name>.<parameter>" (dynasyn.dynamicid.saa_state_dict)
    DIR/encoder.safetensors  the IDEncoder's state dict ("vision.*", "resampler.*")
    DIR/imr.safetensors      the IMR's state dict (absent after the anchoring stage alone)

Written into a temporary directory and renamed into place, so a reader sees the old directory,
none, or the new one. :func:`read_weights` checks the files; :func:`check_layout` checks that
they fit a UNet and raises InputError (one line) when they do not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dynasyn.atomic import replace_dir
from dynasyn.errors import InputError

__all__ = [
    "CONFIG",
    "FORMAT",
    "Weights",
    "check_layout",
    "read_weights",
    "save_weights",
    "weights_bytes",
]

FORMAT = "dynasyn-dynamicid"
VERSION = 1
CONFIG = "dynamicid.json"


@dataclass
class Weights:
    """A read weights directory."""

    path: Path
    config: dict[str, Any]
    saa: dict[str, torch.Tensor]
    encoder: dict[str, torch.Tensor]
    imr: dict[str, torch.Tensor] | None


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point()
                else v.detach().cpu()).contiguous() for k, v in sd.items()}


def save_weights(out: str | Path, *, unet: nn.Module, encoder: nn.Module,
                 imr: nn.Module | None = None, extra: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the adapter of ``unet``, ``encoder`` and ``imr`` to the directory ``out``
    (replacing it). ``dtype`` (fp16 by default; None keeps fp32) applies to floating tensors."""
    from dynasyn.dynamicid.saa import adapter_processors, get_context, saa_state_dict

    ctx = get_context(unet)
    procs = adapter_processors(unet)
    first = next(iter(procs.values()))
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "num_tokens": ctx.num_tokens,
        "lora_rank": first.to_q_lora.rank,
        "network_alpha": first.to_q_lora.network_alpha,
        "cross_attention_dim": int(unet.config.cross_attention_dim),
        "processors": list(procs),
        "encoder": encoder.config_dict(),
        "imr": imr.config_dict() if imr is not None else None,
        **(extra or {}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_file(_cast(saa_state_dict(unet), dtype), str(tmp / "saa.safetensors"))
        save_file(_cast(encoder.state_dict(), dtype), str(tmp / "encoder.safetensors"))
        if imr is not None:
            save_file(_cast(imr.state_dict(), dtype), str(tmp / "imr.safetensors"))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        um = _umask()
        tmp.chmod(0o777 & ~um)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~um)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def read_weights(path: str | Path) -> Weights:
    """Read a weights directory (fp16 tensors are returned as stored).

    Raises InputError when ``path`` is not a DynamicID weights directory or a file is missing
    or unreadable.
    """
    path = Path(path)
    cfg_file = path / CONFIG
    if not path.is_dir() or not cfg_file.is_file():
        raise InputError(
            f"{path} is not a DynamicID weights directory (no {CONFIG}); pass the --out "
            "directory of `python -m dynasyn.dynamicid.train`"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_file} is not readable JSON ({e}); retrain or restore it") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise InputError(f"{cfg_file} is not {FORMAT} version {VERSION}; retrain the weights")
    parts: dict[str, dict[str, torch.Tensor] | None] = {}
    for name in ("saa", "encoder", "imr"):
        f = path / f"{name}.safetensors"
        if not f.is_file():
            if name == "imr" and config.get("imr") is None:
                parts[name] = None
                continue
            raise InputError(f"{path} has no {f.name}; the weights directory is incomplete")
        try:
            parts[name] = load_file(str(f))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read {f} ({type(e).__name__}); retrain the weights") from None
    return Weights(path, config, parts["saa"] or {}, parts["encoder"] or {}, parts["imr"])


def check_layout(weights: Weights, unet: nn.Module) -> None:
    """Refuse weights trained for another UNet: one line naming the difference."""
    cfg = weights.config
    want = int(unet.config.cross_attention_dim)
    if int(cfg["cross_attention_dim"]) != want:
        raise InputError(
            f"weights layout does not match the model: {weights.path} was trained for a UNet "
            f"with cross_attention_dim {cfg['cross_attention_dim']}, this one has {want}; pass "
            "the --model the weights were trained with"
        )
    names = set(unet.attn_processors)
    have = set(cfg["processors"])
    unknown = sorted(have - names)
    missing = sorted(n for n in names - have if ".attn2." in n)
    if unknown or missing:
        what = (f"has weights for {unknown[0]}, which the UNet does not have" if unknown
                else f"has no weights for the UNet's {missing[0]}")
        raise InputError(f"weights layout does not match the model: {weights.path} {what}; "
                         "pass the --model the weights were trained with")


def weights_bytes(path: str | Path) -> int:
    """Total size of the files of a weights directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
