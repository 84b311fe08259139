"""Pasted vs re-segmented L_AUG masks against where the subjects are in the final image.

    OMP_NUM_THREADS=1 python benchmarks/final_masks_iou.py [--items 6] [--scenes star_ball ...]

Augments micro example scenes with the bundled micro model (``--provider micro``, the
default GSA) and, for every item, compares both kinds of final mask on the *same* final image
with the subject's true pixels there: the micro parser's pixels of the subject's colour
(foreground, stray specks dropped). A subject whose colour is absent from the final image
(GSA lost its identity) has no truth and is skipped. Prints the mean IoU of the pasted masks
(``--final-masks pasted``), of the re-segmented ones with their fallback (``resegment``;
GrabCut refinement when OpenCV is installed, and without it on the same images), how
often the fallback was used, and paired bootstrap intervals of the difference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dynasyn.augment.describe import describe_subjects
from dynasyn.augment.pipeline import AugmentConfig, _Models, _scene_arrays, render_item
from dynasyn.augment.prompts import generate_prompts
from dynasyn.evaluate.exact import scene_references
from dynasyn.micro.parse import _COLOUR_NAMES, colour_labels, foreground, main_parts
from dynasyn.scene import load_scene

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def truth_mask(image: np.ndarray, colour: str | None) -> np.ndarray | None:
    """The subject's pixels in a micro-world image: its colour, foreground, main parts."""
    if colour is None:
        return None
    labels, _ = colour_labels(image)
    m = main_parts(foreground(image) & (labels == _COLOUR_NAMES.index(colour)))
    return m if m.sum() >= 8 else None


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", nargs="+", default=["star_ball", "cat_fish", "fish_ring",
                                                    "three_toys"])
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1000, help="item j renders with seed + j")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = AugmentConfig(model="micro", provider="micro", num_prompts=args.items,
                        final_masks="resegment").validate()
    models = _Models(cfg, torch.device("cpu"))
    rows, fallbacks, t0 = [], 0, time.time()
    from dynasyn.augment.resegment import resegment_masks

    for name in args.scenes:
        scene = load_scene(EXAMPLES / name)
        refs = scene_references(scene)
        phrases = describe_subjects(scene, provider="scene")
        items = generate_prompts(scene.classes, phrases, num_prompts=args.items,
                                 provider="micro", seed=0)
        scene_img, scene_masks = _scene_arrays(scene, 64)
        for j, item in enumerate(items):
            out = render_item(models, cfg, item, phrases, scene.classes, scene_img, scene_masks,
                              seed=args.seed + j)
            final = np.asarray(out["final"].convert("RGB"))
            plain, _ = resegment_masks(out["final"], out["final_maps"], out["pasted_masks"],
                                       grabcut=False)
            for slot, s in enumerate(item.subjects):
                fallbacks += out["mask_sources"][slot]["source"] == "pasted"
                t = truth_mask(final, refs[s].colour)
                if t is None:
                    continue
                rows.append((name, iou(out["pasted_masks"][slot], t), iou(out["masks"][slot], t),
                             iou(plain[slot], t)))
    p, r, g = (np.array([x[i] for x in rows]) for i in (1, 2, 3))
    idx = np.random.default_rng(0).integers(0, len(rows), (2000, len(rows)))

    def diff(a: np.ndarray) -> str:
        lo, hi = np.quantile((a - p)[idx].mean(1), [0.025, 0.975])
        return f"{np.mean(a - p):+.3f} [95 % bootstrap {lo:+.3f}, {hi:+.3f}]"

    print(f"{len(rows)} subject slots with a readable truth ({time.time() - t0:.0f} s)")
    for name in args.scenes:
        sel = [x for x in rows if x[0] == name]
        if sel:
            print(f"  {name}: pasted {np.mean([x[1] for x in sel]):.3f}  "
                  f"resegment {np.mean([x[2] for x in sel]):.3f}  "
                  f"(no GrabCut {np.mean([x[3] for x in sel]):.3f}, n={len(sel)})")
    print(f"mean IoU with the truth: pasted {p.mean():.3f}, resegment {r.mean():.3f} "
          f"(without GrabCut {g.mean():.3f})")
    print(f"resegment - pasted: {diff(r)}; without GrabCut: {diff(g)}")
    print(f"resegment better on {(r > p).sum()}, worse on {(r < p).sum()} of {len(rows)} slots; "
          f"fallback to the pasted mask on {fallbacks} slots (all items)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
