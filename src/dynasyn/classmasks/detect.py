"""``--segmenter detect-sam``: an open-vocabulary detector (OWLv2) for one box per class, then
SAM for the mask in each box — both from local transformers weights only (no download).

Each class gets its highest-scoring box ("a photo of a <class>" queries); the boxes prompt
:func:`dynasyn.augment.masks.sam_masks`, which keeps the masks disjoint. A class whose best box
scores below ``min_score`` is not found (exit 2 through the command line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynasyn.errors import InputError


def _local_dir(path: str | None, what: str, option: str) -> str:
    if not path:
        raise InputError(f"--segmenter detect-sam needs local {what} weights: pass {option} DIR "
                         "(a transformers model directory; nothing is downloaded)")
    if not Path(path).is_dir():
        raise InputError(f"{option} {path} is not a directory; pass a local transformers "
                         f"{what} model directory")
    return path


@torch.no_grad()
def detect_sam_masks(
    image: Image.Image,
    classes: Sequence[str],
    detector_model: str | None,
    sam_model: str | None,
    device: str = "auto",
    min_score: float = 0.1,
):
    """One mask per class from OWLv2 boxes and SAM; returns a :class:`~dynasyn.classmasks.MaskResult`."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor, SamModel, SamProcessor

    from dynasyn.augment.masks import sam_masks
    from dynasyn.classmasks import MaskResult
    from dynasyn.models import pick_device

    det_dir = _local_dir(detector_model, "OWLv2 detector", "--detector-model")
    sam_dir = _local_dir(sam_model, "SAM", "--sam-model")
    dev = pick_device(device)
    try:
        proc = Owlv2Processor.from_pretrained(det_dir, local_files_only=True)
        det = Owlv2ForObjectDetection.from_pretrained(det_dir, local_files_only=True).to(dev).eval()
        sproc = SamProcessor.from_pretrained(sam_dir, local_files_only=True)
        sam = SamModel.from_pretrained(sam_dir, local_files_only=True).to(dev).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"could not load the detect-sam weights ({first})") from None
    image = image.convert("RGB")
    queries = [[f"a photo of a {c}" for c in classes]]
    enc = proc(text=queries, images=image, return_tensors="pt").to(dev)
    out = det(**enc)
    w, h = image.size
    side = max(w, h)  # OWLv2 pads the image to a square
    found = proc.post_process_grounded_object_detection(
        out, threshold=0.0, target_sizes=torch.tensor([[side, side]]))[0]
    boxes, scores = [], []
    missing = []
    for k, c in enumerate(classes):
        sel = found["labels"] == k
        if not sel.any() or float(found["scores"][sel].max()) < min_score:
            missing.append(c)
            continue
        j = int(torch.argmax(torch.where(sel, found["scores"], -1.0)))
        x0, y0, x1, y1 = (float(v) for v in found["boxes"][j])
        boxes.append((max(0.0, x0), max(0.0, y0), min(w, x1), min(h, y1)))
        scores.append(float(found["scores"][j]))
    if missing:
        raise InputError("class " + ", ".join(repr(c) for c in missing) + " not found by the "
                         f"detector (best score under {min_score}); check the class nouns")
    masks = sam_masks(image, [{"box": b} for b in boxes], sam, sproc)
    maps = np.stack([m.astype(np.float32) for m in masks])
    record = {"method": "detect-sam", "classes": list(classes), "detector": det_dir,
              "sam": sam_dir, "boxes": boxes, "scores": scores,
              "mask_pixels": [int(m.sum()) for m in masks]}
    return MaskResult(masks, maps, record)
