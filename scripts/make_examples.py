"""Render the bundled example scenes of the micro world into ``examples/``.

Each example is a scene directory (docs/formats.md): ``img.png``, ``mask{i}.png`` (8-bit L,
white = subject) and ``scene.json`` with the class noun and identity phrase of every subject,
plus a ``"world"`` record (spec, seed, caption template) that the scene loader ignores.

Examples::

    python scripts/make_examples.py                 # writes examples/<name>/ (64x64)
    python scripts/make_examples.py --out /tmp/ex --size 128
    python scripts/make_examples.py --bench --out bench-scenes   # the benchmark's ten scenes

The output is deterministic: rerunning rewrites identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynasyn.micro.examples import BENCH_SCENES, EXAMPLES, write_example
from dynasyn.micro.world import render

ROOT = Path(__file__).resolve().parents[1]

def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python scripts/make_examples.py\n"
        "  python scripts/make_examples.py --out /tmp/ex --size 128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=ROOT / "examples", help="output folder")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--bench", action="store_true",
                    help="the benchmark's ten scenes (five tuning, five held out) instead")
    args = ap.parse_args(argv)
    specs = ({k: (spec, seed) for k, (spec, seed, _) in BENCH_SCENES.items()} if args.bench
             else EXAMPLES)
    for name, (spec, seed) in specs.items():
        r = render(spec, size=args.size, seed=seed)
        role = f" [{BENCH_SCENES[name][2]}]" if args.bench else ""
        print(f"{write_example(args.out, name, r)}: {r.caption()}{role}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
