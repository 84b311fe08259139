"""The official DynamicID checkpoint layout (SD 1.5): read, load into our processors, write.

The official ``SAA.bin`` is a ``torch.save`` of ``{"SAA_module": ..., "proj_module": ...}``
(training checkpoints: ``"adapter_modules"`` instead of ``"SAA_module"``). ``SAA_module`` is
the state dict of ``torch.nn.ModuleList(unet.attn_processors.values())``: keys
``"<i>.<parameter>"`` where ``i`` is the processor's position in ``unet.attn_processors``
(self-attention processors: LoRA only; cross-attention: LoRA + ``to_k_ip`` / ``to_v_ip``)::

    0.to_q_lora.down.weight  0.to_q_lora.up.weight  ...  0.to_out_lora.up.weight
    1.to_q_lora.down.weight  ...  1.to_k_ip.weight  1.to_v_ip.weight
    ...

The LoRA rank is read from the ``down`` weights (the released checkpoints use 128; our default
is 4). ``proj_module`` is the resampler (:class:`~dynasyn.dynamicid.encoder.Resampler` has its
layout). A ``.bin`` / ``.pt`` is read with ``torch.load(weights_only=True)`` (plain tensors
only, never a pickle of objects); a ``.safetensors`` holds the same tensors flat, prefixed
``SAA_module.`` / ``proj_module.`` (or unprefixed processor keys).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dynasyn.dynamicid.saa import SAAContext, adapter_processors, get_context, install_saa
from dynasyn.errors import InputError

__all__ = [
    "load_official",
    "official_state_dict",
    "read_official",
    "save_official",
]

_SAA_KEYS = ("SAA_module", "adapter_modules")
_PROJ_KEY = "proj_module"
_INDEX_RE = re.compile(r"^(\d+)\.(.+)$")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(SAA weights keyed ``"<i>.<param>"``, ``proj_module`` weights) of an official checkpoint.

    Raises InputError for a missing or unreadable file, or one without SAA weights.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"DynamicID checkpoint {path} does not exist; check the path")
    try:
        if path.suffix == ".safetensors":
            flat = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict")
            flat = _flatten(obj)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read DynamicID checkpoint {path} ({first}); pass an official "
                         "SAA .bin / .safetensors") from None
    saa: dict[str, torch.Tensor] = {}
    proj: dict[str, torch.Tensor] = {}
    for k, v in flat.items():
        head, _, rest = k.partition(".")
        if head in _SAA_KEYS:
            saa[rest] = v
        elif head == _PROJ_KEY:
            proj[rest] = v
        elif _INDEX_RE.match(k):
            saa[k] = v
    if not saa:
        raise InputError(f"{path} has no SAA weights (no SAA_module / adapter_modules, no "
                         "'<i>.to_q_lora...' keys); it is not a DynamicID checkpoint")
    return saa, proj


def _rank(saa: dict[str, torch.Tensor], path: object) -> int:
    for k, v in saa.items():
        if k.endswith("to_q_lora.down.weight"):
            return int(v.shape[0])
    raise InputError(f"{path}: no to_q_lora.down.weight in the SAA weights; not the official layout")


def load_official(unet: nn.Module, path: str | Path, num_tokens: int = 4,
                  network_alpha: float | None = None) -> tuple[SAAContext, dict[str, torch.Tensor]]:
    """Install SAA on ``unet`` with the official checkpoint's weights (its LoRA rank); return
    the context and the checkpoint's ``proj_module`` weights (empty when absent).

    Raises InputError (one line) when the checkpoint does not match the UNet: another number
    of attention processors, a missing key, or a shape that differs (e.g. SD 2.x weights on an
    SD 1.5 UNet).
    """
    saa, proj = read_official(path)
    rank = _rank(saa, path)
    names = list(unet.attn_processors)
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in saa.items():
        m = _INDEX_RE.match(k)
        if m is None:
            raise InputError(f"{path}: SAA key {k!r} is not '<processor index>.<parameter>'")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if max(by_index) >= len(names) or len(by_index) != len(names):
        raise InputError(
            f"weights layout does not match the model: {path} has weights for "
            f"{len(by_index)} attention processors (up to index {max(by_index)}), the UNet has "
            f"{len(names)}; use the base model the checkpoint was trained for (SD 1.5)"
        )
    ctx = install_saa(unet, rank=rank, num_tokens=num_tokens, network_alpha=network_alpha,
                      context=getattr(unet, "_saa_context", None))
    procs = adapter_processors(unet)
    for i, name in enumerate(names):
        proc = procs.get(name)
        got = by_index.get(i, {})
        if proc is None:
            raise InputError(f"weights layout does not match the model: {name} has no adapter")
        own = proc.state_dict()
        for key in own:
            if key not in got:
                raise InputError(f"weights layout does not match the model: {path} has no "
                                 f"{i}.{key} (for {name}); a self-/cross-attention mismatch")
            if tuple(got[key].shape) != tuple(own[key].shape):
                raise InputError(
                    f"weights layout does not match the model: {path} {i}.{key} has shape "
                    f"{tuple(got[key].shape)}, {name} needs {tuple(own[key].shape)}; use the "
                    "base model the checkpoint was trained for (SD 1.5)")
        extra = sorted(set(got) - set(own))
        if extra:
            raise InputError(f"weights layout does not match the model: {path} has "
                             f"{i}.{extra[0]}, which {name} does not have")
        ref = next(iter(own.values()))
        proc.load_state_dict({k: v.to(ref.dtype) for k, v in got.items()})
    return ctx, proj


def official_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The installed adapter in the official layout: ``"<i>.<param>"`` over
    ``unet.attn_processors`` (every processor must be an adapter processor)."""
    get_context(unet)
    procs = adapter_processors(unet)
    out: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(unet.attn_processors.items()):
        if name not in procs:
            raise ValueError(f"{name} has no adapter; the official layout needs one everywhere")
        for k, v in p.state_dict().items():
            out[f"{i}.{k}"] = v
    return out


def save_official(unet: nn.Module, path: str | Path,
                  proj_module: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the installed adapter in the official layout: ``.bin`` / ``.pt`` as
    ``torch.save({"SAA_module": ..., "proj_module": ...})``, ``.safetensors`` flat with the
    ``SAA_module.`` / ``proj_module.`` prefixes."""
    path = Path(path)
    saa = {k: v.detach().cpu().contiguous() for k, v in official_state_dict(unet).items()}
    proj = {k: v.detach().cpu().contiguous() for k, v in (proj_module or {}).items()}
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        flat = {f"SAA_module.{k}": v for k, v in saa.items()}
        flat.update({f"proj_module.{k}": v for k, v in proj.items()})
        save_file(flat, str(tmp))
    else:
        torch.save({"SAA_module": saa, "proj_module": proj}, str(tmp))
    tmp.replace(path)
    return path
