"""The paper's method and its baselines as presets of one trainer (one config schema).

Every value the paper gives is the preset default: DynASyn's Table 4 for ``dynasyn`` and the
ablations, Break-a-Scene's official defaults for ``break-a-scene`` (including its prior
preservation: 100 class images of "a photo at the beach", loss weight 1). The baselines "DB (+mask)" and
"TI (+mask)" train one subject per step with the masked diffusion loss only.
"""

from __future__ import annotations

from typing import Any

_PAPER: dict[str, Any] = dict(
    phase1_steps=700,
    phase2_steps=700,
    phase1_lr=5e-4,
    phase2_lr=2e-6,
    optimizer="adam",
    weight_decay=0.0,
    lambda_md=1.0,
    lambda_m2a=1e-2,
    lambda_ica=5e-3,
    lambda_aug=1e-4,
    single_subject=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper: MD + M2A + ICA + AUG, Table 4 values.
    "dynasyn": dict(_PAPER),
    # Break-a-Scene: MD + M2A (λ 1e-2), 400 + 400 steps, AdamW (wd 1e-2), and its prior
    # preservation, on by default in the official code (its --no_prior_preservation turns it
    # off; here prior_preservation=false): weight 1.0, 100 class images, "a photo at the beach".
    "break-a-scene": dict(
        _PAPER,
        phase1_steps=400,
        phase2_steps=400,
        optimizer="adamw",
        weight_decay=1e-2,
        lambda_ica=0.0,
        lambda_aug=0.0,
        prior_preservation=True,
        prior_loss_weight=1.0,
        num_class_images=100,
        class_prompt="a photo at the beach",
    ),
    # DB (+mask): one subject per step, masked diffusion loss, UNet + text encoder.
    "dreambooth": dict(
        _PAPER,
        phase1_steps=0,
        phase2_steps=1400,
        lambda_m2a=0.0,
        lambda_ica=0.0,
        lambda_aug=0.0,
        single_subject=True,
    ),
    # TI (+mask): one subject per step, masked diffusion loss, placeholder embeddings only.
    "textual-inversion": dict(
        _PAPER,
        phase1_steps=1400,
        phase2_steps=0,
        lambda_m2a=0.0,
        lambda_ica=0.0,
        lambda_aug=0.0,
        single_subject=True,
    ),
    # MuDI (arXiv 2404.04243) on this trainer: the `md` preset (MD + M2A, DynASyn's schedule)
    # with Seg-Mix, at the official code's default probability 0.6, in place of DynASyn's
    # augmentation; its mean-shifted initial noise is `dynasyn generate --mean-shift`.
    "mudi": dict(_PAPER, lambda_ica=0.0, lambda_aug=0.0, segmix_prob=0.6),
    # Ablations (paper Table 3): MD (+M2A), + appearance (ICA), + action (AUG).
    "md": dict(_PAPER, lambda_ica=0.0, lambda_aug=0.0),
    "md+app": dict(_PAPER, lambda_aug=0.0),
    "md+act": dict(_PAPER, lambda_ica=0.0),
}

MICRO_RECIPE: dict[str, Any] = dict(placeholder_vectors=0, placeholder_init="phrase",
                                     prompt_prefix="", phase1_lr=5e-5)
"""Defaults every preset takes on the bundled micro model (a config file or ``--set`` still
override them): each placeholder starts as its subject's noun phrase, one vector per word, the
training prompts have no "a photo of" (the micro model's captions never do), and phase 1 moves
the embeddings gently (lr 5e-5 instead of 5e-4); with :func:`micro_recipe` also a seventh of
the preset's steps (the paper's 700 + 700 -> 100 + 100). Measured (docs/recipe.md): the
paper's phase-1 lr pulls phrase-initialized placeholders away from what the words mean;
with 5e-5 the `dynasyn` preset keeps identity at the text ceiling's level on the tuning
scenes (69 of 128 subject images against 73 for the ceiling, 49 for lr 5e-4) and on the
held-out scenes (see the docs for the numbers)."""

MICRO_STEP_DIVISOR = 7
"""The micro model trains a seventh of each preset's phase steps (700 -> 100)."""


def micro_recipe(preset: str) -> dict[str, Any]:
    """:data:`MICRO_RECIPE` plus the preset's phase steps divided by
    :data:`MICRO_STEP_DIVISOR` (DB and TI keep their one phase)."""
    p = PRESETS[preset]
    return dict(MICRO_RECIPE, phase1_steps=p["phase1_steps"] // MICRO_STEP_DIVISOR,
                phase2_steps=p["phase2_steps"] // MICRO_STEP_DIVISOR)


PRESET_HELP = {
    "dynasyn": "the paper: MD + M2A + ICA + AUG, Table 4 values (700 + 700 steps, Adam)",
    "break-a-scene": "MD + M2A (λ 1e-2) + prior preservation (100 class images, weight 1), "
                     "400 + 400 steps, AdamW wd 1e-2",
    "dreambooth": "DB (+mask): one subject per step, masked diffusion, UNet + text encoder",
    "textual-inversion": "TI (+mask): one subject per step, masked diffusion, embeddings only",
    "mudi": "MuDI's Seg-Mix (p 0.6: subjects re-pasted at random on white) + MD + M2A, "
            "DynASyn's schedule; generate --mean-shift for its initial noise",
    "md": "ablation: MD + M2A with DynASyn's schedule",
    "md+app": "ablation: MD + M2A + ICA",
    "md+act": "ablation: MD + M2A + AUG",
}
