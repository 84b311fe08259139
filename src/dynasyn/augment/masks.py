"""Pseudo masks of a draft's subjects (the paper's Step 3, "drafts → pseudo masks").

The paper segments each rendered draft with SAM. Here two segmenters are offered:

- :func:`attention_masks` (the default, no extra weights): each subject's aggregated class-token
  cross-attention map is normalized to [0, 1], upsampled bilinearly to the image size,
  thresholded (Otsu or a fixed value), cleaned (3x3 opening and closing), reduced to its largest
  8-connected component and hole-filled. A pixel claimed by several subjects goes to the subject
  whose normalized attention is higher there. With an image and OpenCV installed, each mask can
  be refined by GrabCut. No mask is ever empty: an empty one falls back to the subject's
  most-attended pixels.
- :func:`sam_masks`: a transformers ``SamModel`` prompted per subject by a box and/or positive
  points (e.g. from :func:`attention_prompts`: the attention masks' boxes and the maps' peaks);
  the multimask output with the best predicted IoU is kept.

The mask operations (Otsu, 3x3 morphology, components, hole filling) are
:mod:`dynasyn.imageops`'s, i.e. scipy.ndimage's and scikit-image's; torch does the bilinear
upsampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dynasyn.errors import InputError
from dynasyn.imageops import dilate, erode, fill_holes, largest_component, otsu_threshold

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
Point = tuple[float, float]

_cv2_warned = False


# ----------------------------------------------------------------------------- small tools


def box_of(mask: np.ndarray) -> Box:
    """Bounding box ``(x0, y0, x1, y1)`` of a bool mask, inclusive-exclusive (x1, y1 one past).

    Raises ``ValueError`` for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    if len(ys) == 0:
        raise ValueError("an empty mask has no bounding box")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def peak_points(
    amap: np.ndarray | torch.Tensor,
    k: int = 1,
    size: int | None = None,
    min_distance: float | None = None,
) -> list[Point]:
    """The ``k`` strongest pixels of a 2-D map at least ``min_distance`` apart, as ``(x, y)``.

    Coordinates are pixel centres: in map pixels when ``size`` is None, else scaled to an image
    of ``size`` x ``size`` (``(x + 0.5) * size / w``), ready to prompt SAM. Peaks closer than
    ``min_distance`` map pixels (default: a quarter of the map's smaller side) to a stronger one
    are suppressed (greedy non-maximum suppression), so points land on distinct peaks; strongest
    first.
    """
    a = _as_numpy(amap)
    if a.ndim != 2:
        raise ValueError(f"peak_points wants a 2-D map, got shape {a.shape}")
    h, w = a.shape
    if min_distance is None:
        min_distance = max(1.0, min(h, w) / 4)
    order = np.argsort(-a, axis=None, kind="stable")
    chosen: list[tuple[int, int]] = []
    for idx in order:
        y, x = divmod(int(idx), w)
        if all((y - cy) ** 2 + (x - cx) ** 2 >= min_distance**2 for cy, cx in chosen):
            chosen.append((y, x))
            if len(chosen) >= k:
                break
    if size is None:
        return [(float(x), float(y)) for y, x in chosen]
    return [((x + 0.5) * size / w, (y + 0.5) * size / h) for y, x in chosen]


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float64)


def _normalize01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def upsample_maps(maps: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """Per-map min-max normalization to [0, 1], then bilinear upsampling to ``size`` x ``size``.

    Returns float64 (K, size, size) in [0, 1].
    """
    a = _as_numpy(maps)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"attention maps must be (K, h, w), got shape {a.shape}")
    a = np.stack([_normalize01(m) for m in a]) if len(a) else a
    t = torch.from_numpy(a.astype(np.float32))[None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return np.clip(up.numpy().astype(np.float64), 0.0, 1.0)


def resolve_overlaps(masks: Sequence[np.ndarray], scores: np.ndarray) -> list[np.ndarray]:
    """Give each pixel claimed by several masks to the claimant with the highest score.

    ``scores`` is (K, H, W) (e.g. normalized attention or SAM logits); ties go to the lower index.
    """
    if len(masks) < 2:
        return [np.asarray(m, dtype=bool).copy() for m in masks]
    stack = np.stack([np.asarray(m, dtype=bool) for m in masks])
    claimed = np.where(stack, scores, -np.inf)
    winner = np.argmax(claimed, axis=0)
    return [stack[i] & (winner == i) for i in range(len(masks))]


def _top_fraction(score: np.ndarray, frac: float, exclude: np.ndarray | None) -> np.ndarray:
    """The ``frac`` most-scored pixels (at least one), ties broken towards the image centre."""
    H, W = score.shape
    yy, xx = np.mgrid[0:H, 0:W]
    d2 = ((yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2) / float(H * H + W * W)
    s = score - 1e-6 * d2
    if exclude is not None and not exclude.all():
        s = np.where(exclude, -np.inf, s)
    n = max(1, round(frac * H * W))
    idx = np.argpartition(-s.ravel(), min(n, s.size) - 1)[:n]
    out = np.zeros(H * W, dtype=bool)
    out[idx] = True
    return out.reshape(H, W)


# ----------------------------------------------------------------------------- attention masks


def attention_masks(
    maps: np.ndarray | torch.Tensor,
    size: int,
    threshold: float | str = "otsu",
    grabcut_image: np.ndarray | Image.Image | None = None,
    *,
    clean: bool = True,
    fallback_frac: float = 0.02,
    grabcut_iters: int = 3,
) -> list[np.ndarray]:
    """Step 3 pseudo masks from class-token cross-attention: one bool (size, size) mask per map.

    ``maps`` (K, h, w), non-negative, one aggregated cross-attention map per subject (any
    resolution; a torch tensor on any device is fine). Per subject: min-max normalize, upsample
    bilinearly, threshold (``"otsu"``, computed per map, or a fixed value in [0, 1]; foreground is
    ``> t``), resolve overlaps by the higher normalized attention, open + close with a 3x3 square
    (``clean``), keep the largest 8-connected component, fill holes; then overlaps are resolved
    again (hole filling can swallow a subject held inside another) and the largest component is
    kept once more. With ``grabcut_image`` (RGB (size, size, 3) uint8 or PIL) and OpenCV
    importable, each mask seeds a GrabCut refinement (kept only when non-empty); without OpenCV
    one warning is logged and the refinement is skipped.

    No mask is empty: an empty one becomes the ``fallback_frac`` most-attended pixels of its map
    (preferring pixels no other subject owns).
    """
    if isinstance(threshold, str) and threshold != "otsu":
        raise InputError(f"threshold must be a number in [0, 1] or 'otsu', not {threshold!r}")
    up = upsample_maps(maps, size)
    K = len(up)
    if K == 0:
        return []
    raw: list[np.ndarray] = []
    for a in up:
        t = otsu_threshold(a) if threshold == "otsu" else float(threshold)
        raw.append(a > t)
    masks = resolve_overlaps(raw, up)
    cleaned = []
    for m in masks:
        if clean:
            m = erode(dilate(dilate(erode(m))))  # open, then close
        cleaned.append(fill_holes(largest_component(m), connectivity=8))
    masks = [largest_component(m) for m in resolve_overlaps(cleaned, up)]

    if grabcut_image is not None:
        refined = _grabcut_all(grabcut_image, masks, size, grabcut_iters)
        if refined is not None:
            masks = resolve_overlaps(refined, up)

    out = []
    for i, m in enumerate(masks):
        if not m.any():
            others = np.zeros_like(m)
            for j, o in enumerate(masks):
                if j != i:
                    others |= o
            m = _top_fraction(up[i], fallback_frac, others)
        out.append(m)
    return out


def _grabcut_all(
    image: np.ndarray | Image.Image, masks: list[np.ndarray], size: int, iters: int
) -> list[np.ndarray] | None:
    """GrabCut each mask on ``image``; None (after one warning) when OpenCV is missing."""
    global _cv2_warned
    try:
        import cv2
    except ImportError:
        if not _cv2_warned:
            log.warning(
                "GrabCut refinement skipped: OpenCV is not installed "
                "(pip install 'dynasyn[cv]' to enable it)"
            )
            _cv2_warned = True
        return None
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    bgr = np.ascontiguousarray(img[..., ::-1].astype(np.uint8))
    out = []
    for m in masks:
        if not m.any():
            out.append(m)
            continue
        gc = np.full(m.shape, cv2.GC_BGD, np.uint8)
        gc[dilate(m, 3)] = cv2.GC_PR_BGD
        gc[m] = cv2.GC_PR_FGD
        gc[erode(m, 3) & m] = cv2.GC_FGD
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(bgr, gc, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
        except cv2.error as e:  # e.g. a mask with no background samples
            log.debug("GrabCut failed (%s); keeping the attention mask", e)
            out.append(m)
            continue
        r = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        r = largest_component(r)
        out.append(r if r.any() else m)
    return out


# ----------------------------------------------------------------------------- SAM


def attention_prompts(
    masks: Sequence[np.ndarray],
    maps: np.ndarray | torch.Tensor | None = None,
    k: int = 1,
) -> list[dict[str, Any]]:
    """SAM prompts per subject: ``{"box": box_of(mask), "points": k attention peaks}``.

    ``masks`` are image-sized (e.g. from :func:`attention_masks`); the peaks of ``maps``
    (K, h, w) are scaled to the masks' size. Without ``maps`` only boxes are given.
    """
    out: list[dict[str, Any]] = []
    for i, m in enumerate(masks):
        m = np.asarray(m, dtype=bool)
        p: dict[str, Any] = {"box": box_of(m) if m.any() else None}
        if maps is not None:
            a = _as_numpy(maps[i])
            H, W = m.shape
            pts = peak_points(a, k)
            h, w = a.shape
            p["points"] = [((x + 0.5) * W / w, (y + 0.5) * H / h) for x, y in pts]
        out.append(p)
    return out


def _parse_prompt(p: Any) -> tuple[list[float] | None, list[list[float]] | None]:
    """A box (4 numbers), a list of (x, y) points, or a mapping with "box" and/or "points"."""
    if isinstance(p, Mapping):
        box, pts = p.get("box"), p.get("points")
    elif len(p) == 4 and all(np.isscalar(v) for v in p):
        box, pts = p, None
    else:
        box, pts = None, p
    box_l = [float(v) for v in box] if box is not None else None
    pts_l = [[float(x), float(y)] for x, y in pts] if pts else None
    if box_l is None and pts_l is None:
        raise InputError("a SAM prompt needs a box or at least one point")
    return box_l, pts_l


def sam_masks(
    image: Image.Image,
    points_or_boxes: Sequence[Any],
    model: Any,
    processor: Any,
    *,
    multimask: bool = True,
    fallback: Sequence[np.ndarray] | None = None,
    resolve: bool = True,
) -> list[np.ndarray]:
    """Step 3 pseudo masks with SAM (the paper's segmenter): one bool (H, W) mask per prompt.

    ``points_or_boxes``: one prompt per subject — a box ``(x0, y0, x1, y1)`` in image pixels, a
    list of positive ``(x, y)`` points, or ``{"box": ..., "points": [...]}`` (see
    :func:`attention_prompts`). ``model`` is a transformers ``SamModel``, ``processor`` its
    ``SamProcessor``. The image is embedded once; each subject is decoded separately and the
    multimask output with the best predicted IoU is kept. With ``resolve`` a pixel claimed by
    several subjects goes to the one with the higher mask logit. An empty result falls back to
    ``fallback[i]`` when given (e.g. the attention mask), else to the prompt's box, else to
    small squares at its points; the fallback takes its pixels from the other subjects' masks
    (unless that would empty one), so the masks stay disjoint.
    """
    image = image.convert("RGB")
    W, H = image.size
    param = next(model.parameters())
    enc = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        emb = model.get_image_embeddings(enc["pixel_values"].to(param.device, param.dtype))
    logits: list[np.ndarray] = []
    parsed = [_parse_prompt(p) for p in points_or_boxes]
    for box, pts in parsed:
        kw: dict[str, Any] = {}
        if box is not None:
            kw["input_boxes"] = [[box]]
        if pts is not None:
            kw["input_points"] = [[pts]]
            kw["input_labels"] = [[[1] * len(pts)]]
        pin = processor(images=image, return_tensors="pt", **kw)
        fwd = {
            k: pin[k].to(param.device)
            for k in ("input_boxes", "input_points", "input_labels")
            if k in pin
        }
        for k in ("input_boxes", "input_points"):
            if k in fwd:
                fwd[k] = fwd[k].to(param.dtype)
        with torch.no_grad():
            out = model(image_embeddings=emb, multimask_output=multimask, **fwd)
        best = int(torch.argmax(out.iou_scores[0, 0]).item())
        pred = out.pred_masks[:, :, best : best + 1].float().cpu()
        up = processor.post_process_masks(
            pred, pin["original_sizes"], pin["reshaped_input_sizes"], binarize=False
        )[0]
        logits.append(up[0, 0].float().numpy().astype(np.float64))
    masks = [lg > 0 for lg in logits]
    if resolve and masks:
        masks = resolve_overlaps(masks, np.stack(logits))
    for i in range(len(masks)):
        if masks[i].any():
            continue
        fb = _sam_fallback(i, parsed[i], fallback, (H, W))
        for j in range(len(masks)):  # the fallback claims its pixels unless that empties j
            if j != i and resolve and (masks[j] & ~fb).any():
                masks[j] = masks[j] & ~fb
        masks[i] = fb
    return masks


def _sam_fallback(
    i: int,
    prompt: tuple[list[float] | None, list[list[float]] | None],
    fallback: Sequence[np.ndarray] | None,
    hw: tuple[int, int],
) -> np.ndarray:
    H, W = hw
    if fallback is not None and np.asarray(fallback[i]).any():
        return np.asarray(fallback[i], dtype=bool).copy()
    m = np.zeros((H, W), dtype=bool)
    box, pts = prompt
    if box is not None:
        x0, x1 = (int(np.clip(round(v), 0, W - 1)) for v in (box[0], box[2]))
        y0, y1 = (int(np.clip(round(v), 0, H - 1)) for v in (box[1], box[3]))
        m[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = True
    else:
        r = max(1, min(H, W) // 20)
        for x, y in pts or []:
            cx, cy = int(np.clip(x, 0, W - 1)), int(np.clip(y, 0, H - 1))
            m[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1] = True
    return m
