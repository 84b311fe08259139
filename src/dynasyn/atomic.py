"""Atomic writes: a file or directory appears complete under its name, or not at all.

Each helper writes under a temporary name beside the target and renames it into place, so a
reader (or a run killed mid-write and resumed) never sees half a file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["atomic_dir", "atomic_file", "replace_dir", "save_tensors"]


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds
    (it is removed when the block fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file atomically."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))


def atomic_dir(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Fill a directory with ``write(tmp)`` under a temporary name, then swap it in for
    ``path`` (a previous ``path`` is replaced); returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing any previous ``final``.

    Two renames: a reader sees the old directory, none, or the new one — never half of one.
    """
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
