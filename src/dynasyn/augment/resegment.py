"""The final masks of an augmented item segmented in the image after GSA (``--final-masks``).

GSA (SDEdit at strength 0.7) may move a subject's pose, so the paper segments the *final*
image rather than keeping the pasted subjects' masks. :func:`final_image_maps` reads where the
model sees each subject in that image: the final image is encoded by the VAE, noised to a few
timesteps (fixed noise from the item's seed) and passed once through the UNet with the phrase
prompt, capturing each subject's class-word cross-attention with the store installed on the
UNet (no denoising step is taken). :func:`resegment_masks` turns the maps into masks with the
same Step 3 segmenters as the drafts (:func:`~dynasyn.augment.masks.attention_masks`, refined
by GrabCut on the final image when OpenCV is installed, or SAM prompted by their boxes and
peaks) and checks each against the subject's pasted mask: a mask
that is empty, or whose area is far from the pasted one's (GSA keeps the subject's size), is
*degenerate* and the pasted mask is kept for that subject instead, with the reason recorded.
The masks stay disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynasyn.attention import get_store
from dynasyn.augment.draft import cfg_weights, class_token_spans, run_capturing
from dynasyn.augment.masks import attention_masks, attention_prompts, sam_masks

__all__ = ["AREA_RANGE", "FINAL_MASKS", "TIMESTEPS", "final_image_maps", "grabcut_available",
           "resegment_masks"]

FINAL_MASKS = ("pasted", "resegment")
"""``--final-masks`` values: the pasted subjects' masks, or a segmentation of the final image."""

TIMESTEPS = (500, 600, 700)
"""Training timesteps the final image is noised to for the attention pass (those of
``dynasyn masks``, tuned on micro-world photos, docs/masks.md)."""

AREA_RANGE = (0.25, 4.0)
"""A re-segmented mask whose area is outside this multiple of the pasted mask's is degenerate."""


def grabcut_available() -> bool:
    """Whether the attention masks get GrabCut's refinement (OpenCV importable); part of a
    re-segmented item's cache key, since the masks differ without it."""
    import importlib.util

    return importlib.util.find_spec("cv2") is not None


@torch.no_grad()
def final_image_maps(pipe, image: Image.Image, template: str, phrases: Sequence[str],
                     classes: Sequence[str], seed: int,
                     timesteps: Sequence[int] = TIMESTEPS) -> np.ndarray:
    """Each subject's class-word cross-attention in ``image``: float32 (K, h, w).

    One UNet pass over the image's VAE latent noised to every timestep of ``timesteps``
    (noise drawn from ``seed``), prompted by the phrase rendering of ``template``; the maps of
    the capture layers (``pipe.unet`` must carry :func:`~dynasyn.attention.install_attention_capture`)
    averaged over layers and timesteps.
    """
    from diffusers import DDPMScheduler

    from dynasyn.sdxl import pipe_conditioning

    unet, vae = pipe.unet, pipe.vae
    side = int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    x = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), np.float32)
    x = torch.from_numpy(x / 127.5 - 1.0).permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    g = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(latent.shape, generator=g).to(latent.device, latent.dtype)
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=latent.device)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(
        latent.expand(len(ts), -1, -1, -1), noise.expand(len(ts), -1, -1, -1), ts)
    enc = class_token_spans(pipe.tokenizer, template, phrases, classes)
    cond = pipe_conditioning(pipe, enc.input_ids[None]).to(unet.dtype).repeat(len(ts))
    w = cfg_weights(enc, len(phrases), len(ts), guidance=False).to(unet.device)
    _, maps = run_capturing(
        get_store(unet), w, lambda: unet(noisy.to(unet.dtype), ts, **cond.unet_kwargs()))
    return maps.float().mean(0).cpu().numpy()


def _degenerate(mask: np.ndarray, pasted: np.ndarray, flat: bool) -> str | None:
    """Why a re-segmented mask cannot replace the pasted one, or None when it can."""
    if flat:
        return "flat attention map"
    area, ref = int(mask.sum()), int(pasted.sum())
    if area == 0:
        return "empty segmentation"
    if ref and not AREA_RANGE[0] <= area / ref <= AREA_RANGE[1]:
        return f"area {area / ref:.2f}x the pasted mask's"
    return None


def resegment_masks(image: Image.Image, maps: np.ndarray, pasted: Sequence[np.ndarray],
                    sam: tuple[Any, Any] | None = None, grabcut: bool = True
                    ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """The final masks of one item, segmented in ``image`` (the paper's post-GSA masks).

    ``maps`` (K, h, w) from :func:`final_image_maps`, ``pasted`` the K pasted masks (slot
    order), ``sam`` an optional ``(SamModel, SamProcessor)``; ``grabcut``: refine the attention
    masks by GrabCut on ``image`` (when OpenCV is installed; one warning otherwise). Returns the K disjoint bool
    masks and one record per slot: ``{"source": "resegmented" | "pasted", "reason": why the
    pasted mask was kept (None otherwise), "iou_pasted": IoU of the segmentation with the
    pasted mask}``. A fallback subject takes its pasted pixels from the others' masks, unless
    that would empty one.
    """
    size = image.size[0]
    pasted = [np.asarray(p, dtype=bool) for p in pasted]
    a = np.asarray(maps, dtype=np.float32)
    flat = [not (np.isfinite(m).all() and float(m.max() - m.min()) > 1e-8) for m in a]
    masks = attention_masks(np.nan_to_num(a).clip(min=0), size,
                            grabcut_image=image if grabcut else None)
    if sam is not None:
        model, processor = sam
        masks = sam_masks(image, attention_prompts(masks, a), model, processor, fallback=masks)
    out, info = [], []
    for m, p, f in zip(masks, pasted, flat, strict=True):
        inter, union = int((m & p).sum()), int((m | p).sum())
        why = _degenerate(m, p, f)
        info.append({"source": "pasted" if why else "resegmented", "reason": why,
                     "iou_pasted": round(inter / union, 4) if union else 0.0})
        out.append(p.copy() if why else m)
    for i, rec in enumerate(info):
        if rec["source"] != "pasted":
            continue
        for j in range(len(out)):
            if j != i and info[j]["source"] == "resegmented" and (out[j] & ~out[i]).any():
                out[j] = out[j] & ~out[i]
    return out, info
