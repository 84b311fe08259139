"""Union sampling and the joint horizontal flip (Break-a-Scene's data sampling)."""

from __future__ import annotations

import random

import torch


def sample_union(num_subjects: int, rng: random.Random, single: bool = False) -> list[int]:
    """Union sampling: draw k ~ U{1..N}, then k distinct subjects in random order.

    The training prompt for the draw is ``a photo of <asset_i> and <asset_j> …`` and the
    diffusion loss is restricted to the union M_s of their masks. ``single=True`` draws exactly
    one subject (the "DB (+mask)" / "TI (+mask)" baselines).
    """
    if num_subjects < 1:
        raise ValueError("union sampling needs at least one subject")
    k = 1 if single else rng.randint(1, num_subjects)
    return rng.sample(range(num_subjects), k)


def flip_coin(rng: random.Random, p: float = 0.5) -> bool:
    """The horizontal-flip decision of one item (image and masks flip together)."""
    return rng.random() < p


def maybe_flip(
    image: torch.Tensor, masks: torch.Tensor, rng: random.Random, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Flip image (…, H, W) and masks (…, H, W) horizontally together with probability p."""
    if flip_coin(rng, p):
        return image.flip(-1), masks.flip(-1), True
    return image, masks, False


def step_rng(seed: int, step: int, process: int = 0) -> random.Random:
    """The Python RNG of one training step, derived from (seed, step, process).

    Deriving every step's randomness from its index (instead of a running generator) makes a
    resumed run draw exactly what an uninterrupted one draws.
    """
    return random.Random(f"{seed}:{step}:{process}")


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The torch CPU generator of one training step (noise, timesteps, latent sampling)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + process * 104_729) % (2**63 - 1))
    return g
