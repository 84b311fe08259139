"""A deterministic parser of micro-world images: which subjects, what colour, shape and pattern.

The world's rules are known (:mod:`dynasyn.micro.world`), so a picture — a ground-truth render
or a micro SD sample — can be read without any learned model:

- **background** per row, from the two border columns at each side (subjects never touch them);
  foreground = pixels far from their row's background;
- **colour** per pixel = the palette colour whose brightness ray ``k * c`` (``k`` in
  [0.4, 1.1]) passes closest (so a pattern's half-bright pixels count for their colour), then a
  majority vote over the subject; pixels far from every ray (shadows, stars, grey) have none;
- **subjects** = one per colour present with at least ``min_area`` pixels (the world gives the
  subjects of a scene distinct colours), without that colour's *stray* parts
  (:func:`main_parts`: 8-connected parts, bridged over 1-pixel gaps, under a quarter of the
  largest part's pixels): a decoding leaves specks of a colour elsewhere (edge halos of
  other subjects, noise), and a speck in a far corner stretches the subject's bounding box so
  far that its shape no longer matches. On the micro VAE's reconstructions of the 200
  held-out renders of :mod:`dynasyn.micro.check` this moved the scenes read right from 70.0
  to 75.5 % (on 400 other held-out renders, seeds from 10⁹ + 40,000,000: 67.2 to 70.2 %);
  renders 95.0 % before and after (the other 400: 92.0 and 92.2 %). In images with (almost) no palette pixels, connected
  components instead: grayscale images (colour None), and sketches whose 1-px outlines a VAE
  decoding has faded towards the paper, off every brightness ray. Such a component's colour is
  the best fit of its pixels as *blends* ``b + a (c - b)`` of a colour ``c`` and the
  background ``b`` (:func:`blend_colour`). On the micro VAE's reconstructions of the 200
  held-out renders of :mod:`dynasyn.micro.check` this moved the scenes read right from 69.5 to
  70.0 % (on another 200, with more sketches, 64.5 to 70.0 %); the renders' own numbers did not
  change;
- **shape** = best IoU of the subject's silhouette (holes of outline drawings filled), cropped
  to its bounding box and resized to 24x24, against every class's silhouette under every pose
  the world uses (upright, upside down, lying, tilted), each also in *rounded* variants
  (Gaussian-blurred, cut at 0.5) of up to :data:`MAX_BLUR_PX` = 1.5 image pixels of blur at
  the subject's size: a VAE decoding rounds corners about that much, and with sharp templates
  only, a rounded star reads as a pyramid or heart (on the micro VAE's reconstructions of
  held-out renders, every subject right in 60.5 % of scenes with sharp templates, 69.5 % with
  the rounded ones; on the renders themselves 96.5 % and 95.0 %); the winning pose is
  reported too;
- **pattern** = plain when under 6% of the subject is half-bright, else the best agreement of
  the half-bright map with the class's striped / dotted / checkered maps in that pose;
- **position** = centroid, bounding box and area in pixels.

Accuracy measured on ground-truth 64x64 renders (seeded samples, 300 scenes per row; the
subject's true mask restricted to the foreground is given, as a parser of the image sees it;
``python -m dynasyn.micro.parse`` prints this table):

===============================================  ======  ======  =======
renders                                          colour  shape   pattern
===============================================  ======  ======  =======
one subject, plain background, standing          100 %   100 %   100 %
one subject, plain background, any action        100 %   99.7 %  98.7 %
one subject, grass / night / beach, any action   100 %   99.7 %  98.7 %
one subject, sketch (outline only)               100 %   86.3 %  n/a
one subject, grayscale                           n/a     99.7 %  n/a
two subjects, plain, any relation (per subject)  100 %   94.2 %  96.8 %
===============================================  ======  ======  =======

Whole-image parsing (:func:`parse_image`, no masks given), colour + shape of every subject:
100 % for one subject on the plain background (300 scenes) and for three in a row (200), 100 %
on grass / night / beach with any action (400), 94.5 % per subject for two subjects (200, 85 %
in a relation).
The misses are occluded subjects ("behind", "in front of", "inside") and rings drawn as
sketches (the filled outline reads as a ball). Parsing takes 5-13 ms per 64x64 image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from dynasyn.imageops import dilate, fill_holes, label_components
from dynasyn.micro.world import (
    CANON,
    COLOURS,
    PATTERNS,
    SHAPES,
    _matrix,
    _pattern,
    canonical_mask,
)

__all__ = [
    "POSES",
    "background_rows",
    "blend_colour",
    "colour_labels",
    "foreground",
    "main_parts",
    "parse_image",
    "parse_subject",
]

T = 24
"""Side of the normalized silhouette the shapes are compared at."""

POSES: tuple[tuple[str, float, bool], ...] = (
    ("upright", 0.0, False),
    ("upside down", 0.0, True),
    ("lying", 90.0, False),
    ("lying", -90.0, False),
    *(("tilted", s * a, False) for a in (15.0, 22.0, 29.0, 36.0) for s in (1.0, -1.0)),
)
"""Poses ``(name, angle, vertical flip)`` tried for every class, in order of preference."""

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)  # (C, 3)
_RAY_DIST = 45.0
_DARK_K = 0.75
_FG_DIST = 40.0
_MIN_CHROMA = 30.0


def background_rows(image: np.ndarray) -> np.ndarray:
    """Background colour of every row (H, 3), the median of its two outer pixels each side."""
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[:, :2], img[:, -2:]], axis=1)  # (H, 4, 3)
    return np.median(border, axis=1)


def foreground(image: np.ndarray, bg: np.ndarray | None = None) -> np.ndarray:
    """Pixels farther than 40 (RGB distance) from their row's background: bool (H, W)."""
    img = np.asarray(image, dtype=np.float32)
    if bg is None:
        bg = background_rows(img)
    return np.linalg.norm(img - bg[:, None, :], axis=2) > _FG_DIST


def _is_grayscale(img: np.ndarray) -> bool:
    """No pixel of ``img`` (float (H, W, 3)) has a chroma (max - min) of 8 or more."""
    return float((img.max(axis=2) - img.min(axis=2)).max()) < 8.0


def colour_labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: palette index (-1 = no palette colour) and whether it is half-bright.

    A pixel ``p`` belongs to colour ``c`` when ``min_k |p - k c|`` over ``k`` in [0.4, 1.1] is
    under 45 and smaller than for every other colour, and ``p`` is not grey (max - min >= 30).
    """
    img = np.asarray(image, dtype=np.float32)
    flat = img.reshape(-1, 3)
    norms = (_PALETTE * _PALETTE).sum(axis=1)  # (C,)
    k = np.clip(flat @ _PALETTE.T / norms, 0.4, 1.1)  # (N, C)
    d = np.linalg.norm(flat[:, None, :] - k[:, :, None] * _PALETTE[None], axis=2)
    best = d.argmin(axis=1)
    chroma = flat.max(axis=1) - flat.min(axis=1)
    ok = (d[np.arange(len(best)), best] < _RAY_DIST) & (chroma >= _MIN_CHROMA)
    if _is_grayscale(img):
        ok[:] = False
    labels = np.where(ok, best, -1).reshape(img.shape[:2])
    dark = (k[np.arange(len(best)), best] < _DARK_K).reshape(img.shape[:2]) & ok.reshape(
        img.shape[:2]
    )
    return labels, dark


def _normalize(mask: np.ndarray, values: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Crop to the bounding box of ``mask`` and sample T x T cell centres (nearest)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ry = (y0 + (np.arange(T) + 0.5) * (y1 - y0) / T).astype(np.intp)
    rx = (x0 + (np.arange(T) + 0.5) * (x1 - x0) / T).astype(np.intp)
    out = (mask[np.ix_(ry, rx)],)
    if values is not None:
        out += (values[np.ix_(ry, rx)],)
    return out


def _frame_grid(angle: float, vflip: bool, n: int = 96) -> tuple[np.ndarray, ...]:
    """Frame coordinates (u, v) of an n x n image of a subject of half-size n * 0.45."""
    A = _matrix(n * 0.45, angle, vflip)
    inv = np.linalg.inv(A)
    d = np.arange(n) + 0.5 - n / 2
    dx, dy = d[None, :], d[:, None]
    return inv[0, 0] * dx + inv[0, 1] * dy, inv[1, 0] * dx + inv[1, 1] * dy


BLUR_LEVELS: tuple[float, ...] = (0.0, 2.0, 3.5, 5.0, 7.0, 10.0)
"""Gaussian sigmas (in the 96-pixel template frame) of the rounded template variants."""

MAX_BLUR_PX = 1.5
"""The most blur (Gaussian sigma, image pixels) a silhouette may show and still match a class:
a VAE decoding rounds corners by about this much, which makes small stars read as pentagons."""

_FRAME = 96


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix ``G`` with ``G @ x`` = 1-D Gaussian blur of x (zero padding)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Silhouettes (K, L, T*T) of every class and pose at every :data:`BLUR_LEVELS` (blurred,
    then cut at 0.5: corners rounded as a blurred picture's are), pattern maps (K, P, T*T) and
    the sharp silhouettes' bounding-box side in the template frame (K,)."""
    shapes, patterns, keys, sides = [], [], [], []
    for shape in SHAPES:
        canon = canonical_mask(shape)
        for pose, angle, vflip in POSES:
            u, v = _frame_grid(angle, vflip, _FRAME)
            iu = np.floor((u + 1) * (CANON / 2)).astype(np.intp)
            iv = np.floor((v + 1) * (CANON / 2)).astype(np.intp)
            ok = (iu >= 0) & (iu < CANON) & (iv >= 0) & (iv < CANON)
            m = ok & canon[np.clip(iv, 0, CANON - 1), np.clip(iu, 0, CANON - 1)]
            maps = []
            for pat in PATTERNS[1:]:
                dark = _pattern(pat, u, v)
                assert dark is not None
                maps.append(_normalize(m, dark & m)[1].ravel())
            levels = []
            for sigma in BLUR_LEVELS:
                mb = m
                if sigma > 0:
                    g = _gaussian_matrix(_FRAME, sigma)
                    mb = (g @ m.astype(np.float32) @ g.T) >= 0.5
                    if not mb.any():
                        mb = m
                levels.append(_normalize(mb)[0].ravel())
            ys, xs = np.nonzero(m)
            sides.append(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
            shapes.append(np.stack(levels))
            patterns.append(np.stack(maps))
            keys.append((shape, pose))
    return np.stack(shapes), np.stack(patterns), keys, np.asarray(sides, dtype=np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def parse_subject(
    image: np.ndarray, mask: np.ndarray | None = None, *, colour_index: int | None = None
) -> dict[str, object]:
    """Read one subject of ``image`` (H, W, 3 uint8).

    ``mask`` selects the subject's pixels (default: the image's whole foreground). Returns a
    dict with ``colour`` (a palette name, or None in grayscale), ``shape``, ``pose``
    (``upright``/``upside down``/``lying``/``tilted``), ``pattern`` (None when there is no
    colour), ``shape_iou``, ``centroid`` (x, y in pixels), ``bbox`` (x0, y0, x1, y1, exclusive
    end), ``area`` (pixels) and ``mask`` (the pixels used). ``colour_index`` forces the colour.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    labels, dark = colour_labels(img)
    if mask is None:
        mask = foreground(img)
        coloured = mask & (labels >= 0)
        if coloured.sum() >= 0.3 * max(1, mask.sum()):
            mask = coloured
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the subject mask is empty: nothing to parse")
    if colour_index is None:
        votes = np.bincount(labels[mask & (labels >= 0)], minlength=len(_COLOUR_NAMES))
        seen = max(3, 0.3 * (mask & foreground(img)).sum())
        colour_index = int(votes.argmax()) if votes.sum() >= seen else None
    colour = None if colour_index is None else _COLOUR_NAMES[colour_index]

    silhouette = mask
    filled = fill_holes(mask)  # off pixels 4-connected to the border are outside
    if mask.sum() < 0.6 * filled.sum():  # an outline drawing: compare the filled shape
        silhouette = filled
    shp_all, pats, keys, sides = _templates()
    obs_mask, obs_dark = _normalize(silhouette, dark & mask)
    o = obs_mask.ravel().astype(np.float32)
    tf = shp_all.astype(np.float32)  # (K, L, T*T)
    inter = tf @ o
    iou_l = inter / (tf.sum(axis=2) + o.sum() - inter)  # (K, L)
    # a template may be rounded by up to MAX_BLUR_PX image pixels, at this subject's scale
    ys, xs = np.nonzero(silhouette)
    obs_side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    allowed = np.asarray(BLUR_LEVELS)[None, :] <= (MAX_BLUR_PX * sides / obs_side)[:, None]
    level = np.where(allowed, iou_l, -1.0).argmax(axis=1)  # (K,)
    iou = iou_l[np.arange(len(keys)), level]
    shp = shp_all[np.arange(len(keys)), 0]  # the sharp silhouettes (pattern regions)
    best = int(iou.argmax())
    shape, pose = keys[best]

    pattern = None
    if colour is not None and silhouette is mask:
        frac = (dark & mask).sum() / mask.sum()
        if frac < 0.06:
            pattern = "plain"
        else:
            # poses a symmetric class cannot tell apart all compete for the pattern
            best_agree, pattern = -1.0, None
            for cand in np.nonzero(iou >= iou[best] - 0.02)[0]:
                if keys[cand][0] != shape:
                    continue
                region = obs_mask.ravel() & shp[cand]
                if not region.any():  # no overlap: this pose says nothing about the pattern
                    continue
                od = obs_dark.ravel()[region]
                agree = (pats[cand][:, region] == od[None, :]).mean(axis=1)
                if agree.max() > best_agree:
                    best_agree = float(agree.max())
                    pattern = PATTERNS[1 + int(agree.argmax())]

    ys, xs = np.nonzero(mask)
    return {
        "colour": colour,
        "shape": shape,
        "pose": pose,
        "pattern": pattern,
        "shape_iou": float(iou[best]),
        "centroid": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
        "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        "area": int(mask.sum()),
        "mask": mask,
    }


_BLEND_RES = 30.0
_BLEND_MIN = 0.1


def blend_colour(image: np.ndarray, mask: np.ndarray) -> int | None:
    """Palette index of a faint subject (``mask``) seen as a blend of a colour and its rows'
    background, or None.

    A pixel ``p`` over background ``b`` is read as ``b + a (c - b)``; the colour ``c`` whose
    median residual over the subject is smallest (under 30, with median ``a`` >= 0.1) wins.
    This reads the thin outlines of sketches after a decoding has faded them towards the paper;
    a grayscale image (no pixel with a chroma of 8 or more) gives None.
    """
    img = np.asarray(image, dtype=np.float32)
    if _is_grayscale(img):
        return None
    ys, _ = np.nonzero(mask)
    bg = background_rows(img)[ys]  # (N, 3)
    d = img[mask] - bg
    best, best_res = None, _BLEND_RES
    for ci, c in enumerate(_PALETTE):
        v = c[None] - bg
        a = (d * v).sum(axis=1) / np.maximum((v * v).sum(axis=1), 1.0)
        res = float(np.median(np.linalg.norm(d - a[:, None] * v, axis=1)))
        if float(np.median(a)) >= _BLEND_MIN and res < best_res:
            best, best_res = ci, res
    return best


MAIN_PART_FRACTION = 0.25
"""Parts of a colour's pixels smaller than this fraction of its largest part are strays."""


def main_parts(mask: np.ndarray, fraction: float = MAIN_PART_FRACTION) -> np.ndarray:
    """``mask`` without its stray parts: the pixels of the 8-connected parts of ``mask``
    (bridged over 1-pixel gaps) with at least ``fraction`` of the largest part's pixels."""
    mask = np.asarray(mask, dtype=bool)
    comps, n = label_components(dilate(mask))
    if n <= 1:
        return mask
    sizes = np.bincount(comps[mask], minlength=n + 1)
    keep = sizes >= fraction * sizes.max()
    keep[0] = False
    return mask & keep[comps]


def parse_image(image: np.ndarray, min_area: int = 8) -> list[dict[str, object]]:
    """All subjects of ``image``, left to right (by centroid x); see :func:`parse_subject`.

    A colour image gives one subject per palette colour covering at least ``min_area``
    foreground pixels; an image with (almost) no palette pixels (grayscale, or a sketch whose
    outlines a decoding has faded) one subject per connected component of the foreground of
    at least ``min_area`` pixels, coloured by :func:`blend_colour` (None in grayscale).
    """
    img = np.asarray(image)
    fg = foreground(img)
    labels, _ = colour_labels(img)
    found = []
    lab_fg = np.where(fg, labels, -1)
    counts = np.bincount(lab_fg[lab_fg >= 0], minlength=len(_COLOUR_NAMES))
    if counts.sum() >= 0.3 * max(1, fg.sum()):
        for c in np.nonzero(counts >= min_area)[0]:
            found.append(parse_subject(img, main_parts(lab_fg == c), colour_index=int(c)))
    else:
        comps, n = label_components(fg)
        shadow = (
            np.abs(img[..., 0].astype(np.float32) - 0.6 * _luma(background_rows(img))[:, None])
            <= 2.5
        )
        for i in range(1, n + 1):
            m = comps == i
            if m.sum() >= min_area and (shadow & m).sum() < 0.9 * m.sum():
                ci = blend_colour(img, m)
                found.append(parse_subject(img, m, colour_index=ci))
    found.sort(key=lambda s: s["centroid"][0])  # type: ignore[index]
    return found


def _accuracy_table(n: int = 300) -> None:  # pragma: no cover - a measurement, run by hand
    """Print the accuracy table of the module docstring (``python -m dynasyn.micro.parse``)."""
    from dynasyn.micro import world

    rows = [
        ("one subject, plain, standing", 1, ("plain",), 1.0, "standing"),
        ("one subject, plain, any action", 1, ("plain",), 1.0, None),
        ("one subject, grass/night/beach", 1, ("grass", "night", "beach"), 0.0, None),
        ("one subject, sketch", 1, ("sketch",), 0.0, None),
        ("one subject, grayscale", 1, ("grayscale",), 0.0, None),
        ("two subjects, plain, any relation", 2, ("plain",), 1.0, None),
    ]
    for name, k, bgs, p_plain, action in rows:
        hits = {"colour": 0, "shape": 0, "pattern": 0}
        total = 0
        for seed in range(n):
            rng = np.random.default_rng([seed, 7])
            spec = world.sample_spec(
                rng, k, backgrounds=bgs, p_plain_background=p_plain, p_action=1.0, p_relation=1.0
            )
            if action is not None:
                spec = world.SceneSpec(spec.subjects, action, None, spec.background)
            r = world.render(spec, 64, seed)
            fg = foreground(r.image)
            for ident, m in zip(spec.subjects, r.masks, strict=True):
                if not (m & fg).any():
                    continue
                got = parse_subject(r.image, m & fg)  # what a parser of the image can see
                total += 1
                hits["colour"] += got["colour"] == ident.colour
                hits["shape"] += got["shape"] == ident.shape
                hits["pattern"] += got["pattern"] == ident.pattern
        cells = "  ".join(f"{a} {100 * h / total:5.1f}%" for a, h in hits.items())
        print(f"{name:36s} n={total:4d}  {cells}")
    # whole-image parsing (no masks given), plain standing
    ok = 0
    for seed in range(n):
        rng = np.random.default_rng([seed, 8])
        spec = world.sample_spec(rng, 1, p_action=0.0, backgrounds=("plain",))
        got = parse_image(world.render(spec, 64, seed).image)
        ok += (
            len(got) == 1
            and got[0]["colour"] == spec.subjects[0].colour
            and got[0]["shape"] == spec.subjects[0].shape
        )
    print(f"{'parse_image, plain, no action':36s} n={n:4d}  colour+shape {100 * ok / n:5.1f}%")


if __name__ == "__main__":  # pragma: no cover
    _accuracy_table()
