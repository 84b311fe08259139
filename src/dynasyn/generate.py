"""Inference with a trained run: load it with stock diffusers calls, render prompts, write grids."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dynasyn.atomic import atomic_file
from dynasyn.errors import InputError
from dynasyn.rundir import EMBEDS, LORA_FILE, RUN_INFO, read_run
from dynasyn.tokens import placeholders_in

__all__ = ["EMBEDS", "LORA_FILE", "RUN_INFO", "check_placeholders", "draw_caption",
           "generate_images", "load_run", "make_grid", "read_run", "save_png", "slug"]


def load_run(run: str | Path, model: str | None = None, device: str = "auto",
             dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline with the run's weights, loaded through stock diffusers calls.

    Full mode: the base pipeline with ``unet/`` and ``text_encoder/`` replaced; LoRA mode:
    ``pipe.load_lora_weights(run)``; always: ``pipe.load_textual_inversion`` of the learned
    placeholder embeddings. The sampler is DDIM. Works from any working directory: the run's
    files are read from ``run``, the base model is ``micro``, a hub id or an absolute path.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from dynasyn.models import load_pipeline, pick_device

    run = Path(run)
    info = read_run(run)
    pipe = load_pipeline(model or info["base_model"], dtype=dtype)
    if info["mode"] == "full":
        pipe.unet = UNet2DConditionModel.from_pretrained(run / "unet", dtype=dtype)
        if (run / "text_encoder").is_dir():
            pipe.text_encoder = CLIPTextModel.from_pretrained(run / "text_encoder", dtype=dtype)
    elif info["mode"] == "lora":
        pipe.load_lora_weights(str(run), weight_name=LORA_FILE)
    embeds = load_file(str(run / EMBEDS))
    pipe.load_textual_inversion(list(embeds.values()), token=list(embeds.keys()))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(device))


def check_placeholders(prompt: str, placeholders: Sequence[str]) -> None:
    """Refuse a prompt that names a placeholder the run does not have."""
    have = {int(re.search(r"\d+", p).group()) for p in placeholders}
    for i in placeholders_in(prompt):
        if i not in have:
            raise InputError(
                f"prompt {prompt!r} names <asset{i}> but this run has only "
                f"{', '.join(placeholders)}; use one of those"
            )


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images row-major into one picture."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def draw_caption(draw: Any, xy: tuple[int, int], text: str, width: int,
                 max_lines: int = 3) -> None:
    """Write ``text`` word-wrapped to ``width`` pixels (PIL's default font, ~6 px a
    character, 11 px a line) at ``xy`` on a ``PIL.ImageDraw`` canvas, at most ``max_lines``."""
    lines, line = [], ""
    for w in text.split():
        if line and len(line) + 1 + len(w) > width // 6:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    for k, ln in enumerate(lines[:max_lines]):
        draw.text((xy[0], xy[1] + 11 * k), ln, fill="black")


def slug(text: str) -> str:
    """File-name form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def generate_images(
    pipe,
    prompts: Sequence[str],
    out: str | Path,
    n: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Render ``n`` images per prompt (seeds seed…seed+n-1), write PNGs and one grid per prompt."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    device = pipe.unet.device
    for prompt in tqdm(prompts, desc="generate", disable=not progress):
        images = []
        for j in range(n):
            g = torch.Generator(device="cpu").manual_seed(seed + j)
            im = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                      negative_prompt=negative_prompt, generator=g).images[0]
            images.append(im)
            p = out / f"{slug(prompt)}_{seed + j}.png"
            save_png(im, p)
            written.append(p)
        grid = out / f"{slug(prompt)}_grid.png"
        save_png(make_grid(images), grid)
        written.append(grid)
    del device
    return written


def save_png(im: Image.Image, path: str | Path) -> None:
    """Write a PNG atomically (a temporary name, then a rename)."""
    with atomic_file(path) as tmp:
        im.save(tmp, format="PNG")
