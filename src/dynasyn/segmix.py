"""MuDI's Seg-Mix (Jang et al., NeurIPS 2024, arXiv 2404.04243), for one scene image.

The chosen subjects are cut out by their masks (each cropped to its mask's bounding box),
rescaled at random and pasted side by side at random positions on a fresh plain canvas, so
that no two subjects overlap and nothing of the scene's background or of the subjects'
original arrangement is left. As in the official code: the canvas is white, and each
subject's scale is drawn uniformly from ``scale_range`` (0.75-1) times the largest scale at
which it fits its share of the canvas (full height, 1/k of the width for k subjects).
The horizontal gaps between the subjects and their order, and each one's height on the
canvas, are random. The returned masks are exactly the pasted subjects' pixels (for the
masked diffusion loss and the attention loss).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

SCALE_RANGE = (0.75, 1.0)
"""MuDI's official range of a subject's scale, relative to the largest that fits its slot."""


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys = torch.nonzero(mask.any(1)).flatten()
    xs = torch.nonzero(mask.any(0)).flatten()
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def seg_mix(image: torch.Tensor, masks: torch.Tensor, subjects: list[int], rng: random.Random,
            background: float = 1.0,
            scale_range: tuple[float, float] = SCALE_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose ``subjects`` (indices into ``masks``) of ``image`` on a fresh canvas.

    Args:
        image: (3, H, W) in [-1, 1].
        masks: (N, H, W) in {0, 1}; every chosen mask must be non-empty.
        subjects: the subjects to paste, in slot order.
        rng: the source of every random choice (positions, scales, order).
        background: the canvas value in [-1, 1] (1 = white, the official choice).
        scale_range: (lo, hi) of the scale relative to the largest that fits the slot.

    Returns:
        ``(canvas, pasted)``: the (3, H, W) composition and (len(subjects), H, W) masks of
        the pasted pixels in slot order; the masks never overlap.
    """
    _, h, w = image.shape
    k = len(subjects)
    slot_w = w // k
    crops = []
    for s in subjects:
        m = masks[s] > 0.5
        if not m.any():
            raise ValueError(f"subject {s} has an empty mask")
        y0, y1, x0, x1 = _bbox(m)
        ch, cw = y1 - y0, x1 - x0
        fit = min(h / ch, slot_w / cw)
        scale = fit * rng.uniform(*scale_range)
        nh, nw = max(1, min(h, int(ch * scale))), max(1, min(slot_w, int(cw * scale)))
        img = F.interpolate(image[None, :, y0:y1, x0:x1].float(), size=(nh, nw), mode="bilinear",
                            align_corners=False, antialias=True)[0]
        msk = F.interpolate(m[None, None, y0:y1, x0:x1].float(), size=(nh, nw), mode="bilinear",
                            align_corners=False, antialias=True)[0, 0] >= 0.5
        crops.append((img, msk))
    # random left-to-right order and random gaps that add up to the free width: the pasted
    # boxes occupy disjoint column ranges, so no two subjects overlap
    order = list(range(k))
    rng.shuffle(order)
    free = w - sum(crops[i][1].shape[1] for i in order)
    cuts = sorted(rng.randint(0, free) for _ in range(k))
    gaps = [cuts[0]] + [cuts[j] - cuts[j - 1] for j in range(1, k)]
    canvas = torch.full_like(image, background, dtype=torch.float32)
    pasted = torch.zeros(k, h, w, dtype=masks.dtype)
    x = 0
    for j, i in enumerate(order):
        img, msk = crops[i]
        nh, nw = msk.shape
        x += gaps[j]
        y = rng.randint(0, h - nh)
        region = canvas[:, y:y + nh, x:x + nw]
        canvas[:, y:y + nh, x:x + nw] = torch.where(msk, img, region)
        pasted[i, y:y + nh, x:x + nw] = msk.to(masks.dtype)
        x += nw
    return canvas.to(image.dtype), pasted


def compose_subjects(image: torch.Tensor, masks: torch.Tensor, subjects: list[int],
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Seg-Mix composition drawn from ``seed`` (used for MuDI's initial noise)."""
    return seg_mix(image, masks, subjects, random.Random(seed))
