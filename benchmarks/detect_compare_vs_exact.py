"""Detect-and-Compare against the exact identity mixing of micro-world evaluations.

    OMP_NUM_THREADS=1 python benchmarks/detect_compare_vs_exact.py EVAL_DIR... [--renders 150]

For every ``dynasyn evaluate`` directory of a micro-world run (its ``metrics.json`` holds both
``"exact"`` and ``"detect_compare"``), per prompted subject render: a table of exact identity
mixing (rows) against Detect-and-Compare's mixing (columns), the kinds of exact mixing, and
the AUC of the Detect-and-Compare score for telling renders without exact mixing from those
with it. Then the same with an *oracle detector*: the crop is the parser's box of the
subject's class in the image instead of the attention region (subjects whose class the
parser does not find are skipped). With ``--renders N``: the embedding alone, on N world
renders of one subject of a random two-subject scene in a random action, cropped by its true
mask; how often it is closer to another subject's reference, with its own label and with the
other subject's label.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dynasyn.evaluate.detect_compare import detect_compare
from dynasyn.evaluate.metrics import ClipScorer, blank_crop, subject_reference
from dynasyn.scene import load_scene


def auc(neg: list[float], pos: list[float]) -> float:
    """P(score of a render without mixing > score of one with mixing), ties half."""
    a, b = np.asarray(neg)[:, None], np.asarray(pos)[None]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def references(scorer: ClipScorer, scene_dir: str, classes: list[str], size: int):
    scene = load_scene(scene_dir, classes=classes)
    img, masks = scene.tensors(size)
    arr = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return scorer.image_embeds([subject_reference(Image.fromarray(arr), m.numpy())
                                for m in masks])


def check_eval(ev: Path, scorer: ClipScorer) -> None:
    d = json.loads((ev / "metrics.json").read_text())
    classes = d["classes"]
    ref_e = references(scorer, d["settings"]["scene"], classes, d["settings"]["resolution"])
    tab, oracle = np.zeros((2, 2), int), np.zeros((2, 2), int)
    scores: dict[bool, list[float]] = {False: [], True: []}
    kinds: collections.Counter = collections.Counter()
    missing = 0
    for p in d["prompts"]:
        for path, ex, dc in zip(p["images"], p["exact"]["images"], p["detect_compare"]["clip"],
                                strict=True):
            img = Image.open(ev / path).convert("RGB")
            for e, c in zip(ex["subjects"], dc, strict=True):
                mix = bool(e["identity_mixing"])
                tab[int(mix), int(c["mixing"])] += 1
                scores[mix].append(c["score"])
                kinds.update({k.split(":")[0] for k in e["mixing"]})
                found = [q for q in ex["parsed"] if q["shape"] == classes[e["subject"]]]
                if not found:
                    missing += 1
                    continue
                x0, y0, x1, y1 = found[0]["bbox"]
                box = np.zeros((img.height, img.width), np.float32)
                box[y0 : y1 + 1, x0 : x1 + 1] = 1
                (o,) = detect_compare(scorer.image_embeds([blank_crop(img, box)]), ref_e,
                                      [e["subject"]])
                oracle[int(mix), int(o["mixing"])] += 1
    print(f"{ev}: {tab.sum()} subject renders")
    print(f"  exact mixing no/yes x Detect-and-Compare no/yes: {tab.tolist()}; exact kinds "
          f"{dict(kinds)}")
    if scores[False] and scores[True]:
        print(f"  AUC of the score: {auc(scores[False], scores[True]):.2f}")
    print(f"  oracle detector (parser box of the class; {missing} renders without it): "
          f"{oracle.tolist()}")


def check_embedding(scorer: ClipScorer, n: int, seed: int = 0) -> None:
    from dynasyn.micro.world import (
        COLOURS,
        PATTERNS,
        SHAPES,
        Identity,
        SceneSpec,
        render,
        valid_actions,
    )

    rng = np.random.default_rng(seed)
    own = swapped = 0
    for _ in range(n):
        shapes = rng.choice(len(SHAPES), 2, replace=False)
        colours = rng.choice(len(COLOURS), 2, replace=False)
        ids = [Identity(SHAPES[s], list(COLOURS)[c], PATTERNS[rng.integers(len(PATTERNS))])
               for s, c in zip(shapes, colours, strict=True)]
        scene = render(SceneSpec(tuple(ids)), seed=int(rng.integers(10**6)))
        refs = [subject_reference(scene.image, m.astype(np.float32)) for m in scene.masks]
        k = int(rng.integers(2))
        acts = valid_actions(ids[k].shape)
        gen = render(SceneSpec((ids[k],), action=acts[rng.integers(len(acts))]),
                     seed=int(rng.integers(10**6)))
        e = scorer.image_embeds([blank_crop(gen.image, gen.masks[0].astype(np.float32)), *refs])
        own += detect_compare(e[:1], e[1:], [k])[0]["mixing"]
        swapped += detect_compare(e[:1], e[1:], [1 - k])[0]["mixing"]
    print(f"embedding on {n} true crops: mixing {own}/{n} with the own label, "
          f"{swapped}/{n} with the other subject's label")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evals", nargs="*", type=Path)
    ap.add_argument("--clip-model", default="micro")
    ap.add_argument("--renders", type=int, default=0)
    args = ap.parse_args(argv)
    scorer = ClipScorer.from_name(args.clip_model)
    for ev in args.evals:
        check_eval(ev, scorer)
    if args.renders:
        check_embedding(scorer, args.renders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
