"""Evaluation of trained runs: metrics, prompt sets and the HTML report (``dynasyn evaluate``).

- :func:`evaluate` (:mod:`dynasyn.evaluate.run`): render a run's evaluation prompts, score
  them, write ``metrics.json`` and ``report.html``;
- :mod:`dynasyn.evaluate.metrics`: CLIP-I, CLIP-T, identity-in-region (:class:`ClipScorer`),
  optional ImageReward and DINO; Wilson and bootstrap intervals;
- :mod:`dynasyn.evaluate.exact`: exact metrics of micro-world images by the micro parser
  (identity kept, action followed, identity mixing) and the text ceiling;
- :mod:`dynasyn.evaluate.prompts`: the paper's Plain / Action / Interaction prompts generalized
  to any scene by slots (:func:`prompt_sets`), the micro world's grammar, prompt files;
- :mod:`dynasyn.evaluate.report`: the report's pictures and page.
"""

from __future__ import annotations

from dynasyn.evaluate.exact import EXACT_DEFINITIONS, EXACT_METRICS, score_image
from dynasyn.evaluate.metrics import (
    ClipScorer,
    DinoScorer,
    ImageRewardScorer,
    attention_region,
    image_reward_available,
    mean_std,
    region_crop,
    subject_reference,
    wilson_interval,
)
from dynasyn.evaluate.prompts import (
    CATEGORIES,
    PAPER_PROMPTS,
    EvalPrompt,
    parse_prompt,
    prompt_sets,
    read_prompt_file,
)
from dynasyn.evaluate.run import METRICS, evaluate

__all__ = [
    "CATEGORIES",
    "EXACT_DEFINITIONS",
    "EXACT_METRICS",
    "METRICS",
    "PAPER_PROMPTS",
    "ClipScorer",
    "DinoScorer",
    "EvalPrompt",
    "ImageRewardScorer",
    "attention_region",
    "evaluate",
    "image_reward_available",
    "mean_std",
    "parse_prompt",
    "prompt_sets",
    "read_prompt_file",
    "region_crop",
    "score_image",
    "subject_reference",
    "wilson_interval",
]
