"""Binary-mask and threshold operations shared by the augmentation and the micro-world parser.

A low-level module (numpy, scipy and scikit-image only; it imports nothing of dynasyn), so that
:mod:`dynasyn.augment.masks` and :mod:`dynasyn.micro.parse` both use it without importing each
other. The work is done by :mod:`scipy.ndimage` (morphology, labelling, hole filling) and
:func:`skimage.filters.threshold_otsu`; what this module adds is the conventions the callers
rely on:

- connectivity is 8 (a 3x3 square) for dilation, erosion and labelling;
- erosion does not eat in from the image border (outside the image counts as on);
- hole filling says how an off region reaches the border (4-connected by default);
- Otsu's threshold is computed over a fixed [0, 1] histogram and is the upper edge of the last
  background bin, so ``values > t`` is the foreground.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

__all__ = [
    "SQUARE",
    "dilate",
    "erode",
    "fill_holes",
    "label_components",
    "largest_component",
    "otsu_threshold",
]

SQUARE = np.ones((3, 3), dtype=bool)
"""The 3x3 structuring element: 8-connectivity."""

_CROSS = ndimage.generate_binary_structure(2, 1)


def _bool(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    return m


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the foreground is ``values > t``.

    The values are binned over [0, 1] (``bins`` bins, so maps normalized to [0, 1] are binned
    alike whatever their actual range); :func:`skimage.filters.threshold_otsu` picks the bin
    that maximizes the between-class variance, and ``t`` is that bin's upper edge. With fewer
    than two occupied bins there is no between-class variance; 0.5 is returned then.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    if np.count_nonzero(hist) < 2:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2
    k = int(np.searchsorted(centers, threshold_otsu(hist=(hist, centers))))
    return float(edges[k + 1])


def dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation with a 3x3 square (8-neighbourhood), ``iterations`` times (0: a copy)."""
    m = _bool(mask)
    if iterations <= 0 or not m.any():
        return m.copy()
    return ndimage.binary_dilation(m, structure=SQUARE, iterations=iterations)


def erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion with a 3x3 square, ``iterations`` times (0: a copy); the image border
    does not erode (outside the image counts as on)."""
    m = _bool(mask)
    if iterations <= 0 or not m.any():
        return m.copy()
    return ndimage.binary_erosion(m, structure=SQUARE, iterations=iterations, border_value=1)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask: labels (H, W) int32 (0 = off, 1..n) and n.

    Labels are numbered in raster order of each component's first pixel.
    """
    labels, n = ndimage.label(_bool(mask), structure=SQUARE)
    return labels.astype(np.int32, copy=False), int(n)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (ties: the first in raster order; an
    empty mask stays empty)."""
    m = _bool(mask)
    if not m.any():
        return m.copy()
    labels, n = label_components(m)
    if n == 1:
        return m.copy()
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    counts[0] = 0
    return labels == int(np.argmax(counts))


def fill_holes(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """``mask`` with every off region that does not reach the image border switched on.

    ``connectivity`` (4 or 8) is how off pixels connect on their way to the border: with 8,
    a region that touches the outside only through a diagonal gap of the mask is not a hole.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity!r}")
    m = _bool(mask)
    if m.all() or not m.any():
        return m.copy()
    return ndimage.binary_fill_holes(m, structure=_CROSS if connectivity == 4 else SQUARE)
