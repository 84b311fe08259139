r"""Train the micro models from scratch on the micro world: VAE, micro CLIP, micro SD.

Three stages, run in this order by ``--stage all`` (the default):

1. ``vae`` — the AutoencoderKL (:func:`~dynasyn.micro.models.micro_vae`) on world renders:
   L1 + MSE (subject pixels, from the renders' masks, weigh 5x) + L1 of image gradients
   (keeps the flat colours' edges sharp without a perceptual network) + a small KL term
   (weight 1e-5 on the per-element KL), fp32. At the end the latent
   scaling factor (1 / std of posterior samples of 1,024 renders) goes into the VAE config, as
   SD's ``scaling_factor``, and reconstructions of held-out renders are read back by the parser
   (colour + class of every subject) as a sanity number.
2. ``clip`` — micro CLIP (:func:`~dynasyn.micro.models.micro_clip`), contrastive (symmetric
   InfoNCE) on world image/caption pairs; every image also competes against *hard negative*
   captions that differ from its own in one attribute (class, colour, pattern, action,
   relation, background — :func:`dynasyn.micro.world.distractor`) and, for pairs, the caption
   with the two colours swapped (binding). Patterns get more (:func:`hard_negatives`): a
   pattern negative for every subject and, with two or three subjects, two subjects' patterns
   swapped. Captions are full identity phrases (70 %), class nouns (15 %) or colour + noun
   (15 %); identical strings are never counted as negatives.
3. ``unet`` — micro SD: the UNet (:func:`~dynasyn.micro.models.micro_unet`) from scratch and the
   text encoder *initialized from micro CLIP's text tower* (same config) and trained jointly
   with it at a lower learning rate (1e-4 vs 5e-4): the contrastive tower already separates
   the attributes, joint training adapts its per-token states to cross-attention. Latents come
   from the trained VAE (frozen; posterior samples x scaling factor), epsilon objective with
   Min-SNR-5 weighting, SD's noise schedule, 10 % empty captions (classifier-free guidance),
   20 % class-noun and 10 % colour + noun captions. The exported weights are an EMA (0.999).

One more stage runs only by name (``--stage decoder``, not part of ``all``):

4. ``decoder`` — the VAE's decoder fine-tuned on its frozen encoder's latents, as Stable
   Diffusion's ft-MSE VAE was: the latents (and the scaling factor) the UNet learned on do not
   change, so a finished UNet keeps working and decodes sharper. It starts from the VAE of the
   ``unet`` stage of the same ``--work`` (else the ``vae`` stage's, else the bundle's) and uses
   the ``vae`` stage's reconstruction loss without the KL term. The bundle takes its VAE only
   when its encoder equals the UNet's (:func:`export_bundle`).

**Continuations** (``--from-bundle``): a stage starts from the bundled weights under ``--out``
instead of from scratch: a new run with a fresh optimizer (warm-up, cosine decay), its world
seeds and step noise shifted by ``--continuation`` (default 1) x
:data:`CONTINUATION_SEED_OFFSET`, so each continuation of a bundle trains on scenes no earlier
run saw, usually with a lower ``--lr``. Use another ``--work`` than the run that built the
bundle (or ``--fresh``, which deletes that stage's checkpoints there).

Data is rendered on the fly and fully determined by the step: training seeds are
``< 10**9`` (held-out checks use seeds ``>= 10**9``, :mod:`dynasyn.micro.check`); the noise of
step ``s`` comes from a generator seeded with ``s``. AdamW, linear warm-up, then cosine decay to
10 % over the run's *progress* = max(step / steps, elapsed / time budget), so a run stopped by
``--minutes`` still anneals. Checkpoints (weights + optimizer state + EMA, safetensors only)
every ``--ckpt-minutes`` under ``--work``/<stage>/checkpoints; ``--resume`` continues a killed
run (step count, time used and learning-rate schedule included). Finished stages export fp32
models to ``--work``/<stage>/final; the last step writes the fp16 bundle
(:func:`~dynasyn.micro.models.save_bundle`) into ``--out``: ``sd/`` (diffusers
StableDiffusionPipeline) and ``clip/`` (transformers CLIPModel + tokenizer + image processor).

Measured on the shared 2-core CPU (AMD EPYC, torch 2.13, fp32; 12 steps per stage with the
first two left out, while the machine was quiet — other jobs on it made single steps 3-10x
slower at times, which ``--minutes`` absorbs: a stage then stops early and anneals on time).
The training loop (data, EMA, logging, checkpoints) adds about 5 %:

=====  =====  ==========  ===============  ===========
stage  batch  s / step    planned steps    time share
=====  =====  ==========  ===============  ===========
vae    16     0.59        2,500            25 min
clip   64     0.29        4,000            20 min
unet   32     0.75        5,800            72 min
=====  =====  ==========  ===============  ===========

(vae at batch 32: 1.25 s/step; bf16 autocast and channels-last gave nothing on this CPU.)
A first plan (VAE 1,200 steps) gave a VAE whose reconstructions lost patterns and small
shapes (51 % of held-out subjects parsed back), so the VAE got twice the time.
Total 117 min of training plus about a minute of exports. The full CPU training, the
command that builds the bundled weights (``src/dynasyn/micro/weights/``), with the
continuations the bundle then got (micro CLIP to 5,500 steps; the UNet + text encoder five
times, for 45, 92.5, 40, 85 and 112 more minutes; micro CLIP from the bundle for 45 more minutes,
with the extra pattern negatives; see the README's "The micro world" for what each
measured)::

    python -m dynasyn.micro.train --stage all --minutes 117 --device cpu
    python -m dynasyn.micro.train --stage clip --resume --steps 5500 --minutes 32 --device cpu
    python -m dynasyn.micro.train --stage unet --from-bundle --lr 2e-4 --compile \
        --minutes 45 --device cpu --work runs/micro-continue
    python -m dynasyn.micro.train --stage unet --from-bundle --continuation 2 --lr 2e-4 \
        --compile --minutes 100 --device cpu --work runs/micro-continue-2
    python -m dynasyn.micro.train --stage unet --from-bundle --continuation 3 --lr 2e-4 \
        --compile --minutes 40 --device cpu --work runs/micro-continue-3
    python -m dynasyn.micro.train --stage unet --from-bundle --continuation 4 --lr 2e-4 \
        --compile --minutes 85 --device cpu --work runs/micro-continue-4
    python -m dynasyn.micro.train --stage clip --from-bundle --lr 3e-4 --steps 12000 \
        --minutes 45 --device cpu --work runs/micro-clip-continue
    python -m dynasyn.micro.train --stage unet --from-bundle --continuation 5 --lr 2e-4 \
        --compile --minutes 112 --device cpu --work runs/micro-continue-5

(the second of the UNet continuations stopped at the plan's 5,800 steps, after 92.5 min).

A killed run continues with the same command plus ``--resume`` (Ctrl-C writes a checkpoint
first). ``--minutes`` is the total budget of the stages run, shared in proportion to the
planned times (time a stage leaves unused goes to the next ones); a stage stops at its step
count or its share of the time, whichever comes first. On a GPU (``--device cuda``; not
measured here) the planned steps take minutes; more steps (``--steps N`` for every stage, or
one ``--stage`` at a time) give better models; ``--compile`` runs the UNet through
``torch.compile`` (unet stage; its step 1.28x faster on this CPU, after about 2.5 min of
compiling). Quick look at the result:
``python -m dynasyn.micro.check`` (the quality gates) and ``runs/micro-train/unet/final/
samples.png`` (a preview grid).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dynasyn.checkpoint import list_checkpoints, load_optimizer, read_checkpoint, write_checkpoint
from dynasyn.micro.models import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_TOKENS,
    micro_clip,
    micro_tokenizer,
    micro_unet,
    micro_vae,
    micro_weights_path,
    save_bundle,
    text_encoder_from_clip,
)
from dynasyn.micro.world import (
    PATTERNS,
    Identity,
    SceneSpec,
    caption_for,
    distractor,
    sample_dataset_item,
    sample_render,
)

__all__ = [
    "HELDOUT_SEED",
    "PLAN",
    "STAGES",
    "MAX_CONTINUATION",
    "TRAIN_SEED_LIMIT",
    "StagePlan",
    "export_bundle",
    "main",
    "train",
    "train_stage",
]

STAGES: tuple[str, ...] = ("vae", "clip", "unet")
"""Training stages in order (``--stage all``)."""

EXTRA_STAGES: tuple[str, ...] = ("decoder",)
"""Stages run only by name: ``decoder`` fine-tunes the VAE's decoder on the frozen encoder's
latents (after ``unet``: the latents the UNet learned stay the same)."""

CONTINUATION_SEED_OFFSET = 50_000_000
"""``--from-bundle`` runs draw their world seeds (and step noise) ``--continuation`` times this
far from a fresh run's, so a continuation sees scenes the bundled weights were not trained on
(the second continuation of a bundle passes ``--continuation 2``, and so on)."""

MAX_CONTINUATION = 5
"""Continuations 1 .. 5 keep a stage's seeds inside its own 300,000,000-wide band."""

TRAIN_SEED_LIMIT = 10**9
"""Training renders use seeds below this; held-out checks use seeds from it on."""

HELDOUT_SEED = 10**9
"""First held-out seed (see :mod:`dynasyn.micro.check`)."""

NEGATIVE_ATTRIBUTES: tuple[str, ...] = (
    "shape",
    "colour",
    "pattern",
    "action",
    "relation",
    "background",
)
"""Attributes a hard-negative caption changes (one each)."""


@dataclass(frozen=True)
class StagePlan:
    """Defaults of one stage: batch, step count, learning rate, share of a time budget."""

    batch: int
    steps: int
    lr: float
    share: float
    seed_base: int


PLAN: dict[str, StagePlan] = {
    "vae": StagePlan(batch=16, steps=2500, lr=1e-3, share=25.0, seed_base=0),
    "clip": StagePlan(batch=64, steps=4000, lr=5e-4, share=20.0, seed_base=300_000_000),
    "unet": StagePlan(batch=32, steps=5800, lr=5e-4, share=72.0, seed_base=600_000_000),
    "decoder": StagePlan(batch=16, steps=2000, lr=3e-4, share=20.0, seed_base=900_000_000),
}
"""The planned ≤ 2 hour CPU run (see the module docstring for the measurements)."""

TEXT_LR = 1e-4
"""Learning rate of the text encoder in the ``unet`` stage (initialized from micro CLIP)."""

EMA_DECAY = 0.999
"""EMA decay of the UNet and text encoder weights (with the usual (1+s)/(10+s) warm-up)."""

MIN_SNR_GAMMA = 5.0
"""Min-SNR loss weighting of the ``unet`` stage."""

VAE_KL_WEIGHT = 1e-5
"""Weight of the per-element KL term of the ``vae`` stage."""

VAE_SUBJECT_WEIGHT = 4.0
"""Extra reconstruction weight of subject pixels (the renders' masks): subjects cover a small
part of the image but carry everything the captions say (colour, pattern, class)."""


# --------------------------------------------------------------------------------------------
# Data: batch ``step`` of a stage is a pure function of (stage, step, batch size)


def batch_seeds(stage: str, step: int, batch: int, offset: int = 0) -> list[int]:
    """World seeds of batch ``step`` of ``stage`` (all below :data:`TRAIN_SEED_LIMIT`);
    ``offset`` shifts them (:data:`CONTINUATION_SEED_OFFSET` for ``--from-bundle`` runs)."""
    base = PLAN[stage].seed_base + offset
    return [(base + step * batch + i) % TRAIN_SEED_LIMIT for i in range(batch)]


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1] (the VAE's range)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, 64, 64) -> micro CLIP's normalized pixel values.

    The same numbers ``CLIPImageProcessor`` (saved with the bundle) gives for 64x64 images.
    """
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1.0) / 2.0 - mean) / std


class VaeBatches(Dataset):
    """Batch ``step``: ``pixels`` (B, 3, 64, 64) in [-1, 1] and the per-pixel loss ``weight``
    (B, 1, 64, 64): 1 on the background, 1 + :data:`VAE_SUBJECT_WEIGHT` on subjects."""

    def __init__(self, batch: int, stage: str = "vae", offset: int = 0) -> None:
        self.batch = batch
        self.stage = stage
        self.offset = offset

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        seeds = batch_seeds(self.stage, step, self.batch, self.offset)
        renders = [sample_render(s) for s in seeds]
        fg = np.stack([np.any(np.stack(r.masks), axis=0) for r in renders])
        weight = 1.0 + VAE_SUBJECT_WEIGHT * torch.from_numpy(fg).float()[:, None]
        return {"pixels": images_to_tensor([r.image for r in renders]), "weight": weight}


def _caption_mode(seed: int) -> str:
    x = np.random.default_rng([seed, 3]).random()
    return "phrase" if x < 0.7 else ("class" if x < 0.85 else "colour")


def hard_negatives(spec: SceneSpec, mode: str, rng: np.random.Generator) -> list[str]:
    """Captions (in ``mode``) differing from ``spec``'s in one attribute, plus the colour swap
    of a pair; duplicates of the true caption and differences the render cannot show (colour
    in grayscale, pattern in grayscale or sketch) are left out.

    Patterns, the attribute micro CLIP learned last (small subjects show a few pixels of
    them), get more: every subject of a scene gets a pattern negative of its own (not only
    one random subject), and a scene of two or three subjects also the caption with the
    patterns of two subjects swapped (binding, as the colour swap)."""
    true = caption_for(spec, mode)
    hidden = {"grayscale": {"colour", "pattern"}, "sketch": {"pattern"}}.get(spec.background, set())
    out: list[str] = []
    for attr in NEGATIVE_ATTRIBUTES:
        if attr in hidden:
            continue
        d = distractor(spec, attr, rng)
        if d is not None:
            out.append(caption_for(d, mode))
    if len(spec.subjects) == 2 and mode != "class" and "colour" not in hidden:
        a, b = spec.subjects
        swapped = (Identity(a.shape, b.colour, a.pattern), Identity(b.shape, a.colour, b.pattern))
        out.append(caption_for(replace(spec, subjects=swapped), mode))
    if mode == "phrase" and "pattern" not in hidden:
        out.extend(caption_for(d, mode) for d in _pattern_negatives(spec, rng))
    return [c for c in dict.fromkeys(out) if c != true]


def _pattern_negatives(spec: SceneSpec, rng: np.random.Generator) -> list[SceneSpec]:
    """``spec`` with one subject's pattern changed, for every subject; and, with two or three
    subjects, the patterns of a random pair of subjects whose patterns differ swapped."""
    subjects = spec.subjects
    out = []
    for i, s in enumerate(subjects):
        options = [p for p in PATTERNS if p != s.pattern]
        changed = list(subjects)
        changed[i] = Identity(s.shape, s.colour, options[rng.integers(len(options))])
        out.append(replace(spec, subjects=tuple(changed)))
    pairs = [(i, j) for i in range(len(subjects)) for j in range(i + 1, len(subjects))
             if subjects[i].pattern != subjects[j].pattern]
    if pairs:
        i, j = pairs[rng.integers(len(pairs))]
        swapped = list(subjects)
        swapped[i] = Identity(subjects[i].shape, subjects[i].colour, subjects[j].pattern)
        swapped[j] = Identity(subjects[j].shape, subjects[j].colour, subjects[i].pattern)
        out.append(replace(spec, subjects=tuple(swapped)))
    return out


class ClipBatches(Dataset):
    """Batch ``step``: images, their captions then hard negatives (tokenized), and masks.

    ``i2t_mask[i, j]`` / ``t2i_mask[i, j]`` are True where text ``j`` is the same string as
    image ``i``'s caption (other than ``j == i``): such pairs are not negatives.
    """

    def __init__(self, batch: int, tokenizer: Any, offset: int = 0) -> None:
        self.batch = batch
        self.tokenizer = tokenizer
        self.offset = offset

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        seeds = batch_seeds("clip", step, self.batch, self.offset)
        images, captions, negatives = [], [], []
        for s in seeds:
            r = sample_render(s)
            mode = _caption_mode(s)
            images.append(r.image)
            captions.append(r.caption(mode))
            negatives.extend(hard_negatives(r.spec, mode, np.random.default_rng([s, 4])))
        texts = captions + negatives
        ids = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).input_ids
        index: dict[str, int] = {}
        uid = torch.tensor([index.setdefault(t, len(index)) for t in texts])
        b = len(captions)
        same = uid[None, :] == uid[:b, None]
        same[torch.arange(b), torch.arange(b)] = False
        return {
            "pixels": clip_pixels(images_to_tensor(images)),
            "input_ids": ids,
            "i2t_mask": same,
            "t2i_mask": same[:, :b],
        }


class UnetBatches(Dataset):
    """Batch ``step``: ``pixels`` in [-1, 1] and caption ``input_ids`` padded to 32 tokens
    (exactly as ``StableDiffusionPipeline`` tokenizes prompts)."""

    def __init__(self, batch: int, tokenizer: Any, offset: int = 0) -> None:
        self.batch = batch
        self.tokenizer = tokenizer
        self.offset = offset

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        seeds = batch_seeds("unet", step, self.batch, self.offset)
        items = [sample_dataset_item(s, p_empty=0.1, p_class=0.2, p_colour=0.1) for s in seeds]
        ids = self.tokenizer(
            [c for _, c in items],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return {"pixels": images_to_tensor([im for im, _ in items]), "input_ids": ids}


# --------------------------------------------------------------------------------------------
# Stages


class Ema:
    """Exponential moving average of some modules' parameters (kept in fp32)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float = EMA_DECAY) -> None:
        self.modules = modules
        self.decay = decay
        self.shadow = {
            f"{m}.{k}": p.detach().clone()
            for m, mod in modules.items()
            for k, p in mod.named_parameters()
        }

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the current parameters in (decay warms up as (1 + step) / (10 + step))."""
        d = min(self.decay, (1 + step) / (10 + step))
        for m, mod in self.modules.items():
            for k, p in mod.named_parameters():
                self.shadow[f"{m}.{k}"].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the modules' parameters with the averages."""
        for m, mod in self.modules.items():
            for k, p in mod.named_parameters():
                p.copy_(self.shadow[f"{m}.{k}"])


class Stage:
    """One training stage: models, optimizer groups, loss, export."""

    name = ""

    def __init__(self, batch: int, device: torch.device, work: Path, out: Path) -> None:
        self.batch = batch
        self.device = device
        self.work = work
        self.out = out
        self.ema: Ema | None = None
        self.seed_offset = 0
        """Shift of the world seeds (:data:`CONTINUATION_SEED_OFFSET` when continuing)."""
        self.eval_samples = 1024
        """Renders for the VAE's scaling factor (1/16 of them for its parse check)."""
        self.preview_steps = 25
        """DDIM steps of the preview grid after the ``unet`` stage (0: none)."""

    def trained(self) -> dict[str, torch.nn.Module]:
        """Modules whose weights are checkpointed."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW parameter groups (each with its base ``lr``)."""
        raise NotImplementedError

    def load_bundle(self) -> None:
        """Start the trained modules from the bundle under ``out`` (``--from-bundle``)."""
        raise SystemExit(f"--from-bundle: the {self.name} stage cannot continue a bundle")

    def compile(self) -> None:
        """``torch.compile`` the stage's heaviest module in place (``--compile``)."""

    def dataset(self) -> Dataset:
        """Batches indexed by step."""
        raise NotImplementedError

    def loss(
        self, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch and numbers to log."""
        raise NotImplementedError

    def export(self, final: Path) -> None:
        """Write the trained model(s) in fp32 to ``final``."""
        raise NotImplementedError


class VaeStage(Stage):
    """AutoencoderKL: L1 + MSE + gradient L1 + small KL."""

    name = "vae"

    def __init__(self, batch: int, device: torch.device, work: Path, out: Path) -> None:
        super().__init__(batch, device, work, out)
        torch.manual_seed(0)
        self.vae = micro_vae().to(device)

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.vae.parameters()), "lr": lr, "weight_decay": 0.0}]

    def dataset(self) -> Dataset:
        return VaeBatches(self.batch, offset=self.seed_offset)

    def loss(
        self, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["pixels"]
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample(generator=gen)).sample
        loss, l1 = reconstruction_loss(rec, x, batch["weight"])
        kl = post.kl().mean() / post.mean[0].numel()
        return loss + VAE_KL_WEIGHT * kl, {"l1": l1.item(), "kl": kl.item()}

    def load_bundle(self) -> None:
        from diffusers import AutoencoderKL

        bundled = AutoencoderKL.from_pretrained(_bundle_part(self.out, "sd", "vae")).float()
        self.vae.load_state_dict(bundled.state_dict())

    @torch.no_grad()
    def export(self, final: Path) -> None:
        self.vae.eval()
        sf = latent_scaling_factor(self.vae, self.device, self.eval_samples)
        self.vae.register_to_config(scaling_factor=sf)
        acc = vae_parse_accuracy(self.vae, self.device, max(4, self.eval_samples // 16))
        print(f"vae: latent scaling factor {sf:.4f}; held-out reconstructions parse back to "
              f"the right colour + class for {100 * acc:.1f} % of subjects", flush=True)
        self.vae.save_pretrained(final, safe_serialization=True)


def reconstruction_loss(
    rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's reconstruction loss: pixel-weighted L1 + MSE (``weight`` normalized to mean
    1) + 0.5 x L1 of the image gradients. Returns (loss, weighted L1)."""
    w = weight / weight.mean()
    l1 = (w * (rec - x).abs()).mean()
    mse = (w * (rec - x) ** 2).mean()
    gx = ((rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])).abs().mean()
    gy = ((rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs().mean()
    return l1 + mse + 0.5 * (gx + gy), l1


BUNDLE_PARTS: dict[str, tuple[str, ...]] = {
    "vae": ("sd", "vae"), "clip": ("clip",), "unet": ("sd", "unet"), "decoder": (),
}
"""What ``--from-bundle`` continues, per stage (the decoder starts from a trained VAE anyway)."""


def _bundle_part(out: Path, *parts: str) -> Path:
    p = out.joinpath(*parts)
    if not (p / "config.json").exists():
        raise SystemExit(f"--from-bundle: no bundled model at {p} (build the bundle first or "
                         "pass --out DIR)")
    return p


class DecoderStage(Stage):
    """Decoder fine-tuning (as SD's ft-MSE VAE): the encoder and ``quant_conv`` stay frozen,
    so the latents (and the scaling factor) the UNet learned on do not change; the decoder
    and ``post_quant_conv`` train on posterior samples with the ``vae`` stage's
    reconstruction loss. Starts from the VAE of the ``unet`` stage (``work/unet/final``), else
    of the ``vae`` stage, else the bundle's."""

    name = "decoder"

    def __init__(self, batch: int, device: torch.device, work: Path, out: Path) -> None:
        super().__init__(batch, device, work, out)
        from diffusers import AutoencoderKL

        src = work / "unet" / "final" / "vae"
        if (src / "config.json").exists():
            self.vae = AutoencoderKL.from_pretrained(src).float()
        else:
            self.vae = load_trained_vae(work, out)
        self.vae.to(device)
        self.vae.encoder.requires_grad_(False)
        if self.vae.quant_conv is not None:
            self.vae.quant_conv.requires_grad_(False)

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.vae.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": 0.0}]

    def load_bundle(self) -> None:
        pass  # it always starts from a trained VAE

    def dataset(self) -> Dataset:
        return VaeBatches(self.batch, "decoder", self.seed_offset)

    def loss(
        self, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self.vae.encoder.eval()  # frozen (it has no dropout / batch norm; kept exact)
        x = batch["pixels"]
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample(generator=gen)
        loss, l1 = reconstruction_loss(self.vae.decode(z).sample, x, batch["weight"])
        return loss, {"l1": l1.item()}

    @torch.no_grad()
    def export(self, final: Path) -> None:
        self.vae.eval()
        acc = vae_parse_accuracy(self.vae, self.device, max(4, self.eval_samples // 16))
        print(f"decoder: held-out reconstructions parse back to the right colour + class for "
              f"{100 * acc:.1f} % of subjects", flush=True)
        self.vae.save_pretrained(final, safe_serialization=True)


@torch.no_grad()
def latent_scaling_factor(vae: Any, device: torch.device, n: int = 1024) -> float:
    """1 / std of posterior samples of ``n`` training renders (SD's ``scaling_factor``)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    zs = []
    for i in range(0, n, 64):
        seeds = [(TRAIN_SEED_LIMIT - 1 - j) for j in range(i, min(n, i + 64))]
        x = images_to_tensor([sample_render(s).image for s in seeds]).to(device)
        zs.append(vae.encode(x).latent_dist.sample(generator=gen).float().cpu())
    return float(1.0 / torch.cat(zs).std())


@torch.no_grad()
def vae_parse_accuracy(vae: Any, device: torch.device, n: int = 64) -> float:
    """Share of subjects of held-out renders whose reconstruction parses to the right colour
    and class (:func:`dynasyn.micro.parse.parse_image`)."""
    from dynasyn.micro.parse import parse_image

    renders = [sample_render(HELDOUT_SEED + 7_000_000 + i) for i in range(n)]
    x = images_to_tensor([r.image for r in renders]).to(device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    good = total = 0
    for r, im in zip(renders, imgs, strict=True):
        if r.spec.background in ("sketch", "grayscale"):
            continue
        found = {(s["colour"], s["shape"]) for s in parse_image(im)}
        for s in r.spec.subjects:
            total += 1
            good += (s.colour, s.shape) in found
    return good / max(total, 1)


class ClipStage(Stage):
    """Micro CLIP: symmetric InfoNCE with one-attribute hard-negative captions."""

    name = "clip"

    def __init__(self, batch: int, device: torch.device, work: Path, out: Path) -> None:
        super().__init__(batch, device, work, out)
        torch.manual_seed(1)
        self.clip = micro_clip().to(device)
        self.tokenizer = micro_tokenizer()

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"clip": self.clip}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.clip.parameters()), "lr": lr, "weight_decay": 0.01}]

    def dataset(self) -> Dataset:
        return ClipBatches(self.batch, self.tokenizer, self.seed_offset)

    def loss(
        self, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        img = _features(self.clip.get_image_features(pixel_values=batch["pixels"]))
        txt = _features(self.clip.get_text_features(input_ids=batch["input_ids"]))
        img = F.normalize(img, dim=-1)
        txt = F.normalize(txt, dim=-1)
        scale = self.clip.logit_scale.clamp(max=math.log(100.0)).exp()
        b = img.shape[0]
        i2t = (scale * img @ txt.T).masked_fill(batch["i2t_mask"], float("-inf"))
        t2i = (scale * txt[:b] @ img.T).masked_fill(batch["t2i_mask"], float("-inf"))
        target = torch.arange(b, device=img.device)
        loss_i = F.cross_entropy(i2t, target)
        loss = (loss_i + F.cross_entropy(t2i, target)) / 2
        acc = (i2t.argmax(-1) == target).float().mean().item()
        return loss, {"i2t_acc": acc, "scale": scale.detach().item()}

    def load_bundle(self) -> None:
        from transformers import CLIPModel

        bundled = CLIPModel.from_pretrained(_bundle_part(self.out, "clip"), dtype=torch.float32)
        self.clip.load_state_dict(bundled.state_dict())

    def export(self, final: Path) -> None:
        self.clip.save_pretrained(final, safe_serialization=True)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4, an output object in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


class UnetStage(Stage):
    """Micro SD: UNet from scratch + text encoder from micro CLIP's text tower, frozen VAE."""

    name = "unet"

    def __init__(self, batch: int, device: torch.device, work: Path, out: Path) -> None:
        super().__init__(batch, device, work, out)
        from diffusers import DDPMScheduler

        from dynasyn.micro.models import micro_scheduler_config

        self.tokenizer = micro_tokenizer()
        self.vae = load_trained_vae(work, out).to(device).eval().requires_grad_(False)
        self.sf = float(self.vae.config.scaling_factor)
        torch.manual_seed(2)
        self.text_encoder = load_text_tower(work, out).to(device)
        self.unet = micro_unet().to(device)
        cfg = {k: v for k, v in micro_scheduler_config().items() if k != "set_alpha_to_one"}
        self.scheduler = DDPMScheduler(**cfg)
        self.alphas = self.scheduler.alphas_cumprod.to(device)
        self.ema = Ema({"unet": self.unet, "text_encoder": self.text_encoder})

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [
            {"params": list(self.unet.parameters()), "lr": lr, "weight_decay": 0.01},
            {"params": list(self.text_encoder.parameters()),
             "lr": lr * TEXT_LR / PLAN["unet"].lr, "weight_decay": 0.01},
        ]

    def load_bundle(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        # the VAE the bundled UNet learned on (a later ``vae`` stage's result is another one)
        self.vae = (AutoencoderKL.from_pretrained(_bundle_part(self.out, "sd", "vae")).float()
                    .to(self.device).eval().requires_grad_(False))
        self.sf = float(self.vae.config.scaling_factor)
        unet = UNet2DConditionModel.from_pretrained(_bundle_part(self.out, "sd", "unet"))
        text = CLIPTextModel.from_pretrained(_bundle_part(self.out, "sd", "text_encoder"),
                                             dtype=torch.float32)
        self.unet.load_state_dict(unet.float().state_dict())
        self.text_encoder.load_state_dict(text.state_dict())
        self.ema = Ema({"unet": self.unet, "text_encoder": self.text_encoder})

    def compile(self) -> None:
        self.unet.compile()

    def dataset(self) -> Dataset:
        return UnetBatches(self.batch, self.tokenizer, self.seed_offset)

    def loss(
        self, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            lat = self.vae.encode(batch["pixels"]).latent_dist.sample(generator=gen) * self.sf
        b = lat.shape[0]
        noise = torch.randn(lat.shape, generator=gen, device=lat.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=gen,
                          device=lat.device)
        noisy = self.scheduler.add_noise(lat, noise, t)
        cond = self.text_encoder(batch["input_ids"])[0]
        pred = self.unet(noisy, t, cond).sample
        a = self.alphas[t]
        snr = a / (1 - a)
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        mse = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        return (weight * mse).mean(), {"mse": mse.mean().item()}

    def export(self, final: Path) -> None:
        if self.ema is not None:
            self.ema.copy_to()
        self.unet.save_pretrained(final / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(final / "text_encoder", safe_serialization=True)
        self.vae.save_pretrained(final / "vae", safe_serialization=True)  # the one it learned on
        if self.preview_steps > 0:
            save_samples(self, final / "samples.png", self.preview_steps)


def load_trained_vae(work: Path, out: Path) -> Any:
    """The ``vae`` stage's result (``work/vae/final``), else the bundled one under ``out``."""
    from diffusers import AutoencoderKL

    for p in (work / "vae" / "final", out / "sd" / "vae"):
        if (p / "config.json").exists():
            return AutoencoderKL.from_pretrained(p).float()
    raise SystemExit(
        f"no trained VAE: run `--stage vae` first (looked in {work / 'vae' / 'final'} and "
        f"{out / 'sd' / 'vae'})"
    )


def load_text_tower(work: Path, out: Path) -> torch.nn.Module:
    """A text encoder initialized from the trained micro CLIP (``work/clip/final`` or the
    bundled one); a fresh one, with a warning, when neither exists."""
    from transformers import CLIPModel

    from dynasyn.micro.models import micro_text_encoder

    for p in (work / "clip" / "final", out / "clip"):
        if (p / "config.json").exists():
            return text_encoder_from_clip(CLIPModel.from_pretrained(p, dtype=torch.float32))
    print("warning: no trained micro CLIP found; the text encoder starts from scratch",
          file=sys.stderr)
    return micro_text_encoder()


PREVIEW_PROMPTS: tuple[str, ...] = (
    "a red plain ball",
    "a blue striped star is jumping",
    "a green dotted cat is sleeping",
    "a yellow checkered cube on the grass",
    "a purple plain fish is on top of an orange striped cube",
    "a pink heart is upside down",
    "a cyan pyramid next to a red ring at night",
    "",
)
"""Prompts of the preview grid written after the ``unet`` stage."""


@torch.no_grad()
def save_samples(stage: UnetStage, path: Path, steps: int = 25) -> None:
    """A preview grid (one row of :data:`PREVIEW_PROMPTS`, guidance 4) for a quick look."""
    from PIL import Image

    from dynasyn.micro.models import assemble_pipeline

    pipe = assemble_pipeline(stage.vae, stage.unet.eval(), stage.text_encoder.eval(),
                             stage.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=stage.device).manual_seed(0)
    imgs = pipe(list(PREVIEW_PROMPTS), num_inference_steps=steps, guidance_scale=4.0,
                generator=gen, output_type="np").images
    row = (np.concatenate(list(imgs), axis=1) * 255).round().astype(np.uint8)
    Image.fromarray(row).save(path)


STAGE_CLASSES: dict[str, type[Stage]] = {
    "vae": VaeStage, "clip": ClipStage, "unet": UnetStage, "decoder": DecoderStage,
}


# --------------------------------------------------------------------------------------------
# The loop


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0.1 over ``progress``."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def schedule_lr(opt: torch.optim.Optimizer, base_lrs: list[float], *, step: int, steps: int,
                elapsed: float, seconds: float, warmup: int) -> None:
    """Set every group's learning rate to its base times :func:`lr_factor` of the run's
    progress, ``max(step / steps, elapsed / seconds)``."""
    frac = max(step / steps, elapsed / seconds if math.isfinite(seconds) else 0.0)
    f = lr_factor(step, frac, warmup)
    for g, base in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = base * f


def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor, *, name: str, step: int) -> None:
    """One optimizer step on ``loss``, gradients clipped to norm 1; a non-finite loss stops
    the run (``SystemExit``) before it touches the weights."""
    if not torch.isfinite(loss):
        raise SystemExit(f"{name}: non-finite loss at step {step}; the last checkpoint is kept "
                         "(continue with --resume)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()


def log_step(log: Any, opt: torch.optim.Optimizer, *, step: int, loss: float, elapsed: float,
             info: dict[str, float]) -> None:
    """Append one line of the training log (step, loss, first group's lr, elapsed, ``info``)."""
    log.write(json.dumps({"step": step, "loss": loss, "lr": opt.param_groups[0]["lr"],
                          "elapsed": round(elapsed, 1), **info}) + "\n")
    log.flush()


def report_interrupted(name: str, step: int) -> None:
    """Say on stderr that the run stopped at ``step`` with a checkpoint written."""
    print(f"\n{name}: interrupted at step {step}; checkpoint written, continue with --resume",
          file=sys.stderr, flush=True)


def report_done(name: str, step: int, elapsed: float, avg: float | None) -> None:
    """Print a stage's summary: steps, minutes and the running mean of the loss."""
    print(f"{name}: {step} steps, {elapsed / 60:.1f} min"
          + (f", loss {avg:.4f} (running mean)" if avg is not None else ""), flush=True)


@dataclass
class StageResult:
    """What a stage did: its step count and seconds of training (all runs together)."""

    step: int
    elapsed: float


LossFn = Callable[[dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, dict[str, float]]]
"""A stage's loss: (batch on the device, noise generator) -> (loss, numbers to log)."""
LogHook = Callable[[int, IO[str]], None]
"""Called with the step and the open training log."""


def run_loop(name: str, *, opt: torch.optim.Optimizer, base_lrs: list[float], batches: Iterable[dict[str, torch.Tensor]],
             loss_fn: LossFn, checkpoint: Callable[[int, float], None], log_path: Path,
             device: torch.device, start: int, steps: int, elapsed: float, seconds: float,
             seed_base: int, ckpt_minutes: float, progress: bool = True,
             log_first: bool = False, show_info: bool = False, at_start: LogHook | None = None,
             after_step: LogHook | None = None, at_end: LogHook | None = None) -> tuple[int, float]:
    """The training loop both trainers share, from step ``start`` (``elapsed`` seconds already
    spent) until ``steps`` or ``seconds``: :func:`schedule_lr` (from the groups' ``base_lrs``,
    taken before a resumed optimizer's state is loaded), the loss of ``batches`` (one
    per step; step ``s`` draws its noise from a generator seeded ``seed_base + s``),
    :func:`optimize`, a log line every 10 steps (and the first with ``log_first``) appended to
    ``log_path``, ``checkpoint(step, elapsed)`` every ``ckpt_minutes``, on Ctrl-C (then
    re-raised) and at the end. The hooks get the step and the open log: ``at_start`` before the
    first step, ``after_step`` after each, ``at_end`` after the last. Returns the final step and
    elapsed seconds."""
    warmup = min(200, max(1, steps // 10))
    step, avg = start, None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=steps, initial=start, desc=name, unit="step", disable=not progress,
               dynamic_ncols=True)
    t_run, e_run = time.monotonic(), elapsed
    last_ckpt = t_run
    with log_path.open("a") as log:
        if at_start is not None:
            at_start(step, log)
        try:
            for batch_data in batches:
                elapsed = e_run + time.monotonic() - t_run
                if elapsed >= seconds:
                    break
                schedule_lr(opt, base_lrs, step=step, steps=steps, elapsed=elapsed,
                            seconds=seconds, warmup=warmup)
                data = {k: v.to(device, non_blocking=True) for k, v in batch_data.items()}
                gen = torch.Generator(device=device).manual_seed(seed_base + step)
                loss, info = loss_fn(data, gen)
                optimize(opt, loss, name=name, step=step)
                step += 1
                lv = loss.item()
                avg = lv if avg is None else 0.98 * avg + 0.02 * lv
                bar.update(1)
                shown = {k: f"{v:.3g}" for k, v in info.items()} if show_info else {}
                bar.set_postfix(loss=f"{avg:.4f}", **shown)
                if step % 10 == 0 or step == steps or (log_first and step == start + 1):
                    log_step(log, opt, step=step, loss=lv, elapsed=elapsed, info=info)
                if after_step is not None:
                    after_step(step, log)
                if time.monotonic() - last_ckpt >= 60 * ckpt_minutes:
                    checkpoint(step, e_run + time.monotonic() - t_run)
                    last_ckpt = time.monotonic()
        except KeyboardInterrupt:
            bar.close()
            checkpoint(step, e_run + time.monotonic() - t_run)
            report_interrupted(name, step)
            raise
        if at_end is not None:
            at_end(step, log)
    elapsed = e_run + time.monotonic() - t_run
    bar.close()
    checkpoint(step, elapsed)
    report_done(name, step, elapsed, avg)
    return step, elapsed


def _batches(ds: Dataset, start: int, end: int, workers: int, pin: bool) -> Iterator[Any]:
    loader = DataLoader(
        ds, batch_size=None, sampler=range(start, end), num_workers=workers, pin_memory=pin
    )
    yield from loader


def train_stage(
    name: str,
    *,
    work: Path,
    out: Path,
    steps: int | None = None,
    batch: int | None = None,
    seconds: float = math.inf,
    resume: bool = False,
    fresh: bool = False,
    device: torch.device | None = None,
    ckpt_minutes: float = 5.0,
    workers: int = 0,
    progress: bool = True,
    eval_samples: int = 1024,
    preview_steps: int = 25,
    from_bundle: bool = False,
    lr: float | None = None,
    compile: bool = False,
    continuation: int = 1,
) -> StageResult:
    """Train one stage for ``steps`` (default: the plan) or ``seconds``, whichever ends first.

    Resumes from the stage's latest checkpoint with ``resume``; refuses to overwrite existing
    checkpoints unless ``resume`` or ``fresh``. Exports the fp32 result to ``work/name/final``.
    ``from_bundle`` starts a new run from the bundled weights under ``out`` instead of from
    scratch (a continuation: fresh optimizer, world seeds shifted by ``continuation`` x
    :data:`CONTINUATION_SEED_OFFSET`); ``lr`` replaces the plan's base learning rate;
    ``compile`` runs the stage's main module through ``torch.compile``.
    """
    device = device or torch.device("cpu")
    plan = PLAN[name]
    steps = plan.steps if steps is None else steps
    batch = plan.batch if batch is None else batch
    sdir = work / name
    ckdir = sdir / "checkpoints"
    existing = list_checkpoints(ckdir)
    if existing and not (resume or fresh):
        raise SystemExit(
            f"{ckdir} holds checkpoints of an earlier run: pass --resume to continue it or "
            "--fresh to start over"
        )
    if fresh and sdir.exists():
        shutil.rmtree(sdir)
        existing = []
    stage = STAGE_CLASSES[name](batch, device, work, out)
    stage.eval_samples, stage.preview_steps = eval_samples, preview_steps
    seed_base = plan.seed_base
    if from_bundle:
        stage.load_bundle()
        stage.seed_offset = continuation * CONTINUATION_SEED_OFFSET
        seed_base += stage.seed_offset
    if compile:
        stage.compile()
    models = stage.trained()
    opt = torch.optim.AdamW(stage.param_groups(plan.lr if lr is None else lr),
                            betas=(0.9, 0.999))
    base_lrs = [g["lr"] for g in opt.param_groups]
    start, elapsed = 0, 0.0
    if resume and existing:
        state, weights, opt_tensors = read_checkpoint(existing[-1])
        for m, mod in models.items():
            mod.load_state_dict({k: v.to(device) for k, v in weights[m].items()})
        if stage.ema is not None and "ema" in weights:
            stage.ema.shadow = {k: v.to(device) for k, v in weights["ema"].items()}
        # (Optimizer.load_state_dict moves the state to the parameters' device itself)
        load_optimizer(opt, opt_tensors, state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        # a continuation stays one (and the same one): its data comes from the shifted seeds
        from_bundle = bool(state.get("from_bundle", False))
        continuation = int(state.get("continuation", 1))
        stage.seed_offset = continuation * CONTINUATION_SEED_OFFSET if from_bundle else 0
        seed_base = plan.seed_base + stage.seed_offset
        if int(state.get("batch", batch)) != batch:
            print(f"warning: resuming {name} with batch {batch} (was {state['batch']})",
                  file=sys.stderr)
        print(f"{name}: resumed from {existing[-1]} (step {start}, {elapsed / 60:.1f} min)",
              flush=True)

    def checkpoint(step: int, elapsed: float) -> None:
        weights = {m: mod.state_dict() for m, mod in models.items()}
        if stage.ema is not None:
            weights["ema"] = stage.ema.shadow
        write_checkpoint(ckdir, f"step-{step:07d}", weights, opt,
                         {"stage": name, "step": step, "elapsed": elapsed, "batch": batch,
                          "steps": steps, "from_bundle": from_bundle,
                          "continuation": continuation})

    for mod in models.values():
        mod.train()
    step = start
    if step < steps and elapsed >= seconds:
        print(f"{name}: time budget spent ({elapsed / 60:.1f} min) at step {step}", flush=True)
    if step < steps and elapsed < seconds:

        def update_ema(step: int, log: IO[str]) -> None:
            if stage.ema is not None:
                stage.ema.update(step)

        step, elapsed = run_loop(
            name, opt=opt, base_lrs=base_lrs, device=device, log_path=sdir / "log.jsonl",
            batches=_batches(stage.dataset(), start, steps, workers, device.type == "cuda"),
            loss_fn=stage.loss, checkpoint=checkpoint, start=start, steps=steps,
            elapsed=elapsed, seconds=seconds, seed_base=seed_base, ckpt_minutes=ckpt_minutes,
            progress=progress, show_info=True, after_step=update_ema,
        )
    for mod in models.values():
        mod.eval()
    tmp = sdir / ".final-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    stage.export(tmp)
    if (sdir / "final").exists():
        shutil.rmtree(sdir / "final")
    tmp.rename(sdir / "final")
    (sdir / "final" / "done.json").write_text(json.dumps({"step": step, "elapsed": elapsed}))
    return StageResult(step, elapsed)


def export_bundle(work: Path, out: Path) -> dict[str, Path]:
    """Write the fp16 bundle into ``out`` from the finished stages under ``work``.

    ``sd/`` when the ``unet`` stage has finished (with the VAE it was trained on, even if the
    ``vae`` stage ran again since), ``clip/`` when the ``clip`` stage has. A finished
    ``decoder`` stage's VAE replaces the SD's (the ``unet`` stage's, else the bundled one) when
    its encoder is the same (compared in fp16, as bundled); otherwise it is left out, with a
    warning.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    parts: dict[str, Any] = {}
    unet_final = work / "unet" / "final"
    decoder_final = work / "decoder" / "final"
    sd_src = None
    if (unet_final / "unet" / "config.json").exists():
        sd_src = unet_final
    elif (decoder_final / "config.json").exists() and (out / "sd" / "unet").is_dir():
        sd_src = out / "sd"
    if sd_src is not None:
        parts["vae"] = AutoencoderKL.from_pretrained(sd_src / "vae").float()
        parts["unet"] = UNet2DConditionModel.from_pretrained(sd_src / "unet").float()
        parts["text_encoder"] = CLIPTextModel.from_pretrained(
            sd_src / "text_encoder", dtype=torch.float32
        )
        if (decoder_final / "config.json").exists():
            tuned = AutoencoderKL.from_pretrained(decoder_final).float()
            if same_encoder(tuned, parts["vae"]):
                parts["vae"] = tuned
            else:
                print(f"warning: {decoder_final} was tuned on another encoder than the UNet's "
                      "VAE; the bundle keeps the UNet's VAE", file=sys.stderr)
    clip_final = work / "clip" / "final"
    if (clip_final / "config.json").exists():
        parts["clip"] = CLIPModel.from_pretrained(clip_final, dtype=torch.float32)
    if not parts:
        return {}
    return save_bundle(out, tokenizer=micro_tokenizer(), **parts)


def same_encoder(a: Any, b: Any) -> bool:
    """Do two AutoencoderKL give the same latents (encoder + quant_conv equal in fp16)?"""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    return bool(keys) and all(
        k in sb and torch.equal(sa[k].half(), sb[k].half()) for k in keys
    )


def train(
    stages: tuple[str, ...],
    *,
    work: Path,
    out: Path,
    minutes: float | None = None,
    steps: int | None = None,
    batch: int | None = None,
    resume: bool = False,
    fresh: bool = False,
    device: torch.device | None = None,
    ckpt_minutes: float = 5.0,
    workers: int = 0,
    progress: bool = True,
    eval_samples: int = 1024,
    preview_steps: int = 25,
    from_bundle: bool = False,
    lr: float | None = None,
    compile: bool = False,
    continuation: int = 1,
) -> dict[str, Path]:
    """Run ``stages`` in order (time budget shared by :attr:`StagePlan.share`), then write the
    bundle. Returns the written bundle directories."""
    device = device or torch.device("cpu")
    total = math.inf if minutes is None else 60.0 * minutes
    used = 0.0
    for i, name in enumerate(stages):
        rest = sum(PLAN[s].share for s in stages[i:])
        seconds = (total - used) * PLAN[name].share / rest if math.isfinite(total) else math.inf
        res = train_stage(name, work=work, out=out, steps=steps, batch=batch,
                          seconds=max(seconds, 0.0), resume=resume, fresh=fresh, device=device,
                          ckpt_minutes=ckpt_minutes, workers=workers, progress=progress,
                          eval_samples=eval_samples, preview_steps=preview_steps,
                          from_bundle=from_bundle, lr=lr, compile=compile,
                          continuation=continuation)
        used += res.elapsed
    written = export_bundle(work, out)
    for k, p in written.items():
        print(f"wrote {k}: {p}", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m dynasyn.micro.train --help``."""
    from dynasyn.models import pick_device, quiet_libraries

    ap = argparse.ArgumentParser(
        prog="python -m dynasyn.micro.train",
        description="Train the micro VAE, micro CLIP and micro Stable Diffusion on the micro "
        "world and write the bundle (fp16 safetensors, diffusers / transformers format).",
        epilog="examples:\n"
        "  python -m dynasyn.micro.train --minutes 117 --device cpu   # the bundled weights\n"
        "  python -m dynasyn.micro.train --resume --minutes 117        # continue a killed run\n"
        "  python -m dynasyn.micro.train --stage unet --minutes 30 --fresh\n"
        "  python -m dynasyn.micro.train --steps 3 --batch 4 --out /tmp/m --work /tmp/w  # smoke",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--stage", choices=(*STAGES, *EXTRA_STAGES, "all"), default="all",
                    help="stage to train (all = vae, clip, unet in order; decoder = fine-tune "
                    "the VAE decoder on the frozen encoder)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="total time budget of the stages run (default: none, planned steps)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per stage (default: the plan, vae {} / clip {} / unet {})".format(
                        *(PLAN[s].steps for s in STAGES)))
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size of every stage run (default: vae {} / clip {} / unet {})"
                    .format(*(PLAN[s].batch for s in STAGES)))
    ap.add_argument("--out", type=Path, default=micro_weights_path(),
                    help="bundle directory (default: the package's micro/weights)")
    ap.add_argument("--work", type=Path, default=Path("runs/micro-train"),
                    help="checkpoints, logs and per-stage results (default: runs/micro-train)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
    ap.add_argument("--fresh", action="store_true",
                    help="delete earlier checkpoints of the stages run and start over")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto = CUDA when available, else CPU")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint interval")
    ap.add_argument("--workers", type=int, default=None,
                    help="data loader processes (default: 0 on CPU, up to 8 with CUDA)")
    ap.add_argument("--eval-samples", type=int, default=1024,
                    help="renders for the VAE latent scaling factor (default 1024)")
    ap.add_argument("--preview-steps", type=int, default=25,
                    help="DDIM steps of the preview grid written after the unet stage (0: none)")
    ap.add_argument("--from-bundle", action="store_true",
                    help="continue the bundled weights under --out (fresh optimizer, new "
                    "world seeds) instead of starting from scratch")
    ap.add_argument("--continuation", type=int, default=1, metavar="N",
                    help="with --from-bundle: the N-th continuation of this bundle; its world "
                    f"seeds are shifted N x {CONTINUATION_SEED_OFFSET:,} (default 1)")
    ap.add_argument("--lr", type=float, default=None,
                    help="base learning rate of the stages run (default: the plan's)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet (unet stage; its step 1.28x faster on a 2-core "
                    "CPU, after about 2.5 min of compiling)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.resume and args.fresh:
        ap.error("--resume and --fresh exclude each other")
    if not 1 <= args.continuation <= MAX_CONTINUATION:
        ap.error(f"--continuation must be 1 to {MAX_CONTINUATION} (stages' seeds lie "
                 f"{PLAN['clip'].seed_base:,} apart)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu",
              file=sys.stderr)
        return 2
    device = torch.device("cuda") if args.device == "cuda" else pick_device("auto")
    if device.type == "mps":
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    workers = args.workers
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" else 0
    quiet_libraries()
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.from_bundle:
        for st in stages:
            p = args.out.joinpath(*BUNDLE_PARTS[st])
            if BUNDLE_PARTS[st] and not (p / "config.json").exists():
                print(f"error: --from-bundle: no bundled model at {p} (build the bundle "
                      "first or pass --out DIR)", file=sys.stderr)
                return 2
    print(f"micro training: stages {', '.join(stages)} on {device}; work {args.work}, "
          f"bundle {args.out}", flush=True)
    try:
        train(stages, work=args.work, out=args.out, minutes=args.minutes, steps=args.steps,
              batch=args.batch, resume=args.resume, fresh=args.fresh, device=device,
              ckpt_minutes=args.ckpt_minutes, workers=workers, progress=not args.no_progress,
              eval_samples=args.eval_samples, preview_steps=args.preview_steps,
              from_bundle=args.from_bundle, lr=args.lr, compile=args.compile,
              continuation=args.continuation)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
