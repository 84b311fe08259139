"""The low-VRAM recipe (``low_vram: true``): a profile of config values, and the 8-bit Adam.

``low_vram`` is not a mode of the trainer: it sets other config keys, each of which works on
its own, and a value given explicitly (config file, ``--set``, ``--lora-rank``) wins over the
profile. The resolved values are what ``RUN/config.yaml`` records. What each key saves is in
docs/low-vram.md; ``dynasyn train --estimate-memory`` computes it for a configured run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("dynasyn")

LOW_VRAM_LORA_RANK = 16
"""The LoRA rank ``low_vram`` gives phase 2 when no rank is set."""

PROFILE_KEYS = ("lora_rank", "gradient_checkpointing", "use_8bit_adam", "mixed_precision",
                "prior_dtype", "efficient")
"""The config keys the profile sets (the attention processors are set by the trainer)."""


def on_cuda(device: str) -> bool:
    """Whether a run with config ``device`` trains on a CUDA device."""
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def low_vram_profile(cuda: bool, bf16: bool = True) -> dict[str, Any]:
    """The values ``low_vram: true`` gives (before explicit values override them).

    LoRA in phase 2 (rank :data:`LOW_VRAM_LORA_RANK`: no gradients or optimizer state for
    the UNet and text encoder, no frozen copy of them), gradient checkpointing, 8-bit Adam,
    mixed precision on CUDA (bf16 where the card has it, else fp16; ``no`` elsewhere), the
    frozen prior stored in the mixed-precision dtype (``prior_dtype: auto``, exact under
    autocast) and the scene's latents encoded once (``efficient``).
    """
    mixed = ("bf16" if bf16 else "fp16") if cuda else "no"
    return dict(lora_rank=LOW_VRAM_LORA_RANK, gradient_checkpointing=True, use_8bit_adam=True,
                mixed_precision=mixed, prior_dtype="auto", efficient=True)


def apply_low_vram(values: dict[str, Any], explicit: set[str],
                   assume_cuda: bool | None = None) -> dict[str, Any]:
    """``values`` with the low-VRAM profile filled in where ``low_vram`` is on and a key is
    not in ``explicit``. ``assume_cuda`` (None: look at ``device`` and the machine) decides
    the mixed precision; the estimate of GPU memory assumes a CUDA device."""
    low = values.get("low_vram", False)
    if isinstance(low, str):
        low = low.lower() in ("1", "true", "yes", "on")
    if not low:
        return values
    device = str(values.get("device", "auto"))
    cuda = on_cuda(device) if assume_cuda is None else assume_cuda
    bf16 = True
    if cuda and assume_cuda is None and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
    profile = low_vram_profile(cuda, bf16)
    out = dict(values)
    out.update({k: v for k, v in profile.items() if k not in explicit})
    return out


def _runs_on(cls: type, device: torch.device) -> bool:
    """Whether a bitsandbytes 8-bit optimizer steps on ``device`` (newer releases have CPU
    kernels): one step on a parameter large enough to get 8-bit states (4096 elements)."""
    try:
        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        opt = cls([p], lr=1e-3)
        opt.step()
        return opt.state[p]["state1"].dtype == torch.uint8
    except Exception:  # noqa: BLE001 - any failure means: not on this device
        return False


def optimizer_class(optimizer: str, use_8bit: bool, device: torch.device,
                    warned: list[bool] | None = None) -> type[torch.optim.Optimizer]:
    """Adam / AdamW (``optimizer``), in bitsandbytes' 8-bit version when ``use_8bit`` and
    possible: it needs the ``lowvram`` extra and a CUDA device, or a bitsandbytes with CPU
    kernels for a CPU run (probed with one step); otherwise one warning line (once per
    ``warned`` list) and the plain optimizer."""
    plain = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    if not use_8bit:
        return plain
    name = "AdamW" if optimizer == "adamw" else "Adam"
    reason = None
    try:
        import bitsandbytes as bnb
    except ImportError:
        reason = "bitsandbytes is not installed (pip install 'dynasyn[lowvram]')"
    else:
        cls = bnb.optim.AdamW8bit if optimizer == "adamw" else bnb.optim.Adam8bit
        if device.type != "cuda" and not _runs_on(cls, device):
            reason = (f"this bitsandbytes has no 8-bit {name} for {device.type} (a CUDA device, "
                      "or bitsandbytes >= 0.50 on CPU)")
    if reason is None:
        return cls
    if warned is None or not warned[0]:
        log.warning("use_8bit_adam: %s; training with plain %s", reason, name)
        if warned is not None:
            warned[0] = True
    return plain
