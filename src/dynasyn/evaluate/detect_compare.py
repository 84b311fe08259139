"""Detect-and-Compare: an approximate identity-mixing score for photos (MuDI's idea).

MuDI (Jang et al., NeurIPS 2024, arXiv 2404.04243) measures identity mixing on real photos by
detecting each subject in a generated image and comparing the detection with every reference
subject. Here the "detection" of a prompted subject is its attention region in the generated
image (the placeholder's cross-attention, segmented as for ``identity_region``; the whole
image when its map is empty), and the comparison is the cosine of image embeddings (CLIP, and
DINO when a DINO model is given) of the region crop and each subject's reference crop
(mask box, background grey):

    own_k = cos(e(crop_k), e(ref_{s_k})),   other_k = max_{t ≠ s_k} cos(e(crop_k), e(ref_t)),
    score_k = own_k − other_k,   mixing_k = [other_k > own_k]

for the subject ``s_k`` in slot ``k`` of the prompt. A negative score means another reference
subject is closer to what was drawn in that subject's place. It is approximate: the region is
only where the placeholder attended, and embeddings of small crops are noisy; on micro-world
scenes the exact ``identity_mixing`` of :mod:`dynasyn.evaluate.exact` is the measure to trust.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dynasyn.evaluate.metrics import mean_std, wilson_interval

__all__ = ["DEFINITION", "detect_compare", "detect_compare_block", "detect_compare_summary"]

DEFINITION = ("Detect-and-Compare (approximate; MuDI's idea): each prompted subject's attention "
              "region is cropped and compared (embedding cosine) with every reference subject "
              "crop; score = own similarity minus the highest similarity to another subject; "
              "mixing = another subject's reference is closer than its own")


def detect_compare(crop_embeds: torch.Tensor, ref_embeds: torch.Tensor,
                   subjects: Sequence[int]) -> list[dict[str, Any]]:
    """Own-minus-others similarity of each prompted subject's crop (module docstring).

    ``crop_embeds`` (K, D): one embedding per prompt slot (the slot's region crop);
    ``ref_embeds`` (N, D): one per reference subject, N >= 2; ``subjects[k]``: the subject
    index of slot k. Embeddings are L2-normalized here. Returns per slot ``{"subject", "own",
    "other", "closest" (the most similar reference subject), "score", "mixing"}``.
    """
    c = torch.nn.functional.normalize(torch.as_tensor(crop_embeds).float(), dim=-1)
    r = torch.nn.functional.normalize(torch.as_tensor(ref_embeds).float(), dim=-1)
    if len(r) < 2:
        raise ValueError("Detect-and-Compare needs at least two reference subjects")
    if len(c) != len(subjects):
        raise ValueError(f"{len(c)} crops for {len(subjects)} prompted subjects")
    sims = c @ r.T  # (K, N)
    out = []
    for k, s in enumerate(subjects):
        row = sims[k]
        own = float(row[s])
        other = float(torch.cat([row[:s], row[s + 1 :]]).max())
        out.append({"subject": int(s), "own": round(own, 6), "other": round(other, 6),
                    "closest": int(row.argmax()), "score": round(own - other, 6),
                    "mixing": other > own})
    return out


def detect_compare_summary(slots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean (± std) score and the share of subjects with mixing (95 % Wilson interval)."""
    slots = list(slots)
    k, n = sum(bool(s["mixing"]) for s in slots), len(slots)
    mixing: dict[str, Any] = {"k": k, "n": n, "rate": None, "ci95": None}
    if n:
        mixing.update(rate=round(k / n, 6), ci95=[round(v, 6) for v in wilson_interval(k, n)])
    return {"score": mean_std(s["score"] for s in slots), "mixing": mixing}


def detect_compare_block(records: Sequence[dict[str, Any]], embeddings: Sequence[str]
                         ) -> dict[str, Any]:
    """The ``"detect_compare"`` block of ``metrics.json``: per category and overall, per
    embedding (``clip``, ``dino``), from each prompt record's ``"detect_compare"`` (embedding
    -> per image -> per slot)."""
    def pooled(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {e: detect_compare_summary(s for r in recs for im in r["detect_compare"][e]
                                          for s in im) for e in embeddings}

    cats = list(dict.fromkeys(r["category"] for r in records))
    return {"definition": DEFINITION, "approximate": True, "embeddings": list(embeddings),
            "categories": {c: pooled([r for r in records if r["category"] == c]) for c in cats},
            "overall": pooled(records)}
