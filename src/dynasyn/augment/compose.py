"""Compose the original subjects into a draft (the paper's Step 4, before GSA).

Each original subject is cut out of the scene image by its mask, scaled to fit its draft
counterpart's mask box (aspect kept, fit inside, centred in the box by default) and pasted over
the draft with its mask as alpha. Later pastes occlude earlier ones (the earlier pasted masks are
cut to their visible pixels). Pixels of the draft subjects that no pasted subject covers are the
*gaps*: they are inpainted (with the diffusion model by the caller, or here with OpenCV's Telea
method or a pure-numpy harmonic fill) before Guided SDE Augmentation re-noises and denoises the
composed image. :func:`contact_sheet` draws draft → composed → final panels with mask outlines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dynasyn.augment.masks import Box, box_of
from dynasyn.errors import InputError
from dynasyn.imageops import dilate

Anchor = Literal["center", "bottom"]

#: Mask outline colours of :func:`contact_sheet`, subject i gets ``OUTLINE_COLOURS[i % n]``.
OUTLINE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 48, 48),
    (48, 220, 48),
    (64, 128, 255),
    (255, 220, 0),
    (255, 0, 255),
    (0, 230, 230),
    (255, 140, 0),
    (255, 255, 255),
)
#: Height in pixels of the caption strip above each panel of :func:`contact_sheet`.
CAPTION_H = 14
#: Padding in pixels around and between the panels of :func:`contact_sheet`.
SHEET_PAD = 4


def _bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask, dtype=bool)


def cut_subject(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Step 4 cut-out: the RGBA crop of ``image`` tight to ``mask``'s box, and the cropped mask.

    The alpha channel is the mask (255 inside, 0 outside). Raises ``InputError`` when the mask
    is empty or its size differs from the image's.
    """
    m = _bool(mask)
    if m.shape != (image.height, image.width):
        raise InputError(
            f"mask of shape {m.shape} does not match the image size {image.width}x{image.height}"
        )
    if not m.any():
        raise InputError("cannot cut a subject out with an empty mask")
    x0, y0, x1, y1 = box_of(m)
    crop_mask = m[y0:y1, x0:x1].copy()
    rgba = image.convert("RGB").crop((x0, y0, x1, y1)).convert("RGBA")
    rgba.putalpha(Image.fromarray(crop_mask.astype(np.uint8) * 255, "L"))
    return rgba, crop_mask


def fit_size(src_wh: tuple[int, int], box: Box, keep_aspect: bool = True) -> tuple[int, int]:
    """The (width, height) a ``src_wh`` subject is scaled to in ``box``.

    With ``keep_aspect``: scale factor ``s = min(bw / w, bh / h)`` (fit inside), sizes rounded
    and clamped to [1, box side]; else the box's own size (stretch).
    """
    w, h = src_wh
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw <= 0 or bh <= 0:
        raise InputError(f"target box {box} is empty")
    if not keep_aspect:
        return bw, bh
    s = min(bw / w, bh / h)
    return max(1, min(bw, round(w * s))), max(1, min(bh, round(h * s)))


def paste_into_box(
    canvas: Image.Image,
    subject_rgba: Image.Image,
    subject_mask: np.ndarray,
    target_box: Box,
    keep_aspect: bool = True,
    *,
    anchor: Anchor = "center",
    feather: float = 0.0,
) -> tuple[Image.Image, np.ndarray]:
    """Step 4 paste: scale a cut-out subject into ``target_box`` and paste it with its mask.

    The subject is scaled to fit *inside* the box (:func:`fit_size`; aspect kept unless
    ``keep_aspect=False``), centred horizontally, and vertically centred (``anchor="center"``,
    the default) or standing on the box's bottom edge (``anchor="bottom"``). The scaled mask
    (bilinear, then >= 0.5) is the paste's alpha; ``feather`` > 0 blurs that alpha by a Gaussian
    of that radius (the returned mask stays binary). Parts outside the canvas are clipped.

    Returns the new canvas (the input is not modified) and the pasted pixels' bool mask of the
    canvas's size.
    """
    m = _bool(subject_mask)
    if m.shape != (subject_rgba.height, subject_rgba.width):
        raise InputError("subject mask and subject image sizes differ")
    nw, nh = fit_size(subject_rgba.size, target_box, keep_aspect)
    x0, y0, x1, y1 = target_box
    ox = x0 + (x1 - x0 - nw) // 2
    oy = y1 - nh if anchor == "bottom" else y0 + (y1 - y0 - nh) // 2
    rgb = subject_rgba.convert("RGB").resize((nw, nh), Image.LANCZOS)
    scaled = Image.fromarray(m.astype(np.uint8) * 255, "L").resize((nw, nh), Image.BILINEAR)
    small = np.asarray(scaled) >= 128
    if not small.any():  # a subject scaled below a pixel: keep its strongest pixel
        a = np.asarray(scaled)
        small = a == a.max()
    alpha = Image.fromarray(small.astype(np.uint8) * 255, "L")
    if feather > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(feather))
    out = canvas.convert("RGB").copy()
    out.paste(rgb, (ox, oy), alpha)
    W, H = out.size
    pasted = np.zeros((H, W), dtype=bool)
    cx0, cy0 = max(ox, 0), max(oy, 0)
    cx1, cy1 = min(ox + nw, W), min(oy + nh, H)
    if cx1 > cx0 and cy1 > cy0:
        pasted[cy0:cy1, cx0:cx1] = small[cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
    return out, pasted


@dataclass
class ComposeResult:
    """The composed image, the visible pasted pixels per subject, and the gaps to inpaint."""

    image: Image.Image
    pasted_masks: list[np.ndarray]
    gap_mask: np.ndarray
    boxes: list[Box | None] = field(default_factory=list)
    order: list[int] = field(default_factory=list)


def compose(
    draft: Image.Image,
    draft_masks: Sequence[np.ndarray],
    scene_image: Image.Image,
    scene_masks: Sequence[np.ndarray],
    order: Sequence[int] | None = None,
    *,
    keep_aspect: bool = True,
    anchor: Anchor = "center",
    feather: float = 0.0,
    gap_dilate: int = 2,
) -> ComposeResult:
    """Step 4: paste each original subject over its draft counterpart.

    ``draft_masks[i]`` (the draft's pseudo mask) and ``scene_masks[i]`` (the scene's mask) are
    subject i. Subject i is cut from ``scene_image`` and pasted into ``box_of(draft_masks[i])``
    (see :func:`paste_into_box` for scaling and placement). Pasting order: ``order`` when given,
    else larger target boxes first (so smaller subjects stay on top). A later paste occludes
    earlier ones; ``pasted_masks[i]`` holds subject i's *visible* pasted pixels. A subject whose
    draft mask is empty (or that is missing from ``order``) is not pasted (empty pasted mask).

    ``gap_mask`` = pixels of any draft subject's mask not covered by any pasted subject, dilated
    by ``gap_dilate`` pixels (3x3 square each; the dilation may reach 1-2 px into pasted
    subjects' edges so the inpainting blends the seams).
    """
    if len(draft_masks) != len(scene_masks):
        raise InputError(
            f"{len(draft_masks)} draft masks but {len(scene_masks)} scene masks: one each per subject"
        )
    W, H = draft.size
    dm = [_bool(m) for m in draft_masks]
    for m in dm:
        if m.shape != (H, W):
            raise InputError(f"draft mask of shape {m.shape} does not match the draft {W}x{H}")
    boxes: list[Box | None] = [box_of(m) if m.any() else None for m in dm]

    def area(i: int) -> int:
        b = boxes[i]
        return 0 if b is None else (b[2] - b[0]) * (b[3] - b[1])

    if order is None:
        seq = sorted(range(len(dm)), key=lambda i: (-area(i), i))
    else:
        seq = [int(i) for i in order]
        if sorted(set(seq)) != sorted(seq) or any(not 0 <= i < len(dm) for i in seq):
            raise InputError(f"order {list(order)} must list distinct subject indices < {len(dm)}")
    canvas = draft.convert("RGB").copy()
    pasted = [np.zeros((H, W), dtype=bool) for _ in dm]
    done: list[int] = []
    for i in seq:
        box = boxes[i]
        if box is None:
            continue
        rgba, cm = cut_subject(scene_image, scene_masks[i])
        canvas, pm = paste_into_box(
            canvas, rgba, cm, box, keep_aspect, anchor=anchor, feather=feather
        )
        for j in done:
            pasted[j] &= ~pm
        pasted[i] = pm
        done.append(i)
    covered = np.zeros((H, W), dtype=bool)
    for p in pasted:
        covered |= p
    want = np.zeros((H, W), dtype=bool)
    for m in dm:
        want |= m
    gap = want & ~covered
    if gap.any() and gap_dilate > 0:
        gap = dilate(gap, gap_dilate)
    return ComposeResult(canvas, pasted, gap, boxes, done)


# ----------------------------------------------------------------------------- inpainting


def inpaint_cv2(image: Image.Image, gap_mask: np.ndarray, radius: int = 3) -> Image.Image:
    """Fill ``gap_mask`` with OpenCV's Telea inpainting (fast; the ``cv2`` inpainter)."""
    try:
        import cv2
    except ImportError as e:
        raise InputError(
            "the cv2 inpainter needs OpenCV: install opencv-python-headless "
            "(pip install 'dynasyn[cv]'), or use another inpainter"
        ) from e
    m = _bool(gap_mask)
    rgb = np.asarray(image.convert("RGB"))
    if m.shape != rgb.shape[:2]:
        raise InputError(f"gap mask of shape {m.shape} does not match the image")
    if not m.any():
        return image.convert("RGB").copy()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    out = cv2.inpaint(bgr, m.astype(np.uint8) * 255, float(radius), cv2.INPAINT_TELEA)
    return Image.fromarray(np.ascontiguousarray(out[..., ::-1]))


def inpaint_diffuse(image: Image.Image, gap_mask: np.ndarray, iters: int = 40) -> Image.Image:
    """Fill ``gap_mask`` by harmonic interpolation (pure numpy; no OpenCV needed).

    Multigrid: the known pixels are averaged down by 2x2 blocks until the hole is small, the
    coarsest unknowns start at the mean of the known pixels, and each finer level starts from
    the coarser solution and runs ``iters`` Jacobi sweeps (each unknown pixel := mean of its 4
    neighbours; known pixels fixed). A hole in a constant region is filled with that constant;
    a hole in a linear ramp with the ramp. An image with no known pixel becomes mid grey.
    """
    m = _bool(gap_mask)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    if m.shape != rgb.shape[:2]:
        raise InputError(f"gap mask of shape {m.shape} does not match the image")
    if not m.any():
        return image.convert("RGB").copy()
    if m.all():
        return Image.new("RGB", image.size, (128, 128, 128))
    filled = _harmonic(rgb, ~m, iters)
    return Image.fromarray(np.clip(np.rint(filled), 0, 255).astype(np.uint8))


def _harmonic(img: np.ndarray, known: np.ndarray, iters: int) -> np.ndarray:
    H, W = known.shape
    unknown = ~known
    out = np.where(known[..., None], img, 0.0)
    if min(H, W) > 4 and unknown.sum() > 16:
        # restrict: 2x2 block means of the known pixels
        H2, W2 = (H + 1) // 2, (W + 1) // 2
        wts = np.zeros((2 * H2, 2 * W2))
        val = np.zeros((2 * H2, 2 * W2, img.shape[2]))
        wts[:H, :W] = known
        val[:H, :W] = out
        cw = wts.reshape(H2, 2, W2, 2).sum(axis=(1, 3))
        cv = val.reshape(H2, 2, W2, 2, -1).sum(axis=(1, 3))
        ck = cw > 0
        coarse = np.where(ck[..., None], cv / np.maximum(cw, 1)[..., None], 0.0)
        coarse = _harmonic(coarse, ck, iters)
        init = coarse.repeat(2, axis=0).repeat(2, axis=1)[:H, :W]
    else:
        init = np.broadcast_to(img[known].mean(axis=0), img.shape)
    out = np.where(unknown[..., None], init, img)
    for _ in range(iters):
        p = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        avg = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 4.0
        out = np.where(unknown[..., None], avg, out)
    return out


def inpaint(
    image: Image.Image,
    gap_mask: np.ndarray,
    method: Literal["auto", "cv2", "diffuse"] = "auto",
    radius: int = 3,
) -> Image.Image:
    """Fast gap filling: OpenCV Telea when ``method="cv2"`` (or ``"auto"`` with OpenCV
    installed), else :func:`inpaint_diffuse`."""
    if method == "diffuse":
        return inpaint_diffuse(image, gap_mask)
    if method == "auto":
        try:
            import cv2  # noqa: F401
        except ImportError:
            return inpaint_diffuse(image, gap_mask)
    return inpaint_cv2(image, gap_mask, radius)


# ----------------------------------------------------------------------------- contact sheet


def contact_sheet_size(sizes: Sequence[tuple[int, int]], scale: int = 2) -> tuple[int, int]:
    """The (width, height) :func:`contact_sheet` gives for panels of image ``sizes`` (w, h):
    ``width = PAD + sum(w * scale + PAD)``, ``height = PAD + CAPTION_H + max(h * scale) + PAD``.
    """
    width = SHEET_PAD + sum(w * scale + SHEET_PAD for w, _ in sizes)
    height = SHEET_PAD + CAPTION_H + max((h * scale for _, h in sizes), default=0) + SHEET_PAD
    return width, height


def contact_sheet(
    panels: Sequence[tuple[str, Image.Image, Sequence[np.ndarray] | None]],
    scale: int = 2,
) -> Image.Image:
    """Panels side by side (e.g. draft → composed → final), each upscaled by ``scale``
    (nearest), with a caption above it (PIL's default font) and subject i's mask outlined in
    ``OUTLINE_COLOURS[i]``. Masks of another size than their image are resized (nearest).
    The sheet's size is :func:`contact_sheet_size`."""
    if scale < 1:
        raise InputError(f"contact sheet scale must be >= 1, got {scale}")
    sizes = [img.size for _, img, _ in panels]
    sheet = Image.new("RGB", contact_sheet_size(sizes, scale), (32, 32, 32))
    font = ImageFont.load_default()
    x = SHEET_PAD
    thick = max(1, scale // 2 + scale % 2)
    for caption, img, masks in panels:
        w, h = img.size[0] * scale, img.size[1] * scale
        big = np.array(img.convert("RGB").resize((w, h), Image.NEAREST))
        for i, mk in enumerate(masks or []):
            mm = Image.fromarray(_bool(mk).astype(np.uint8) * 255, "L").resize((w, h), Image.NEAREST)
            m = np.asarray(mm) > 0
            inner = m.copy()
            for _ in range(thick):
                p = np.pad(inner, 1, constant_values=False)
                inner = (
                    inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
                )
            big[m & ~inner] = OUTLINE_COLOURS[i % len(OUTLINE_COLOURS)]
        strip = Image.new("RGB", (w, CAPTION_H), (32, 32, 32))
        ImageDraw.Draw(strip).text((1, 1), caption, fill=(235, 235, 235), font=font)
        sheet.paste(strip, (x, SHEET_PAD))
        sheet.paste(Image.fromarray(big), (x, SHEET_PAD + CAPTION_H))
        x += w + SHEET_PAD
    return sheet
