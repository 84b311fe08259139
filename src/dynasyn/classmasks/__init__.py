"""Masks from class names: a scene from a photo and its subjects' class nouns.

:func:`class_masks` is the default method (no extra model): the scene's own diffusion model
looks at the photo (:mod:`.capture`: the order of the names chosen by the model's denoising
error, then the class words' cross-attention at a few noise levels) and :mod:`.segment` turns
the maps into disjoint masks that follow the photo's edges. :func:`write_mask_scene` writes a
scene directory (``dynasyn masks``), with an overlay preview and a record of how the masks
were made. The optional detector + SAM segmenter is :mod:`.detect`. Measured on the micro world
in docs/masks.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dynasyn.classmasks.segment import ClassNotFound, Segmentation, SegmentParams, assign
from dynasyn.errors import InputError

__all__ = [
    "ClassNotFound",
    "MaskParams",
    "MaskResult",
    "check_classes",
    "class_masks",
    "overlay",
    "write_mask_scene",
]

RECORD = "masks.json"
"""The record of how a scene's masks were made (inside the scene directory)."""

MAX_WORK_SIDE = 512
"""Masks are computed on the photo downscaled to at most this side, then resized back."""

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)], np.uint8)


@dataclass(frozen=True)
class MaskParams:
    """Knobs of the default method: capture (timesteps, noise) and :class:`SegmentParams`."""

    timesteps: tuple[int, ...] = (500, 600, 700)
    order_timesteps: tuple[int, ...] = (200, 400, 600)
    order_draws: int = 4
    seed: int = 0
    segment: SegmentParams = field(default_factory=SegmentParams)


@dataclass
class MaskResult:
    """Masks at the photo's size (bool, one per class, disjoint) and how they were made."""

    masks: list[np.ndarray]
    maps: np.ndarray
    record: dict


def check_classes(classes: Sequence[str]) -> list[str]:
    """The class nouns, refusing none, blanks and duplicates (one line each)."""
    out = [str(c).strip() for c in classes or ()]
    if not out:
        raise InputError("no classes given: pass one class noun per subject, e.g. --classes bear bowl")
    if any(not c for c in out):
        raise InputError("a class noun is empty; pass one noun per subject, e.g. --classes bear bowl")
    seen = {c.lower() for c in out}
    if len(seen) != len(out):
        raise InputError(f"classes {' '.join(out)} name a class twice; masks from class names need "
                         "distinct nouns (e.g. 'red ball' and 'blue ball' are not supported)")
    return out


def _work_image(image: Image.Image) -> np.ndarray:
    w, h = image.size
    scale = min(1.0, MAX_WORK_SIDE / max(w, h))
    if scale < 1.0:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"))


def _to_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        size, Image.Resampling.BILINEAR)) >= 128


def class_masks(
    pipe,
    image: Image.Image,
    classes: Sequence[str],
    params: MaskParams = MaskParams(),
) -> MaskResult:
    """One mask per class noun for ``image``, from ``pipe``'s own attention (no extra model).

    Raises:
        ClassNotFound: a class's map is flat or swallowed by another (``.maps`` holds the
            maps at the working size for inspection).
    """
    import torch

    from dynasyn.classmasks.capture import (
        all_orders,
        encode_photo,
        order_losses,
        photo_attention,
    )

    classes = check_classes(classes)
    image = image.convert("RGB")
    with torch.no_grad():
        latent = encode_photo(pipe, image)
        orders = all_orders(len(classes))
        losses = order_losses(pipe, latent, classes, orders, params.order_timesteps,
                              params.order_draws, params.seed)
        best = orders[int(np.argmin(losses))]
        att = photo_attention(pipe, latent, classes, [best], params.timesteps, params.seed)
    work = _work_image(image)
    seg: Segmentation = assign(work, att.cross, att.affinity, params.segment, classes)
    masks = [_to_size(m, image.size) for m in seg.masks]
    record = {
        "method": "attention",
        "classes": classes,
        "prompt": att.prompts[0],
        "order_losses": {" / ".join(classes[i] for i in o): float(v)
                         for o, v in zip(orders, losses, strict=True)},
        "params": asdict(params),
        "mask_pixels": [int(m.sum()) for m in masks],
    }
    return MaskResult(masks, seg.maps, record)


def overlay(image: Image.Image, masks: Sequence[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """The photo with each mask tinted in its own colour (mask order: red, green, blue, ...)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    for i, m in enumerate(masks):
        c = PALETTE[i % len(PALETTE)].astype(np.float32)
        m = np.asarray(m, bool)
        a[m] = (1 - alpha) * a[m] + alpha * c
    return Image.fromarray(a.round().astype(np.uint8))


def maps_image(maps: np.ndarray, names: Sequence[str] | None = None) -> Image.Image:
    """The class maps side by side as grey images (for inspection)."""
    tiles = [np.asarray(Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8))) for m in maps]
    return Image.fromarray(np.concatenate(tiles, axis=1)).convert("RGB")


def save_maps(dest: str | Path, image: Image.Image, maps: np.ndarray, classes: Sequence[str],
              record: dict | None = None) -> Path:
    """Write ``maps.png`` (photo + one grey map per class), ``maps.npz`` and a note into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    h, w = maps.shape[1:]
    photo = np.asarray(image.convert("RGB").resize((w, h)))
    strip = np.concatenate([photo, np.asarray(maps_image(maps))], axis=1)
    Image.fromarray(strip).save(dest / "maps.png")
    np.savez_compressed(dest / "maps.npz", maps=maps.astype(np.float16),
                        classes=np.array(list(classes)))
    if record is not None:
        (dest / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return dest


def write_mask_scene(
    out: str | Path,
    image: Image.Image,
    classes: Sequence[str],
    result: MaskResult,
    *,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a scene directory (``img.png``, ``mask{i}.png``, ``scene.json`` via
    :func:`dynasyn.scene.save_scene`) plus ``overlay.png``, ``maps.png`` / ``maps.npz`` and
    ``masks.json`` (how the masks were made)."""
    from dynasyn.scene import save_scene

    out = Path(out)
    save_scene(out, image, result.masks, classes, overwrite=overwrite)
    overlay(image, result.masks).save(out / "overlay.png")
    record = dict(result.record, source=source)
    save_maps(out, image, result.maps, classes, record)
    return out
