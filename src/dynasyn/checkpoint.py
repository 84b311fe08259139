"""Resumable checkpoints in safetensors only (weights *and* optimizer state; no pickle).

A checkpoint is a directory ``checkpoints/step-NNNNNN/`` written under a temporary name and
renamed when complete, so a run killed while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dynasyn.atomic import atomic_dir

STATE = "state.json"


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON metadata.

    A state entry that is itself a dict (bitsandbytes' 8-bit optimizers keep their quantized
    states under one) is split the same way, its keys joined with ``/``.
    """
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}

    def split(idx, prefix: str, st: dict) -> None:
        for k, v in st.items():
            key = f"{prefix}{k}"
            if torch.is_tensor(v):
                tensors[f"{idx}.{key}"] = v.detach().cpu().contiguous().clone()
            elif isinstance(v, dict):
                split(idx, f"{key}/", v)
            else:
                scalars.setdefault(str(idx), {})[key] = v

    for idx, st in sd["state"].items():
        split(idx, "", st)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}

    def put(idx: int, key: str, v) -> None:
        d = state.setdefault(idx, {})
        *path, last = key.split("/")
        for part in path:
            d = d.setdefault(part, {})
        d[last] = v

    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        put(int(idx), k, v)
    for idx, sc in meta.get("scalars", {}).items():
        for k, v in sc.items():
            put(int(idx), k, v)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(
    root: Path,
    name: str,
    weights: dict[str, dict[str, torch.Tensor]],
    opt: torch.optim.Optimizer,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write ``root/name`` atomically: one safetensors file per weight group + optimizer + state;
    keep the newest ``keep`` checkpoints (all when ``keep`` <= 0)."""

    def write(tmp: Path) -> None:
        for group, tensors in weights.items():
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                      str(tmp / f"{group}.safetensors"))
        opt_tensors, opt_meta = optimizer_tensors(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / STATE).write_text(json.dumps({**state, "optimizer": opt_meta,
                                             "weights": sorted(weights)}))

    root.mkdir(parents=True, exist_ok=True)
    final = atomic_dir(root / name, write)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE).is_file())


def read_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(state, weight groups, optimizer tensors) of a checkpoint directory."""
    state = json.loads((path / STATE).read_text())
    weights = {g: load_file(str(path / f"{g}.safetensors")) for g in state["weights"]}
    return state, weights, load_file(str(path / "optimizer.safetensors"))
