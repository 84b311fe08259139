"""Pool the exact metrics of several benchmark runs over the same scenes (e.g. seeds 0-1 in one
``--out``, seed 2 in another) into one table.

    python benchmarks/merge_exact.py DIR_A DIR_B [...] [--out table.md]

Each ``DIR`` holds a benchmark's ``exact.csv`` and ``cells.csv`` (its ``--out``, or a copy of
those two files). Image counts ``k / n`` are summed per preset, category and metric and the
rates get 95 % Wilson intervals over the pooled images; the text ceiling, which depends on the
scenes and evaluation seeds only, is counted once per scene (taken from the first directory
of each scene set: directories over the same scenes do not add it up, over other scenes do).
With ``--seed S`` only the runs of training seed ``S`` are pooled: their image counts are
rebuilt from ``cells.csv`` (a cell's rate times its images, ``n / runs`` in ``exact.csv``).
Then, paired by scene and training seed from ``cells.csv``: in how many runs DynASyn's identity
kept over all prompts, and its action followed, are above, equal to or below Break-a-Scene's, with the
mean difference and a 95 % bootstrap interval over scenes.
With ``--plot PNG``, the pooled identity-vs-action plot of every run of every directory (the
benchmark's own :func:`~dynasyn.evaluate.benchmark.identity_action_plot`: one small dot per
run, a large one per preset with its pooled Wilson interval, the text ceiling pooled).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from dynasyn.atomic import atomic_file
from dynasyn.config import atomic_write_text
from dynasyn.evaluate.metrics import bootstrap_interval, wilson_interval

COLUMNS = [  # (header, category, metric)
    ("identity kept, all prompts", "overall", "identity_kept"),
    ("identity kept, action prompts", "action", "identity_kept"),
    ("action followed", "acting", "action_followed"),
    ("identity & action (action prompts)", "action", "identity_and_action"),
    ("identity mixing", "overall", "identity_mixing"),
]
NAMES = {"dynasyn": "DynASyn", "break-a-scene": "Break-a-Scene", "dreambooth": "DB (+mask)",
         "mudi": "MuDI (Seg-Mix)", "textual-inversion": "TI", "md": "MD + M2A",
         "md+app": "MD + M2A + ICA", "md+act": "MD + M2A + AUG", "text-ceiling": "text ceiling"}
CEILING = "text-ceiling"


def scenes_of(d: Path) -> frozenset[str]:
    """The scenes of a benchmark directory, from its ``cells.csv``."""
    return frozenset(r["scene"] for r in csv.DictReader((d / "cells.csv").open()))


def pooled(dirs: list[Path]) -> tuple[dict, dict]:
    """``{(preset, category, metric): [k, n]}`` and ``{preset: runs}`` over ``dirs``.

    The text ceiling is counted once per scene: from the first directory of each scene set
    (directories over disjoint scene sets add theirs up; one that shares only some scenes with
    an earlier one is refused)."""
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    runs: dict[str, int] = defaultdict(int)
    ceiling_scenes: set[str] = set()
    for d in dirs:
        rows = list(csv.DictReader((d / "exact.csv").open()))
        scenes = scenes_of(d)
        use_ceiling = any(r["preset"] == CEILING for r in rows) and not scenes & ceiling_scenes
        if scenes & ceiling_scenes and not scenes <= ceiling_scenes:
            print(f"merge_exact: {d} shares only some scenes with an earlier directory; "
                  "pool directories over the same or over disjoint scenes", file=sys.stderr)
            raise SystemExit(2)
        if use_ceiling:
            ceiling_scenes |= scenes
        for r in rows:
            if r["preset"] == CEILING and not use_ceiling:
                continue
            c = counts[(r["preset"], r["category"], r["metric"])]
            c[0] += int(r["k"])
            c[1] += int(r["n"])
        for preset in {r["preset"] for r in rows}:
            if preset != CEILING or use_ceiling:
                runs[preset] += max(int(r["runs"] or 0) for r in rows if r["preset"] == preset)
    return counts, runs


def pooled_seed(dirs: list[Path], seed: str) -> tuple[dict, dict]:
    """:func:`pooled` restricted to the runs of training seed ``seed`` (the ceiling kept)."""
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    runs: dict[str, int] = defaultdict(int)
    all_counts, all_runs = pooled(dirs)
    for key, kn in all_counts.items():
        if key[0] == CEILING:
            counts[key] = kn
    runs[CEILING] = all_runs.get(CEILING, 0)
    metrics = {k[2] for k in all_counts}
    for d in dirs:
        for r in csv.DictReader((d / "cells.csv").open()):
            if r["seed"] != seed or r["preset"] == CEILING:
                continue
            if r["category"] == "plain":
                runs[r["preset"]] += 1
            for metric in metrics:
                total = all_counts.get((r["preset"], r["category"], metric))
                if not r.get(metric) or not total or not total[1]:
                    continue
                n = total[1] // all_runs[r["preset"]]
                k = round(float(r[metric]) * n)
                for cat in (r["category"], "overall") + (
                        ("acting",) if r["category"] != "plain" else ()):
                    c = counts[(r["preset"], cat, metric)]
                    c[0] += k
                    c[1] += n
    return counts, runs


def table(counts: dict, runs: dict) -> str:
    presets = [p for p in NAMES if any(k[0] == p for k in counts)]
    lines = ["| method | runs | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for p in presets:
        cells = []
        for _, cat, metric in COLUMNS:
            k, n = counts.get((p, cat, metric), (0, 0))
            if n == 0:
                cells.append("–")
                continue
            lo, hi = wilson_interval(k, n)
            cells.append(f"{100 * k / n:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]")
        what = f"{runs[p]} scenes" if p == CEILING else str(runs[p])
        lines.append(f"| {NAMES[p]} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(dirs: list[Path], metric: str = "identity_kept", a: str = "dynasyn",
           b: str = "break-a-scene", seed: str | None = None) -> str:
    """``metric`` of ``a`` against ``b``, paired by scene and seed: identity kept over all
    prompts (categories weighted by their subject images: plain 1, action 1, interaction 2)
    or action followed over the action and interaction prompts (1 and 1). With ``seed``, only
    that training seed's runs."""
    weights = ({"plain": 1, "action": 1, "interaction": 2} if metric == "identity_kept"
               else {"action": 1, "interaction": 1})
    value: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for d in dirs:
        acc: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in csv.DictReader((d / "cells.csv").open()):
            if r["category"] in weights and r[metric] and seed in (None, r["seed"]):
                w = weights[r["category"]]
                s = acc[(r["scene"], r["seed"], r["preset"])]
                s[0] += w * float(r[metric])
                s[1] += w
        for (scene, run_seed, preset), (num, den) in acc.items():
            value[(scene, run_seed)][preset] = num / den
    pairs = [v for v in value.values() if a in v and b in v]
    above = sum(v[a] > v[b] for v in pairs)
    below = sum(v[a] < v[b] for v in pairs)
    what = ("identity kept over all prompts" if metric == "identity_kept"
            else "action followed over the action and interaction prompts")
    text = (f"{NAMES[a]} vs {NAMES[b]}, {what}, paired by scene and seed: above in {above}, "
            f"equal in {len(pairs) - above - below}, below in {below} of {len(pairs)} runs")
    diffs: dict[str, list[float]] = defaultdict(list)
    for (scene, _), v in value.items():
        if a in v and b in v:
            diffs[scene].append(100 * (v[a] - v[b]))
    if diffs:
        mean, lo, hi = scene_bootstrap(diffs)
        text += (f"; mean difference {mean:+.1f} points [95 % bootstrap over the "
                 f"{len(diffs)} scenes: {lo:+.1f}, {hi:+.1f}]")
    return text


def scene_bootstrap(diffs: dict[str, list[float]]) -> tuple[float, float, float]:
    """Mean of the paired differences of every run and its 95 % interval from the project's
    cluster bootstrap (:func:`~dynasyn.evaluate.metrics.bootstrap_interval`) with whole scenes
    (all their seeds) as the clusters: runs of one scene share the scene, so the scene is the
    unit that varies. One scene gives a zero-width interval."""
    groups = [(sum(d), len(d)) for d in diffs.values()]
    mean = sum(k for k, _ in groups) / sum(n for _, n in groups)
    lo, hi = bootstrap_interval(groups) or (mean, mean)
    return mean, lo, hi


ACTING = ("action", "interaction")


def run_points(dirs: list[Path]) -> list[dict]:
    """One point per run (scene, preset, training seed) of every directory: its identity kept
    and action followed over the images of the action and interaction prompts, each category
    weighted by its images per run (``n / runs`` of that directory's ``exact.csv``)."""
    points = []
    for d in dirs:
        per_run: dict[tuple[str, str, str], float] = {}
        for r in csv.DictReader((d / "exact.csv").open()):
            if r["preset"] != CEILING and r["category"] in ACTING and int(r["runs"] or 0):
                per_run[(r["preset"], r["category"], r["metric"])] = int(r["n"]) / int(r["runs"])
        acc: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(lambda: [0.0, 0.0]))
        for r in csv.DictReader((d / "cells.csv").open()):
            if r["category"] not in ACTING or r["preset"] == CEILING:
                continue
            for metric in ("identity_kept", "action_followed"):
                n = per_run.get((r["preset"], r["category"], metric), 0)
                if r.get(metric) and n:
                    s = acc[(r["scene"], r["seed"], r["preset"])][metric]
                    s[0] += float(r[metric]) * n
                    s[1] += n
        for (scene, seed, preset), m in acc.items():
            points.append({"scene": scene, "seed": seed, "preset": preset,
                           **{k: (m[k][0] / m[k][1] if m[k][1] else None)
                              for k in ("identity_kept", "action_followed")}})
    return points


def plot_stats(counts: dict, runs: dict, points: list[dict]) -> dict:
    """The pooled counts in the shape :func:`identity_action_plot` reads (``"exact"``,
    ``"exact_ceiling"``, ``"exact_runs"``); intervals are Wilson over the pooled images."""
    def acting(preset: str) -> dict:
        out = {}
        for metric in ("identity_kept", "action_followed"):
            k = sum(counts.get((preset, c, metric), (0, 0))[0] for c in ACTING)
            n = sum(counts.get((preset, c, metric), (0, 0))[1] for c in ACTING)
            out[metric] = {"k": k, "n": n, "runs": runs.get(preset, 0),
                           "rate": k / n if n else None,
                           "ci95": list(wilson_interval(k, n)) if n else None}
        return {"acting": out}

    presets = [p for p in NAMES if p != CEILING and any(k[0] == p for k in counts)]
    return {"exact": {p: acting(p) for p in presets},
            "exact_ceiling": acting(CEILING) if runs.get(CEILING) else {},
            "exact_runs": points}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", help="pool only the runs of this training seed")
    ap.add_argument("--plot", type=Path, help="write the pooled identity-vs-action plot here")
    args = ap.parse_args()
    counts, runs = pooled_seed(args.dirs, args.seed) if args.seed else pooled(args.dirs)
    text = (table(counts, runs) + "\n\n" + paired(args.dirs, seed=args.seed) + "\n\n"
            + paired(args.dirs, "action_followed", seed=args.seed) + "\n")
    image = None
    if args.plot:
        from dynasyn.evaluate.benchmark import identity_action_plot

        points = [p for p in run_points(args.dirs) if args.seed in (None, p["seed"])]
        image = identity_action_plot(plot_stats(counts, runs, points))
        if image is None:
            print("merge_exact: no run has exact metrics of action prompts to plot; "
                  "give directories of micro-world benchmarks", file=sys.stderr)
            raise SystemExit(2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if image is not None:
        with atomic_file(args.plot) as tmp:
            image.save(tmp, format="PNG")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
