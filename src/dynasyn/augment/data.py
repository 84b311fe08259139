"""The augmented directory format (docs/formats.md): ``NNNN.png``, ``NNNN_mask{i}.png``, ``prompts.jsonl``.

Each ``prompts.jsonl`` record: ``id`` ("0000"), ``template`` ("{0} is throwing {1}"),
``subjects`` ([0, 1]: slot j is subject ``subjects[j]``), the renderings ``phrase_prompt``,
``class_prompt``, ``placeholder_prompt``, ``seed``, and optional intermediate file names.
Masks are named by *subject index* and describe the final augmented image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynasyn.errors import InputError

INDEX = "prompts.jsonl"


@dataclass
class AugItem:
    """One augmented training item, resized to the model's resolution."""

    id: str
    template: str
    subjects: list[int]
    image: torch.Tensor  # (3, R, R) in [-1, 1]
    masks: torch.Tensor  # (len(subjects), R, R) in {0, 1}, in slot order
    record: dict


def _load_rgb(path: Path, resolution: int) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _load_mask(path: Path, resolution: int) -> torch.Tensor:
    m = Image.open(path)
    m = m.getchannel(0) if m.mode not in ("L", "1", "I", "F") else m.convert("L")
    m = m.resize((resolution, resolution), Image.BILINEAR)
    return torch.from_numpy((np.asarray(m, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))


def load_augmented(path: str | Path, num_subjects: int, resolution: int) -> list[AugItem]:
    """Read an augmented directory; refuse (InputError) records that do not fit the scene."""
    root = Path(path)
    index = root / INDEX
    if not index.is_file():
        raise InputError(f"augmented directory {root} has no {INDEX}; run `dynasyn augment` first")
    items: list[AugItem] = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            item_id = str(rec.get("id") or Path(rec["image"]).stem)
            template, subjects = str(rec["template"]), [int(s) for s in rec["subjects"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}:{n} is not a valid record ({e}); fix or delete it") from None
        bad = [s for s in subjects if not 0 <= s < num_subjects]
        if bad:
            raise InputError(
                f"{index}:{n} names subject {bad[0]} but the scene has {num_subjects}; "
                "augment with the same scene"
            )
        image_path = root / rec.get("image", f"{item_id}.png")
        mask_paths = [root / f"{item_id}_mask{s}.png" for s in subjects]
        for p in [image_path, *mask_paths]:
            if not p.is_file():
                raise InputError(f"{index}:{n} refers to missing file {p.name}; rerun the augmentation")
        items.append(
            AugItem(
                id=item_id,
                template=template,
                subjects=subjects,
                image=_load_rgb(image_path, resolution),
                masks=torch.stack([_load_mask(p, resolution) for p in mask_paths]),
                record=rec,
            )
        )
    if not items:
        raise InputError(f"augmented directory {root} has no items; rerun the augmentation")
    return items


def write_item(
    root: str | Path,
    item_id: str,
    image: Image.Image,
    masks: Sequence[np.ndarray],
    record: dict,
) -> None:
    """Write one item's image and masks (named by subject index) and append its record."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    image.save(root / f"{item_id}.png")
    for s, m in zip(record["subjects"], masks, strict=True):
        Image.fromarray((np.asarray(m) > 0.5).astype(np.uint8) * 255, "L").save(
            root / f"{item_id}_mask{s}.png"
        )
    with open(root / INDEX, "a") as f:
        f.write(json.dumps({"id": item_id, **record}) + "\n")
