"""Exact identity of a benchmark's augmented images (the L_AUG training items themselves).

    python benchmarks/augmented_exact.py BENCH_DIR [--stage final|composed|draft]

For every micro-world scene of ``BENCH_DIR`` (a ``dynasyn benchmark`` output), each augmented
item (``BENCH_DIR/<scene>/augmented``) is read by the micro parser against the scene's subjects,
with the item's class prompt as its meaning: identity kept per subject named, action / relation
followed, identity mixing. ``--stage`` scores an earlier stage of the pipeline when its cache
is kept (``draft``: the model's draft; ``composed``: the real subjects pasted in, before GSA).
Prints one row per scene and the pooled rates with 95 % Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from dynasyn.evaluate.exact import prompt_meaning, rate, scene_references, score_image
from dynasyn.scene import load_scene


def score_dir(aug: Path, scene_dir: Path, stage: str = "final") -> list[dict]:
    """Score every item of one augmented directory; one record per item."""
    refs = scene_references(load_scene(scene_dir))
    out = []
    for line in (aug / "prompts.jsonl").read_text().splitlines():
        item = json.loads(line)
        path = aug / (item["image"] if stage == "final" else item[stage])
        if not path.is_file():
            continue
        rec = score_image(Image.open(path), item["subjects"], refs,
                          prompt_meaning(item["class_prompt"]))
        out.append(dict(rec, kind=item["kind"], prompt=item["class_prompt"]))
    return out


def _pct(k: int, n: int) -> str:
    if n == 0:
        return "–"
    r = rate(k, n)
    return f"{100 * r['rate']:.0f} % [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("--stage", default="final", choices=("final", "composed", "draft"))
    args = ap.parse_args(argv)
    scenes = json.loads((args.bench / "benchmark.json").read_text())["scenes"]
    total = [0, 0, 0, 0, 0]  # kept, subject-slots, followed, with-action, mixing
    print("| scene | items | identity kept | action followed | identity mixing |")
    print("|---|---|---|---|---|")
    for name, scene_dir in scenes.items():
        aug = args.bench / name / "augmented"
        if not (aug / "prompts.jsonl").is_file():
            continue
        recs = score_dir(aug, Path(scene_dir), args.stage)
        subj = [s for r in recs for s in r["subjects"]]
        act = [r["action_followed"] for r in recs if r["action_followed"] is not None]
        row = [sum(s["identity_kept"] for s in subj), len(subj), sum(act), len(act),
               sum(s["identity_mixing"] for s in subj)]
        total = [a + b for a, b in zip(total, row, strict=True)]
        print(f"| {name} | {len(recs)} | {_pct(row[0], row[1])} | {_pct(row[2], row[3])} | "
              f"{_pct(row[4], row[1])} |")
    print(f"| all | | {_pct(total[0], total[1])} | {_pct(total[2], total[3])} | "
          f"{_pct(total[4], total[1])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
