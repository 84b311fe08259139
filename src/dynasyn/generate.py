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
from dynasyn.rundir import EMBEDS, EMBEDS_2, LORA_FILE, RUN_INFO, read_run
from dynasyn.tokens import placeholders_in

__all__ = ["EMBEDS", "LORA_FILE", "RUN_INFO", "check_placeholders", "draw_caption",
           "generate_images", "load_run", "make_grid", "mean_shifted_latents", "read_run",
           "run_scene", "save_png", "slug"]


def load_run(run: str | Path, model: str | None = None, device: str = "auto",
             dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline (SDXL runs: StableDiffusionXLPipeline) with the run's
    weights, loaded through stock diffusers calls.

    Full mode: the base pipeline with ``unet/`` and ``text_encoder/`` (SDXL: also
    ``text_encoder_2/``) replaced; LoRA mode: ``pipe.load_lora_weights(run)``; always:
    ``pipe.load_textual_inversion`` of the learned placeholder embeddings (SDXL: once per
    text encoder, with its tokenizer, as diffusers documents for SDXL embeddings). The
    sampler is DDIM. Works from any working directory: the run's files are read from
    ``run``, the base model is ``micro``, a hub id or an absolute path.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dynasyn.models import load_pipeline, pick_device
    from dynasyn.sdxl import is_xl

    run = Path(run)
    info = read_run(run)
    pipe = load_pipeline(model or info["base_model"], dtype=dtype)
    xl = is_xl(pipe)
    if xl != (info.get("architecture", "sd") == "sdxl"):
        raise InputError(f"{run} was trained on {'an SD' if xl else 'an SDXL'} model; pass "
                         f"--model with its base model ({info['base_model']})")
    if info["mode"] == "full":
        pipe.unet = UNet2DConditionModel.from_pretrained(run / "unet", dtype=dtype)
        if (run / "text_encoder").is_dir():
            pipe.text_encoder = CLIPTextModel.from_pretrained(run / "text_encoder", dtype=dtype)
        if xl and (run / "text_encoder_2").is_dir():
            pipe.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                run / "text_encoder_2", dtype=dtype)
    elif info["mode"] == "lora":
        pipe.load_lora_weights(str(run), weight_name=LORA_FILE)
    embeds = load_file(str(run / EMBEDS))
    if xl:
        embeds_2 = load_file(str(run / EMBEDS_2))
        pipe.load_textual_inversion(list(embeds.values()), token=list(embeds.keys()),
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(list(embeds_2.values()), token=list(embeds_2.keys()),
                                    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    else:
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


def run_scene(run: str | Path):
    """The scene a run was trained on (its copy ``RUN/scene``), loaded."""
    from dynasyn.config import load_config
    from dynasyn.rundir import find_run_scene
    from dynasyn.scene import load_scene

    cfg = load_config(Path(run) / "config.yaml")
    return load_scene(find_run_scene(run, cfg.scene, "restore the run's scene copy RUN/scene"),
                      classes=cfg.classes or None)


@torch.no_grad()
def mean_shifted_latents(pipe, scene, subjects: Sequence[int], gamma: float,
                         seed: int) -> torch.Tensor:
    """MuDI's initial noise: ``ε + γ · E(x_mix)``, the Gaussian noise of ``seed`` with its mean
    moved toward the latent of a Seg-Mix composition of ``subjects`` (cut out of the scene,
    pasted at random on white, the composition drawn from ``seed``). Unscaled: the pipeline
    multiplies it by the scheduler's ``init_noise_sigma``. ``subjects`` empty: plain noise."""
    from dynasyn.segmix import compose_subjects

    vae = pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=g)
    if not subjects or gamma == 0:
        return noise
    image, masks = scene.tensors(size * factor)
    canvas, _ = compose_subjects(image, masks, list(subjects), seed)
    dist = vae.encode(canvas[None].to(vae.device, vae.dtype)).latent_dist
    return noise + gamma * (dist.mean.float().cpu() * vae.config.scaling_factor)


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
    mean_shift: float = 0.0,
    scene=None,
) -> list[Path]:
    """Render ``n`` images per prompt (seeds seed…seed+n-1), write PNGs and one grid per prompt.

    ``mean_shift`` γ > 0 starts each image from MuDI's mean-shifted noise
    (:func:`mean_shifted_latents`) of the subjects the prompt names, cut out of ``scene``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    device = pipe.unet.device
    for prompt in tqdm(prompts, desc="generate", disable=not progress):
        images = []
        for j in range(n):
            g = torch.Generator(device="cpu").manual_seed(seed + j)
            latents = None
            if mean_shift:
                subjects = list(dict.fromkeys(placeholders_in(prompt)))
                latents = mean_shifted_latents(pipe, scene, subjects, mean_shift, seed + j)
            im = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                      negative_prompt=negative_prompt, generator=g, latents=latents).images[0]
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
