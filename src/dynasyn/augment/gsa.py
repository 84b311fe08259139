"""Step 4 (image side): diffusion inpainting of the gaps and Guided SDE Augmentation (GSA).

Both reuse the personalization model's own components through stock diffusers pipelines
(``AutoPipelineForInpainting`` / ``AutoPipelineForImage2Image.from_pipe``: the SD or SDXL
class that matches the model): the inpainting pipeline over a 4-channel (non-inpainting) UNet
performs mask-blended sampling (known pixels are re-imposed at every step), and the
image-to-image pipeline is SDEdit: noise the image to ``strength`` and denoise with the prompt.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dynasyn.attention import get_store
from dynasyn.augment.draft import cfg_weights, class_token_spans, run_capturing


@torch.no_grad()
def inpaint_diffusion(pipe, image: Image.Image, gap_mask: np.ndarray, prompt: str, seed: int,
                      steps: int = 25, guidance: float = 7.5, inpaint_pipe=None) -> Image.Image:
    """Fill ``gap_mask`` (True = repaint) with the diffusion model, keeping all other pixels.

    ``inpaint_pipe`` may be a dedicated SD inpainting checkpoint; by default the model's own
    components are used with mask blending.
    """
    from diffusers import AutoPipelineForInpainting

    ip = inpaint_pipe or AutoPipelineForInpainting.from_pipe(pipe)
    ip.set_progress_bar_config(disable=True)
    size = image.size
    mask = Image.fromarray((np.asarray(gap_mask) > 0).astype(np.uint8) * 255, "L")
    out = ip(prompt, image=image, mask_image=mask, strength=1.0, num_inference_steps=steps,
             guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
             height=size[1], width=size[0]).images[0]
    # outside the gaps the composed pixels are kept exactly
    keep = ~(np.asarray(gap_mask) > 0)
    arr = np.asarray(out).copy()
    arr[keep] = np.asarray(image)[keep]
    return Image.fromarray(arr)


@torch.no_grad()
def guided_sde_augmentation(
    pipe,
    image: Image.Image,
    template: str,
    phrases: list[str],
    classes: list[str],
    seed: int,
    strength: float = 0.7,
    steps: int = 50,
    guidance: float = 7.5,
    sampler: str = "ddim",
) -> tuple[Image.Image, np.ndarray]:
    """GSA (the paper's Guided SDE Augmentation, SDEdit): noise to ``strength`` and denoise.

    ``strength`` 0.7 is the paper's 700 of 1000 forward steps; the last ``int(steps ×
    strength)`` steps of a ``steps``-step schedule run, guided by the phrase prompt.
    ``sampler``: ``ddim`` (deterministic DDIM; 50 → 35 steps) or ``sde`` (the paper's
    stochastic reverse SDE, discretized as DDPM ancestral sampling: fresh noise at every
    step; ``steps`` 1000 → the paper's 700). Returns the image and the class-token attention
    maps (K, h, w) captured while denoising (stored beside each item for inspection).
    """
    from diffusers import AutoPipelineForImage2Image, DDIMScheduler, DDPMScheduler

    sched = DDPMScheduler if sampler == "sde" else DDIMScheduler
    i2i = AutoPipelineForImage2Image.from_pipe(pipe, scheduler=sched.from_config(
        pipe.scheduler.config))
    i2i.set_progress_bar_config(disable=True)
    enc = class_token_spans(pipe.tokenizer, template, phrases, classes)
    w = cfg_weights(enc, len(phrases), 1, guidance > 1).to(pipe.unet.device)
    g = torch.Generator().manual_seed(seed)
    out, maps = run_capturing(
        get_store(pipe.unet), w,
        lambda: i2i(enc.text, image=image, strength=strength, num_inference_steps=steps,
                    guidance_scale=guidance, generator=g),
    )
    return out.images[0], maps[-1].float().cpu().numpy()
