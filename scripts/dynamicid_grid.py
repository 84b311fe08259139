"""The README's DynamicID grid: two example scenes, their subjects in new motions, zero-shot.

    python scripts/dynamicid_grid.py --out docs/dynamicid_grid.png [--weights DIR]

Runs ``dynasyn zeroshot`` (bundled weights unless ``--weights``) on two example scenes of the
micro world, one row per prompt, seeds 0..N-1, and writes one labelled grid. No training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from dynasyn.demo import labelled_grid
from dynasyn.generate import slug

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "star_ball": ["<asset0> is jumping", "<asset0> is sleeping", "<asset1> is on the grass",
                  "<asset0> is on top of <asset1>"],
    "fish_ring": ["<asset0> is upside down", "<asset1> is tilted",
                  "<asset0> is next to <asset1>"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", help="DynamicID weights (default: the bundled ones)")
    ap.add_argument("-n", type=int, default=4)
    args = ap.parse_args()
    rows: list[tuple[str, list[Image.Image]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scene, prompts in ROWS.items():
            out = Path(tmp) / scene
            cmd = [sys.executable, "-m", "dynasyn.cli", "zeroshot", str(ROOT / "examples" / scene),
                   *prompts, "--out", str(out), "-n", str(args.n), "--no-progress"]
            if args.weights:
                cmd += ["--weights", args.weights]
            subprocess.run(cmd, check=True)
            classes = [s["class"] for s in json.loads((ROOT / "examples" / scene / "scene.json")
                                                      .read_text())["subjects"]]
            for p in prompts:
                label = p  # the subject's class in brackets: its identity comes from the crop
                for i, noun in enumerate(classes):
                    label = label.replace(f"<asset{i}>", f"[{noun}]")
                rows.append((label, [Image.open(out / f"{slug(p)}_{s}.png").convert("RGB")
                                     for s in range(args.n)]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
