"""Masks from class names against the micro world's true masks (docs/masks.md).

Renders scenes of 2-3 subjects (distinct classes and colours, in a row or in a two-subject
relation) over the plain, grass, night and beach backgrounds, runs ``dynasyn.classmasks``
with the bundled micro model on each photo and its class nouns, and prints the mean IoU of
every subject's mask against the renderer's mask, with 95 % bootstrap intervals (resampling
scenes), per background, per subject count and overall.

    OMP_NUM_THREADS=1 python benchmarks/masks_iou.py                 # held-out scenes
    OMP_NUM_THREADS=1 python benchmarks/masks_iou.py --set tuning    # the scenes the knobs were tuned on

The tuning and held-out scenes come from disjoint seed bands; the method's knobs were chosen
on ``--set tuning`` only. About 1 s per scene on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from dynasyn.classmasks import ClassNotFound, MaskParams, class_masks
from dynasyn.micro.world import (
    COLOURS,
    PATTERNS,
    SHAPES,
    Identity,
    SceneSpec,
    render,
    valid_relations,
)
from dynasyn.models import load_pipeline

BACKGROUNDS = ("plain", "grass", "night", "beach")
SEEDS = {"tuning": 10_000, "held-out": 90_000}


def make_scenes(which: str, n: int, relations: float = 0.0):
    """``n`` renders of 2-3 subjects; ``relations``: the share of two-subject relation scenes."""
    base = SEEDS[which]
    rng = np.random.default_rng(base)
    out = []
    for i in range(n):
        k = int(rng.integers(2, 4))
        is_relation = rng.random() < relations
        if is_relation:
            k = 2
        shapes = rng.choice(len(SHAPES), k, replace=False)
        colours = rng.choice(len(COLOURS), k, replace=False)
        ids = tuple(Identity(SHAPES[s], list(COLOURS)[c], PATTERNS[rng.integers(len(PATTERNS))])
                    for s, c in zip(shapes, colours, strict=True))
        rel = None
        if is_relation:
            rels = valid_relations(ids[0].shape, ids[1].shape)
            rel = rels[rng.integers(len(rels))]
        spec = SceneSpec(ids, relation=rel, background=BACKGROUNDS[i % len(BACKGROUNDS)])
        out.append(render(spec, size=64, seed=base + i))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def bootstrap(per_scene: list[list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean IoU over subjects and its 95 % interval, resampling scenes."""
    rng = np.random.default_rng(seed)
    flat = np.concatenate([np.asarray(s) for s in per_scene])
    means = []
    for _ in range(reps):
        pick = rng.integers(len(per_scene), size=len(per_scene))
        means.append(np.concatenate([per_scene[j] for j in pick]).mean())
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(flat.mean()), float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=list(SEEDS), default="held-out")
    ap.add_argument("-n", type=int, default=60, help="scenes (default 60)")
    ap.add_argument("--relations", type=float, default=0.0,
                    help="share of two-subject relation scenes (on top of, behind, ...)")
    ap.add_argument("--model", default="micro")
    ap.add_argument("--json", help="also write the per-scene results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    scenes = make_scenes(args.set, args.n, args.relations)
    rows, t0 = [], time.perf_counter()
    for r in scenes:
        classes = [s.shape for s in r.spec.subjects]
        from PIL import Image

        try:
            res = class_masks(pipe, Image.fromarray(r.image), classes, MaskParams())
            ious = [iou(m, t) for m, t in zip(res.masks, r.masks, strict=True)]
            found = True
        except ClassNotFound:
            ious, found = [0.0] * len(classes), False
        rows.append({"seed": r.seed, "background": r.spec.background, "classes": classes,
                     "relation": r.spec.relation, "iou": ious, "found": found})
    secs = (time.perf_counter() - t0) / len(scenes)

    def line(name: str, sel: list[dict]) -> str:
        if not sel:
            return f"| {name} | 0 | | | |"
        m, lo, hi = bootstrap([r["iou"] for r in sel])
        subj = sum(len(r["iou"]) for r in sel)
        good = np.mean([v >= 0.5 for r in sel for v in r["iou"]])
        miss = sum(not r["found"] for r in sel)
        return f"| {name} | {len(sel)} / {subj} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {good:.0%} | {miss} |"

    print(f"set: {args.set}, {len(scenes)} scenes, model {args.model}, {secs:.2f} s/scene")
    print("| scenes | scenes / subjects | mean IoU [95 % CI] | IoU >= 0.5 | not found |")
    print("|---|---|---|---|---|")
    print(line("all", rows))
    for bg in BACKGROUNDS:
        print(line(f"background {bg}", [r for r in rows if r["background"] == bg]))
    for k in (2, 3):
        print(line(f"{k} subjects", [r for r in rows if len(r["classes"]) == k]))
    if args.relations:
        print(line("relation scenes", [r for r in rows if r["relation"]]))
        print(line("row scenes", [r for r in rows if not r["relation"]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
