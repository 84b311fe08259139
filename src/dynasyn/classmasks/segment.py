"""From class attention maps to one mask per class: regions, foreground, assignment, clean-up.

Steps (every image operation is scikit-image's or scipy's):

1. *Propagate* (optional, ``propagate`` > 0): each class map is multiplied by the model's own
   self-attention affinity that many times (a pixel takes the class scores of the pixels it
   attends to). Off by default: on the micro world it blurs the subjects into each other
   (docs/masks.md).
2. *Foreground*: each class map is scaled to [0, 1]; their mean, upsampled bilinearly to the
   working image, is averaged over the photo's own regions
   (:func:`skimage.segmentation.felzenszwalb`, so the masks follow the photo's edges, not the
   attention grid's); regions above Otsu's threshold of that map are foreground.
3. *Assignment* (non-overlapping): the foreground's 8-connected components (above a minimum
   area) are given to the classes by :func:`scipy.optimize.linear_sum_assignment` over each
   class's *specific* attention in each component (its map minus the mean of all class maps),
   one component per class. When there are fewer components than classes (subjects that
   touch), a class left without one claims the pixels of the component where its specific
   attention beats the owner's.
4. *Clean-up*: each mask keeps its largest component and gets holes smaller than
   ``hole_frac`` of the image filled (:func:`skimage.morphology.remove_small_holes`; a ring's
   real hole stays open).

A class is *not found* when its map is flat (the contrast of its raw map below
``flat_contrast``) or when it is swallowed: it got no component and could claim less than
``swallow_frac`` of any component. :func:`assign` then raises :class:`ClassNotFound`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.morphology import remove_small_holes
from skimage.segmentation import felzenszwalb

from dynasyn.imageops import label_components, largest_component, otsu_threshold

__all__ = ["ClassNotFound", "SegmentParams", "Segmentation", "assign"]


@dataclass(frozen=True)
class SegmentParams:
    """The method's knobs (defaults tuned on micro-world tuning scenes, docs/masks.md)."""

    propagate: int = 0
    region_scale: float = 100.0
    region_sigma: float = 0.0
    region_min_size: int = 4
    min_component_frac: float = 0.002
    hole_frac: float = 0.004
    flat_contrast: float = 0.05
    swallow_frac: float = 0.25


class ClassNotFound(Exception):
    """One or more classes have no subject in the photo (flat or swallowed maps)."""

    def __init__(self, reasons: dict[int, str], maps: np.ndarray):
        super().__init__("; ".join(reasons.values()))
        self.reasons = reasons
        self.maps = maps


@dataclass
class Segmentation:
    """The masks and what they came from.

    Attributes:
        masks: one bool ``(H, W)`` mask per class, disjoint, each one 8-connected component.
        maps: ``(K, H, W)`` float32 class maps in [0, 1] at the image size (for inspection).
        foreground: bool ``(H, W)``, the foreground before assignment.
        scores: ``(K, C)`` specific attention of each class in each foreground component.
    """

    masks: list[np.ndarray]
    maps: np.ndarray
    foreground: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _upsample(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0].numpy()


def _scale01(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    lo, hi = flat.min(1)[:, None, None], flat.max(1)[:, None, None]
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


def _contrast(m: np.ndarray) -> float:
    """(max - median) / max of a non-negative map: 0 for a flat one."""
    hi = float(m.max())
    return 0.0 if hi <= 0 else (hi - float(np.median(m))) / hi


def assign(
    image: np.ndarray,
    cross: np.ndarray,
    affinity: np.ndarray | None = None,
    params: SegmentParams = SegmentParams(),
    names: Sequence[str] | None = None,
) -> Segmentation:
    """One mask per class map of ``cross`` ``(K, g, g)`` on ``image`` (RGB uint8 ``(H, W, 3)``).

    ``affinity`` ``(g*g, g*g)`` (rows sum to 1) is needed when ``params.propagate`` > 0.
    ``names`` (the classes) only make the :class:`ClassNotFound` reasons readable.

    Raises:
        ClassNotFound: a class's map is flat, or it is swallowed by another class.
    """
    k, g = len(cross), cross.shape[-1]
    names = list(names) if names is not None else [f"class {i}" for i in range(k)]
    h, w = image.shape[:2]
    maps = cross.reshape(k, -1).T
    for _ in range(params.propagate):
        if affinity is None:
            raise ValueError("propagate > 0 needs the self-attention affinity")
        maps = affinity @ maps
    raw = maps.T.reshape(k, g, g)
    scaled = _scale01(raw)
    up = np.clip(_upsample(scaled, (h, w)), 0.0, 1.0)
    reasons = {i: f"class {names[i]!r} not found: its attention map is flat"
               for i in range(k) if _contrast(raw[i]) < params.flat_contrast}
    if reasons:
        raise ClassNotFound(reasons, up)

    # foreground: the mean class map averaged over the photo's regions, Otsu-thresholded
    mean = up.mean(0)
    mean = (mean - mean.min()) / max(float(mean.max() - mean.min()), 1e-12)
    min_size = max(params.region_min_size, round(params.region_min_size * h * w / 4096))
    regions = felzenszwalb(image, scale=params.region_scale, sigma=params.region_sigma,
                           min_size=min_size)
    ids = np.unique(regions)
    region_mean = np.asarray(ndimage.mean(mean, labels=regions, index=ids))
    by_region = region_mean[np.searchsorted(ids, regions)]
    foreground = by_region > otsu_threshold(by_region)

    # assignment: one component per class by specific attention
    specific = up - up.mean(0, keepdims=True)
    labels, n = label_components(foreground)
    min_px = params.min_component_frac * h * w
    comps = [c for c in range(1, n + 1) if (labels == c).sum() >= min_px]
    score = np.array([[specific[i][labels == c].mean() for c in comps] for i in range(k)])
    masks = [np.zeros((h, w), bool) for _ in range(k)]
    owner: dict[int, int] = {}
    if comps:
        rows, cols = linear_sum_assignment(-score)
        for i, j in zip(rows, cols, strict=True):
            masks[i] = labels == comps[j]
            owner[j] = i
    for i in range(k):
        if masks[i].any():
            continue
        best, best_part = 0.0, None
        for j, c in enumerate(comps):
            comp = labels == c
            rival = owner.get(j)
            part = comp if rival is None else comp & (specific[i] > specific[rival])
            part = largest_component(part)
            frac = part.sum() / comp.sum()
            if frac > best:
                best, best_part = frac, part
        if best_part is None or best < params.swallow_frac:
            who = "" if not comps else f" by {names[owner.get(int(np.argmax(score[i])), i)]!r}"
            reasons[i] = f"class {names[i]!r} not found: its attention is swallowed{who}"
            continue
        masks[i] = best_part
        for j, c in enumerate(comps):  # take the claimed pixels from their owner
            if j in owner and (best_part & (labels == c)).any():
                masks[owner[j]] = largest_component(masks[owner[j]] & ~best_part)
    if reasons:
        raise ClassNotFound(reasons, up)
    hole = max(1, round(params.hole_frac * h * w))
    taken = np.zeros((h, w), bool)
    out = []
    for m in masks:
        m = remove_small_holes(largest_component(m), max_size=hole) & ~taken
        taken |= m
        out.append(m)
    return Segmentation(out, up.astype(np.float32), foreground, score)
