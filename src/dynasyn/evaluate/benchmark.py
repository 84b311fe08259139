"""``dynasyn benchmark``: train every preset on every scene and seed, evaluate, tabulate.

The output directory holds one *cell* per (scene, preset, seed)::

    OUT/benchmark.json                      settings (a rerun must use the same ones)
    OUT/<scene>/augmented/                  one augmentation per scene, shared by every preset
                                            with L_AUG (lambda_aug > 0) and every seed
    OUT/<scene>/<preset>/seed<k>/run/       the trained run (``dynasyn train`` output)
    OUT/<scene>/<preset>/seed<k>/eval/      its evaluation (``dynasyn evaluate`` output)
    OUT/table1.md, table1.csv               the paper's Table 1: methods × Plain / Action /
                                            Interaction × IR / CLIP-T / CLIP-I (+ ID-region)
    OUT/table3.md, table3.csv               the paper's Table 3: ablations MD, MD+App, MD+Act,
                                            MD+App+Act (= dynasyn), averaged over categories
    OUT/cells.csv                           every finished cell's per-category means
    OUT/exact.csv                           micro-world scenes: the exact metrics of every
                                            preset and the text ceiling, per category
    OUT/identity_action.png                 micro-world scenes: identity kept vs action
                                            followed, one point per run (:func:`identity_action_plot`)
    OUT/ceiling_cache/                      the text ceiling's images, shared by every cell
    OUT/figure.png                          the methods side by side on the same prompts and
                                            noise (first scene and seed; :func:`comparison_figure`)

A cell is finished when ``eval/metrics.json`` exists; a rerun skips it, so an interrupted
benchmark is resumed by running the same command again (a run without ``run.json`` is resumed
from its newest checkpoint when it has one, otherwise retrained from scratch). Every table cell
is "mean ± std over scenes and seeds" of the per-run category means (population std, like
``metrics.json``). Under ``accelerate launch`` / torchrun each process takes every N-th
unfinished cell and trains it alone (its own device, no gradient averaging); augmentation is
shared by all processes, and the main process writes the tables once every process is done.

On micro-world scenes the tables also hold the *exact* metrics (:mod:`dynasyn.evaluate.exact`)
pooled over scenes and seeds per preset — the rate over all images, with a 95 % interval from a
bootstrap over the runs (scenes × seeds; Wilson over the images when there is one run) — and a
row for the text ceiling (the base model with the subjects' identity phrases on the same prompts
and seeds, rendered once per scene: its images are cached in ``OUT/ceiling_cache``). A finished
cell scored with older exact definitions (or none) is rescored from its saved images.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dynasyn.augment.pipeline import AugmentConfig, augment
from dynasyn.checkpoint import list_checkpoints
from dynasyn.config import TrainConfig, atomic_write_text, build_config, load_config
from dynasyn.errors import InputError
from dynasyn.evaluate.metrics import bootstrap_interval, mean_std, wilson_interval
from dynasyn.evaluate.prompts import CATEGORIES
from dynasyn.evaluate.run import METRICS_FILE, evaluate
from dynasyn.presets import PRESETS
from dynasyn.scene import load_scene
from dynasyn.train import RUN_INFO, make_accelerator, train

__all__ = [
    "CEILING_CACHE",
    "EXACT_COLUMNS",
    "FIGURE",
    "PLOT",
    "ABLATION_LABELS",
    "COLUMNS",
    "MANIFEST",
    "METHOD_LABELS",
    "PAPER_TABLE1",
    "PAPER_TABLE3",
    "Cell",
    "comparison_figure",
    "collect",
    "exact_csv",
    "identity_action_plot",
    "run_benchmark",
    "table1_markdown",
    "table3_markdown",
]

log = logging.getLogger("dynasyn")

MANIFEST = "benchmark.json"
"""The file that marks a benchmark directory and holds its settings."""

METHOD_LABELS: dict[str, str] = {
    "textual-inversion": "TI (+mask)",
    "dreambooth": "DB (+mask)",
    "break-a-scene": "Break-a-Scene",
    "mudi": "MuDI (Seg-Mix)",
    "dynasyn": "DynASyn",
}
"""Table 1's rows (the paper's order): preset -> the paper's method name (MuDI is not in the
paper's table; its row has no reported values)."""

ABLATION_LABELS: dict[str, str] = {
    "md": "MD",
    "md+app": "MD+App",
    "md+act": "MD+Act",
    "dynasyn": "MD+App+Act",
}
"""Table 3's rows: preset -> the paper's ablation name."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("IR", "image_reward"),
    ("CLIP-T", "clip_t"),
    ("CLIP-I", "clip_i"),
    ("ID-region", "identity_region"),
)
"""(column label, metrics.json metric) of both tables; the paper reports the first three."""

PAPER_TABLE1: dict[str, dict[str, tuple[float, float, float]]] = {
    "textual-inversion": {"plain": (0.45, 0.285, 0.71), "action": (0.41, 0.252, 0.688),
                          "interaction": (0.208, 0.225, 0.659)},
    "dreambooth": {"plain": (0.713, 0.306, 0.84), "action": (0.509, 0.274, 0.79),
                   "interaction": (0.459, 0.247, 0.823)},
    "break-a-scene": {"plain": (0.837, 0.351, 0.774), "action": (0.604, 0.31, 0.732),
                      "interaction": (0.58, 0.296, 0.679)},
    "dynasyn": {"plain": (0.901, 0.376, 0.797), "action": (0.827, 0.359, 0.771),
                "interaction": (0.758, 0.346, 0.731)},
}
"""The paper's Table 1 (IR, CLIP-T, CLIP-I), as reported (SD 2.1, real CLIP, one scene)."""

PAPER_TABLE3: dict[str, tuple[float, float, float]] = {
    "md": (0.341, 0.292, 0.767),
    "md+app": (0.616, 0.298, 0.786),
    "md+act": (0.732, 0.306, 0.76),
    "dynasyn": (0.829, 0.360, 0.767),
}
"""The paper's Table 3 (IR, CLIP-T, CLIP-I; the mean of its three categories), as reported."""

_CELL_KEYS = ("scene", "preset", "seed")
_RESERVED_TRAIN = ("preset", "scene", "seed", "augmented", "model", "classes")
_UNCOMPARED = ("device", "checkpoint_every", "keep_checkpoints", "log_every")
_DASH = "–"
_EVAL_SETTINGS = frozenset(inspect.signature(evaluate).parameters) - {
    "run", "out", "progress", "ceiling_cache"}

CEILING_CACHE = "ceiling_cache"
"""Directory in ``OUT`` of the text ceiling's images (shared by every cell of a scene)."""

EXACT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ID kept", "identity_kept"),
    ("Action", "action_followed"),
    ("ID & action", "identity_and_action"),
    ("Mixing", "identity_mixing"),
    ("Leak", "identity_mixing_leak"),
)
"""(column label, exact metric) of the tables' exact columns (micro-world scenes)."""

CEILING_LABEL = "Text ceiling"
"""The tables' row of the text ceiling."""

ACTING = ("action", "interaction")
"""The categories whose prompts ask for an action or relation (the plot's images)."""


@dataclass(frozen=True)
class Cell:
    """One (scene, preset, seed) of the benchmark and where it lives."""

    scene: str
    scene_dir: Path
    preset: str
    seed: int
    root: Path

    @property
    def dir(self) -> Path:
        """``OUT/<scene>/<preset>/seed<k>``."""
        return self.root / self.scene / self.preset / f"seed{self.seed}"

    @property
    def run(self) -> Path:
        """The cell's run directory."""
        return self.dir / "run"

    @property
    def eval(self) -> Path:
        """The cell's evaluation directory."""
        return self.dir / "eval"

    @property
    def finished(self) -> bool:
        """True when the cell's ``metrics.json`` exists (a rerun skips it)."""
        return (self.eval / METRICS_FILE).is_file()

    @property
    def needs_aug(self) -> bool:
        """True when the preset trains with L_AUG (it needs the scene's augmented data)."""
        return PRESETS[self.preset]["lambda_aug"] > 0

    @property
    def name(self) -> str:
        """``scene/preset/seed<k>`` (for messages)."""
        return f"{self.scene}/{self.preset}/seed{self.seed}"


class _LocalAccelerator:
    """A process's accelerator seen as a one-process world.

    Each benchmark process trains its own cells, so the trainer must neither average gradients
    with the other processes nor wait for them; device, autocast and backward are the real
    accelerator's.
    """

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True

    def __init__(self, accelerator: Any) -> None:
        self._acc = accelerator
        self.device = accelerator.device

    def wait_for_everyone(self) -> None:
        """No other process takes part in this training."""

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """The reduction over one process is the tensor itself."""
        return tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._acc, name)


# ------------------------------------------------------------------------------ validation


def _as_list(value: Sequence[Any] | str | int, what: str) -> list[Any]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    items = [v for v in value if not (isinstance(v, str) and not v)]
    if not items:
        raise InputError(f"no {what} given")
    return list(dict.fromkeys(items))


def _seeds(seeds: Sequence[int] | str | int) -> list[int]:
    out = []
    for s in _as_list(seeds, "seeds (--seeds 0,1)"):
        try:
            k = int(s)
        except (TypeError, ValueError):
            raise InputError(f"seed {s!r} is not an integer; pass --seeds like 0,1") from None
        if k < 0:
            raise InputError(f"seeds must be >= 0 (got {k})")
        out.append(k)
    return list(dict.fromkeys(out))


def _presets(presets: Sequence[str] | str) -> list[str]:
    names = [str(p) for p in _as_list(presets, "presets (--presets dynasyn,break-a-scene,…)")]
    for p in names:
        if p not in PRESETS:
            raise InputError(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    return names


def _scenes(scenes: Sequence[str | Path] | str | Path,
            classes: Sequence[str] | None = None) -> dict[str, Path]:
    if isinstance(scenes, str | Path):
        scenes = [scenes]
    if not scenes:
        raise InputError("no scene given: pass one or more scene directories")
    out: dict[str, Path] = {}
    for s in scenes:
        p = Path(s).expanduser().resolve()
        load_scene(p, classes=classes)  # one-line InputError for a bad scene (or no classes)
        if p.name in out and out[p.name] != p:
            raise InputError(f"two scenes are named {p.name!r} ({out[p.name]} and {p}); "
                             "cells are named by the scene directory's name, rename one")
        out[p.name] = p
    return out


def _eval_kwargs(eval_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kw = dict(eval_kwargs or {})
    allowed = _EVAL_SETTINGS
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise InputError(f"unknown evaluation setting {unknown[0]!r}; valid: "
                         f"{', '.join(sorted(allowed))}")
    if kw.get("prompt_file") is not None:
        f = Path(kw["prompt_file"]).expanduser().resolve()
        if not f.is_file():
            raise InputError(f"prompt file {f} does not exist; check --prompt-file")
        kw["prompt_file"] = str(f)
    cats = kw.get("categories", CATEGORIES)
    if isinstance(cats, str):
        cats = [c.strip() for c in cats.split(",") if c.strip()]
    cats = list(cats)
    bad = [c for c in cats if c not in CATEGORIES]
    if bad or not cats:
        raise InputError(f"unknown prompt category {bad[0] if bad else ''!r}; "
                         f"choose from {', '.join(CATEGORIES)}")
    kw["categories"] = cats
    for name in ("n", "steps"):
        if name in kw and int(kw[name]) < 1:
            raise InputError(f"--{name} must be >= 1 (got {kw[name]})")
    if kw.get("limit") is not None and int(kw["limit"]) < 1:
        raise InputError(f"--limit must be >= 1 (got {kw['limit']})")
    clip = kw.get("clip_model", "micro")
    if str(clip) == "micro":
        from dynasyn.evaluate.metrics import MICRO_FIX
        from dynasyn.micro.models import micro_clip_path

        if not (micro_clip_path() / "config.json").is_file():
            raise InputError(f"the bundled micro CLIP is not installed; {MICRO_FIX}")
    else:
        from dynasyn.evaluate.metrics import _resolve_model_dir

        p = Path(clip).expanduser()
        kw["clip_model"] = _resolve_model_dir(
            str(p.resolve()) if p.is_dir() else str(clip), "CLIP model",
            "pass a transformers CLIPModel directory or hub id to --clip-model")
    return kw


def _phase_steps(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``phase1_steps`` / ``phase2_steps`` overrides to ``preset``.

    A preset that trains one phase only (DB: phase 2, TI: phase 1) keeps it that way and gets
    the sum of the two in that phase, so every method trains the same number of steps (a
    missing override counts as DynASyn's default for that phase).
    """
    o1, o2 = overrides.get("phase1_steps"), overrides.get("phase2_steps")
    if o1 is None and o2 is None:
        return overrides
    p = PRESETS[preset]
    if p["phase1_steps"] and p["phase2_steps"]:
        return overrides
    try:
        total = (int(o1) if o1 is not None else PRESETS["dynasyn"]["phase1_steps"]) + \
            (int(o2) if o2 is not None else PRESETS["dynasyn"]["phase2_steps"])
    except (TypeError, ValueError):
        raise InputError(f"phase steps must be integers (got {o1!r}, {o2!r})") from None
    if p["phase1_steps"] == 0:
        return dict(overrides, phase1_steps=0, phase2_steps=total)
    return dict(overrides, phase1_steps=total, phase2_steps=0)


def _cell_config(cell: Cell, model: str, overrides: dict[str, Any]) -> TrainConfig:
    ov = _phase_steps(cell.preset, dict(overrides))
    aug = cell.root / cell.scene / "augmented"
    ov.update(model=model, scene=str(cell.scene_dir), seed=cell.seed,
              augmented=str(aug) if cell.needs_aug else None)
    return build_config(cell.preset, overrides=ov)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _settings(model: str, train_overrides: dict[str, Any], eval_kwargs: dict[str, Any],
              augment_cfg: dict[str, Any] | None) -> dict[str, Any]:
    drop = set(_UNCOMPARED)
    return _jsonable({
        "model": model,
        "train": {k: v for k, v in sorted(train_overrides.items()) if k not in drop},
        "evaluate": {k: v for k, v in sorted(eval_kwargs.items()) if k not in drop},
        "augment": augment_cfg,
    })


def _same_augment(new: dict[str, Any] | None, old: dict[str, Any] | None) -> bool:
    """Whether two recorded augmentation settings make the same items. ``None`` (this call
    augments nothing) matches anything; an option the older record lacks (added to the
    project after it was written) matches when the new value is that option's default."""
    if new is None or old is None:
        return True
    defaults = {f.name: f.default for f in fields(AugmentConfig)}
    new = {k: v for k, v in new.items()
           if k in old or k not in defaults or v != _jsonable(defaults[k])}
    return new == old


def _check_out(out: Path, settings: dict[str, Any], scenes: dict[str, Path]) -> dict[str, Any]:
    """Refuse an unusable output directory; return the manifest to write."""
    manifest: dict[str, Any] = {"version": 1, "settings": settings, "scenes": {}}
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        f = out / MANIFEST
        if not f.is_file():
            raise InputError(f"output directory {out} is not empty and holds no benchmark "
                             f"({MANIFEST}); choose another --out")
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError):
            raise InputError(f"{f} is unreadable; choose another --out") from None
        before = old.get("settings") or {}
        diff = [k for k in ("model", "train", "evaluate") if settings.get(k) != before.get(k)]
        if not _same_augment(settings["augment"], before.get("augment")):
            diff.append("augment")
        if diff:
            raise InputError(
                f"{out} holds a benchmark with other {'/'.join(diff)} settings; rerun it with "
                "the same settings (scenes, presets and seeds may change) or choose another --out"
            )
        if settings["augment"] is None:  # keep the augmentation settings of earlier calls
            manifest["settings"] = dict(settings, augment=before.get("augment"))
        manifest["scenes"] = dict(old.get("scenes", {}))
    for name, path in scenes.items():
        if manifest["scenes"].get(name, str(path)) != str(path):
            raise InputError(f"{out} already holds scene {name!r} from "
                             f"{manifest['scenes'][name]}, not {path}; choose another --out")
        manifest["scenes"][name] = str(path)
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}; choose another --out")
    return manifest


# ------------------------------------------------------------------------------ cells


def _train_cell(cell: Cell, cfg: TrainConfig, progress: bool, local: bool) -> str:
    acc = _LocalAccelerator(make_accelerator(cfg)) if local else None
    if cell.run.is_dir() and list_checkpoints(cell.run / "checkpoints") \
            and (cell.run / "config.yaml").is_file():
        train(load_config(cell.run / "config.yaml"), cell.run, resume=True, progress=progress,
              accelerator=acc)
        return "resumed"
    train(cfg, cell.run, overwrite=True, progress=progress, accelerator=acc)
    return "trained"


def _eval_cell(cell: Cell, eval_kwargs: dict[str, Any], progress: bool) -> None:
    for stale in cell.dir.glob(".eval.*"):  # temporary directories of a killed evaluation
        shutil.rmtree(stale, ignore_errors=True)
    if cell.eval.exists():  # an evaluation whose metrics.json was removed: redo it
        shutil.rmtree(cell.eval)
    evaluate(cell.run, out=cell.eval, progress=progress,
             ceiling_cache=cell.root / CEILING_CACHE, **eval_kwargs)


def _do_cell(cell: Cell, cfg: TrainConfig, eval_kwargs: dict[str, Any], progress: bool,
             local: bool) -> str:
    status = "evaluated"
    if not (cell.run / RUN_INFO).is_file():
        status = _train_cell(cell, cfg, progress, local)
    _eval_cell(cell, eval_kwargs, progress)
    (cell.dir / "error.txt").unlink(missing_ok=True)
    return status


# ------------------------------------------------------------------------------ tables


def _category_means(metrics: dict[str, Any], categories: Sequence[str]) -> dict[str, dict]:
    cats = metrics.get("categories", {})
    out: dict[str, dict[str, float | None]] = {}
    for cat in categories:
        stats = cats.get(cat, {})
        out[cat] = {key: (stats.get(key) or {}).get("mean") for _, key in COLUMNS}
        out[cat]["clip_i_subject"] = (stats.get("clip_i_subject") or {}).get("mean")
    return out


def _exact_metrics(cell: Cell, rescore: bool) -> dict[str, Any]:
    """The cell's ``metrics.json``; with ``rescore``, a micro-world cell scored with older
    exact definitions (or none) is rescored from its saved images and written back."""
    from dynasyn.evaluate.exact import EXACT_VERSION
    from dynasyn.evaluate.exact import rescore as rescore_exact
    from dynasyn.evaluate.prompts import is_micro_scene

    path = cell.eval / METRICS_FILE
    metrics = json.loads(path.read_text())
    classes = metrics.get("classes") or []
    if not rescore or not is_micro_scene(classes) or \
            (metrics.get("exact") or {}).get("version") == EXACT_VERSION:
        return metrics
    from dynasyn.evaluate.exact import scene_references

    try:
        refs = scene_references(load_scene(cell.scene_dir, classes=classes))
        metrics = rescore_exact(metrics, cell.eval, refs)
    except (OSError, InputError, ValueError) as e:
        log.warning("benchmark cell %s: exact metrics not rescored (%s)", cell.name, e)
        return metrics
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def _exact_counts(block: dict[str, Any] | None, categories: Sequence[str]
                  ) -> dict[str, dict[str, tuple[int, int]]] | None:
    """``{category | "overall" | "acting": {metric: (k, n)}}`` of an ``"exact"`` (or
    ``"exact_ceiling"``) section; ``acting`` pools the action and interaction categories."""
    if not block or "categories" not in block:
        return None
    cats = block["categories"]
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for cat in categories:
        st = cats.get(cat) or {}
        out[cat] = {m: (int((st.get(m) or {}).get("k", 0)), int((st.get(m) or {}).get("n", 0)))
                    for _, m in EXACT_COLUMNS}
    overall = block.get("overall") or {}
    out["overall"] = {m: (int((overall.get(m) or {}).get("k", 0)),
                          int((overall.get(m) or {}).get("n", 0))) for _, m in EXACT_COLUMNS}
    out["acting"] = {m: (sum(out[c][m][0] for c in ACTING if c in out),
                         sum(out[c][m][1] for c in ACTING if c in out)) for _, m in EXACT_COLUMNS}
    return out


def _pooled(groups: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """A rate pooled over groups (runs or scenes): ``{"rate", "k", "n", "ci95" (Wilson over
    the images), "ci95_runs" (bootstrap over the groups; None under two), "runs"}``."""
    k, n = sum(g[0] for g in groups), sum(g[1] for g in groups)
    if n == 0:
        return {"rate": None, "k": 0, "n": 0, "ci95": None, "ci95_runs": None, "runs": 0}
    boot = bootstrap_interval(groups)
    return {"rate": round(k / n, 6), "k": k, "n": n,
            "ci95": [round(v, 6) for v in wilson_interval(k, n)],
            "ci95_runs": None if boot is None else [round(v, 6) for v in boot],
            "runs": sum(1 for g in groups if g[1] > 0)}


def _exact_stats(per_run: dict[str, list[dict[str, dict[str, tuple[int, int]]]]],
                 keys: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    return {p: {key: {m: _pooled([r[key][m] for r in runs]) for _, m in EXACT_COLUMNS}
                for key in keys} for p, runs in per_run.items()}


def collect(cells: Sequence[Cell], categories: Sequence[str] = CATEGORIES,
            rescore: bool = False) -> dict[str, Any]:
    """Read every finished cell's ``metrics.json`` into both tables' statistics.

    Args:
        cells: the benchmark's cells.
        categories: the prompt categories of the tables.
        rescore: rescore micro-world cells scored with older exact definitions from their
            saved images (and write their ``metrics.json``).

    Returns:
        ``{"table1": {preset: {category: {metric: {mean, std, n}}}}, "table3": {preset:
        {metric: {mean, std, n}}}, "rows": [per cell and category means], "missing":
        [unfinished cell names], "exact": {preset: {category | "overall" | "acting":
        {metric: pooled rate}}}, "exact_ceiling": {category | ...: {metric: pooled rate}},
        "exact_runs": [per cell: scene, preset, seed, its "acting" identity_kept and
        action_followed rates], "ceiling_runs": [per scene, the same]}``; a statistic is over
        the runs (scenes × seeds) of the preset, Table 3's per run the mean over the categories
        it has; an exact rate is pooled over the images of every run (``"acting"``: the action
        and interaction prompts), the ceiling's over each scene once.
    """
    per_run: dict[str, list[dict[str, dict[str, float | None]]]] = {}
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    exact_runs: dict[str, list[dict[str, dict[str, tuple[int, int]]]]] = {}
    run_points: list[dict[str, Any]] = []
    ceilings: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for cell in cells:
        if not cell.finished:
            err = cell.dir / "error.txt"
            why = err.read_text().splitlines()[0] if err.is_file() else "not run"
            missing.append(f"{cell.name} ({why})")
            continue
        metrics = _exact_metrics(cell, rescore)
        means = _category_means(metrics, categories)
        per_run.setdefault(cell.preset, []).append(means)
        ex = _exact_counts(metrics.get("exact"), categories)
        if ex is not None:
            exact_runs.setdefault(cell.preset, []).append(ex)
            run_points.append({"scene": cell.scene, "preset": cell.preset, "seed": cell.seed,
                               **{m: _rate(ex["acting"][m]) for _, m in EXACT_COLUMNS}})
        ceiling = _exact_counts(metrics.get("exact_ceiling"), categories)
        if ceiling is not None and cell.scene not in ceilings:
            ceilings[cell.scene] = ceiling
        for cat, vals in means.items():
            rows.append({"scene": cell.scene, "preset": cell.preset, "seed": cell.seed,
                         "category": cat, **vals,
                         **{m: (_rate(ex[cat][m]) if ex is not None else None)
                            for _, m in EXACT_COLUMNS}})
    table1: dict[str, dict[str, dict[str, dict]]] = {}
    table3: dict[str, dict[str, dict]] = {}
    for preset, runs in per_run.items():
        table1[preset] = {cat: {key: mean_std(r[cat][key] for r in runs) for _, key in COLUMNS}
                          for cat in categories}
        table3[preset] = {}
        for _, key in COLUMNS:
            run_means = []
            for r in runs:
                vals = [r[c][key] for c in categories if r[c][key] is not None]
                run_means.append(sum(vals) / len(vals) if vals else None)
            table3[preset][key] = mean_std(run_means)
    keys = [*categories, "overall", "acting"]
    ceiling_stats = (_exact_stats({"ceiling": list(ceilings.values())}, keys)["ceiling"]
                     if ceilings else {})
    ceiling_points = [{"scene": scene, **{m: _rate(c["acting"][m]) for _, m in EXACT_COLUMNS}}
                      for scene, c in ceilings.items()]
    return {"table1": table1, "table3": table3, "rows": rows, "missing": missing,
            "exact": _exact_stats(exact_runs, keys), "exact_ceiling": ceiling_stats,
            "exact_runs": run_points, "ceiling_runs": ceiling_points}


def _rate(kn: tuple[int, int]) -> float | None:
    return round(kn[0] / kn[1], 6) if kn[1] else None


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return _DASH
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _runs(stats: dict[str, dict]) -> int:
    return max((s.get("n", 0) for s in stats.values()), default=0)


_LEGEND = (
    "IR: ImageReward ({dash} when the `image-reward` package or its weights are not installed); "
    "CLIP-T: image vs. the prompt with class nouns; CLIP-I: image vs. the whole reference "
    "photo; ID-region: each subject's reference crop vs. the image cropped to that subject's "
    "attention region (does not reward copying the reference layout). Each cell: mean ± std "
    "(population) over the runs (scenes × seeds) of the per-run category means."
)

_EXACT_LEGEND = (
    "Exact metrics (micro-world scenes; the micro parser reads every image, "
    "`dynasyn.evaluate.exact`): ID kept: the prompted subject drawn with its reference class, "
    "colour and pattern (per image and prompted subject); Action: the prompted action or "
    "relation holds (per image of an action / interaction prompt); ID & action: both in the "
    "same image; Mixing: another scene subject's colour shows (leak), a subject has one "
    "subject's colour and the other's class or pattern (chimera), or both are drawn in one "
    "colour (merge), per image and prompted subject; Leak: the leak part of Mixing alone (a "
    "pattern or class error that happens to be the other subject's counts as a chimera, so "
    "compare Mixing with the text ceiling's). Each cell: % of all images of the "
    "preset's runs (scenes × seeds) [95 % interval: bootstrap over the runs; Wilson over the "
    "images when there is one run]. Text ceiling: the base model prompted with the subjects' "
    "identity phrases instead of their placeholders (\"a red striped star is jumping\"), same "
    "prompts and seeds, once per scene (its interval: bootstrap over the scenes)."
)

_PAPER_NOTE = (
    "The paper's numbers (SD 2.1, OpenAI CLIP, ImageReward; one panda + bowl scene) are not on "
    "the same scale as scores from another model or CLIP: compare orderings, not values."
)


def _fmt_rate(stat: dict[str, Any] | None) -> str:
    """``"41.2 [35.0, 47.5]"`` (percent, with the runs' bootstrap interval, else Wilson)."""
    if not stat or stat.get("rate") is None:
        return _DASH
    ci = stat.get("ci95_runs") or stat.get("ci95")
    text = f"{100 * stat['rate']:.1f}"
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


def _exact_rows(stats: dict[str, Any], presets: dict[str, str]
                ) -> list[tuple[str, str, dict[str, dict[str, Any]]]]:
    """(row label, runs, {key: {metric: pooled rate}}) for ``presets`` that have exact
    metrics, then the text ceiling."""
    ex = stats.get("exact") or {}
    rows = [(label, str(ex[p]["overall"]["identity_kept"].get("runs", 0)), ex[p])
            for p, label in presets.items() if p in ex]
    ceiling = stats.get("exact_ceiling") or {}
    if rows and ceiling:
        scenes = ceiling["overall"]["identity_kept"].get("runs", 0)
        rows.append((CEILING_LABEL, f"{scenes} scene{'s' if scenes != 1 else ''}", ceiling))
    return rows


def _exact_section(stats: dict[str, Any], categories: Sequence[str],
                   presets: dict[str, str]) -> list[str]:
    """Table 1's exact-metrics table (methods × categories × exact metrics + the ceiling)."""
    rows = _exact_rows(stats, presets)
    if not rows:
        return []
    cols = [(c, label, m) for c in categories for label, m in EXACT_COLUMNS
            if any((r[2].get(c, {}).get(m) or {}).get("n") for r in rows)]
    head = ["Method", "runs"] + [f"{c.capitalize()} {label}" for c, label, _ in cols]
    body = [[label, runs] + [_fmt_rate(data.get(c, {}).get(m)) for c, _, m in cols]
            for label, runs, data in rows]
    return ["## Exact metrics (micro parser), % of images", "", _EXACT_LEGEND, "",
            _md_table(head, body), ""]


def table1_markdown(stats: dict[str, Any], categories: Sequence[str], header: str = "") -> str:
    """Table 1 (methods × categories × metrics) with the paper's reported values beside it."""
    t1 = stats["table1"]
    head = ["Method", "runs"] + [f"{c.capitalize()} {label}" for c in categories
                                 for label, _ in COLUMNS]
    rows = [[label, str(max(_runs(t1[p][c]) for c in categories))]
            + [_fmt(t1[p][c][key]) for c in categories for _, key in COLUMNS]
            for p, label in METHOD_LABELS.items() if p in t1]
    paper_cats = [c for c in categories if c in CATEGORIES]
    paper_head = ["Method"] + [f"{c.capitalize()} {label}" for c in paper_cats
                               for label, _ in COLUMNS[:3]]
    paper_rows = [[label] + [f"{v:.3f}" for c in paper_cats for v in PAPER_TABLE1[p][c]]
                  for p, label in METHOD_LABELS.items() if p in PAPER_TABLE1]
    parts = ["# Table 1: methods × prompt categories", ""]
    if header:
        parts += [header, ""]
    parts += [_LEGEND.format(dash=_DASH), ""]
    parts += [_md_table(head, rows) if rows else "(none of this table's presets were run: "
              f"{', '.join(METHOD_LABELS)})", ""]
    parts += _missing_lines(stats, METHOD_LABELS)
    parts += _exact_section(stats, categories, METHOD_LABELS)
    parts += ["## Paper (reported, Table 1)", "", _PAPER_NOTE, "",
              _md_table(paper_head, paper_rows), ""]
    return "\n".join(parts)


def table3_markdown(stats: dict[str, Any], categories: Sequence[str], header: str = "") -> str:
    """Table 3 (ablations × metrics, mean over categories) with the paper's values beside it."""
    t3 = stats["table3"]
    ex = stats.get("exact") or {}
    exact_cols = EXACT_COLUMNS if any(p in ex for p in ABLATION_LABELS) else ()
    head = ["Ablation", "preset", "runs"] + [label for label, _ in COLUMNS] + [
        f"{label} (%)" for label, _ in exact_cols]
    rows = [[label, f"`{p}`", str(_runs(t3[p]))] + [_fmt(t3[p][key]) for _, key in COLUMNS]
            + [_fmt_rate(ex.get(p, {}).get("overall", {}).get(m)) for _, m in exact_cols]
            for p, label in ABLATION_LABELS.items() if p in t3]
    ceiling = stats.get("exact_ceiling") or {}
    if rows and exact_cols and ceiling:
        scenes = ceiling["overall"]["identity_kept"].get("runs", 0)
        rows.append([CEILING_LABEL, _DASH, f"{scenes} scene{'s' if scenes != 1 else ''}"]
                    + [_DASH for _ in COLUMNS]
                    + [_fmt_rate(ceiling["overall"].get(m)) for _, m in exact_cols])
    paper_rows = [[label] + [f"{v:.3f}" for v in PAPER_TABLE3[p]]
                  for p, label in ABLATION_LABELS.items()]
    parts = ["# Table 3: ablations", ""]
    if header:
        parts += [header, ""]
    parts += [_LEGEND.format(dash=_DASH) + " Per run, the metric is first averaged over the "
              f"categories ({', '.join(categories)}), as in the paper's Table 3.", ""]
    if exact_cols:
        parts += [_EXACT_LEGEND + " Here over all categories.", ""]
    parts += [_md_table(head, rows) if rows else "(none of this table's presets were run: "
              f"{', '.join(ABLATION_LABELS)})", ""]
    parts += _missing_lines(stats, ABLATION_LABELS)
    parts += ["## Paper (reported, Table 3)", "", _PAPER_NOTE, "",
              _md_table(["Ablation", "IR", "CLIP-T", "CLIP-I"], paper_rows), ""]
    return "\n".join(parts)


def _missing_lines(stats: dict[str, Any], labels: dict[str, str]) -> list[str]:
    miss = [m for m in stats["missing"] if m.split("/")[1] in labels]
    if not miss:
        return []
    return ["Cells without results (not in the table; rerun the command to retry them): "
            + "; ".join(miss), ""]


def _csv(head: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(["" if v is None else v for v in r] for r in rows)
    return buf.getvalue()


def _stat_cols(stat: dict[str, Any]) -> list[Any]:
    return [stat.get("mean"), stat.get("std")]


def table1_csv(stats: dict[str, Any], categories: Sequence[str]) -> str:
    """Table 1 as CSV: one row per method, ``<category>_<metric>_mean/_std`` columns."""
    t1 = stats["table1"]
    head = ["method", "preset", "runs"] + [f"{c}_{key}_{s}" for c in categories
                                           for _, key in COLUMNS for s in ("mean", "std")]
    rows = [[label, p, max(_runs(t1[p][c]) for c in categories)]
            + [v for c in categories for _, key in COLUMNS for v in _stat_cols(t1[p][c][key])]
            for p, label in METHOD_LABELS.items() if p in t1]
    ex = stats.get("exact") or {}
    if any(p in ex for p in METHOD_LABELS):
        head += [f"{c}_{m}_{s}" for c in categories for _, m in EXACT_COLUMNS
                 for s in ("rate", "lo", "hi")]
        for row, p in zip(rows, [p for p in METHOD_LABELS if p in t1], strict=True):
            row += [v for c in categories for _, m in EXACT_COLUMNS
                    for v in _rate_cols(ex.get(p, {}).get(c, {}).get(m))]
        ceiling = stats.get("exact_ceiling") or {}
        if ceiling:
            rows.append([CEILING_LABEL, "", ""] + [None] * (2 * len(COLUMNS) * len(categories))
                        + [v for c in categories for _, m in EXACT_COLUMNS
                           for v in _rate_cols(ceiling.get(c, {}).get(m))])
    return _csv(head, rows)


def _rate_cols(stat: dict[str, Any] | None) -> list[Any]:
    """rate, lo, hi of a pooled rate (the runs' bootstrap interval, else Wilson)."""
    if not stat or stat.get("rate") is None:
        return [None, None, None]
    ci = stat.get("ci95_runs") or stat.get("ci95") or [None, None]
    return [stat["rate"], ci[0], ci[1]]


def table3_csv(stats: dict[str, Any]) -> str:
    """Table 3 as CSV: one row per ablation, ``<metric>_mean/_std`` columns."""
    t3 = stats["table3"]
    head = ["ablation", "preset", "runs"] + [f"{key}_{s}" for _, key in COLUMNS
                                             for s in ("mean", "std")]
    rows = [[label, p, _runs(t3[p])] + [v for _, key in COLUMNS for v in _stat_cols(t3[p][key])]
            for p, label in ABLATION_LABELS.items() if p in t3]
    ex = stats.get("exact") or {}
    if any(p in ex for p in ABLATION_LABELS):
        head += [f"{m}_{s}" for _, m in EXACT_COLUMNS for s in ("rate", "lo", "hi")]
        for row, p in zip(rows, [p for p in ABLATION_LABELS if p in t3], strict=True):
            row += [v for _, m in EXACT_COLUMNS
                    for v in _rate_cols(ex.get(p, {}).get("overall", {}).get(m))]
        ceiling = stats.get("exact_ceiling") or {}
        if ceiling:
            rows.append([CEILING_LABEL, "", ""] + [None] * (2 * len(COLUMNS))
                        + [v for _, m in EXACT_COLUMNS
                           for v in _rate_cols(ceiling.get("overall", {}).get(m))])
    return _csv(head, rows)


def exact_csv(stats: dict[str, Any]) -> str:
    """Every preset's (and the text ceiling's) pooled exact rates, one row per category
    (and ``overall``, ``acting`` = action + interaction prompts) and metric: images counted,
    rate, Wilson interval over the images, bootstrap interval over the runs (or scenes)."""
    head = ["preset", "category", "metric", "k", "n", "rate", "wilson_lo", "wilson_hi",
            "runs", "runs_lo", "runs_hi"]
    blocks = list((stats.get("exact") or {}).items())
    if stats.get("exact_ceiling"):
        blocks.append(("text-ceiling", stats["exact_ceiling"]))
    rows = []
    for preset, data in blocks:
        for key, metrics in data.items():
            for _, m in EXACT_COLUMNS:
                st = metrics.get(m) or {}
                w = st.get("ci95") or [None, None]
                b = st.get("ci95_runs") or [None, None]
                rows.append([preset, key, m, st.get("k"), st.get("n"), st.get("rate"),
                             w[0], w[1], st.get("runs"), b[0], b[1]])
    return _csv(head, rows)


def cells_csv(stats: dict[str, Any]) -> str:
    """Every finished cell's per-category means (the raw data behind both tables)."""
    keys = [key for _, key in COLUMNS] + ["clip_i_subject"]
    if stats.get("exact"):
        keys += [m for _, m in EXACT_COLUMNS]
    return _csv([*_CELL_KEYS, "category", *keys],
                [[r.get(k) for k in (*_CELL_KEYS, "category", *keys)] for r in stats["rows"]])


def _settings_text(values: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    return ", ".join(f"{k}={text(v)}" for k, v in values.items()) or "defaults"


def _write_tables(out: Path, stats: dict[str, Any], categories: Sequence[str],
                  header: str) -> list[Path]:
    files = {
        "table1.md": table1_markdown(stats, categories, header),
        "table1.csv": table1_csv(stats, categories),
        "table3.md": table3_markdown(stats, categories, header),
        "table3.csv": table3_csv(stats),
        "cells.csv": cells_csv(stats),
    }
    if stats.get("exact"):
        files["exact.csv"] = exact_csv(stats)
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return [out / name for name in files]


FIGURE = "figure.png"
"""Name of the benchmark's comparison figure in ``OUT``."""

PLOT = "identity_action.png"
"""Name of the identity-vs-action plot in ``OUT`` (micro-world scenes)."""

_PRESET_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                   (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                   (188, 189, 34), (23, 190, 207))


def identity_action_plot(stats: dict[str, Any], size: tuple[int, int] = (760, 560)
                         ) -> Image.Image | None:
    """The trade-off of the exact metrics, drawn: ``identity_kept`` (x) against
    ``action_followed`` (y), both over the images of the action and interaction prompts.

    One small dot per run (cell), a large dot per preset at its pooled rates with its 95 %
    intervals as bars (bootstrap over the runs; Wilson with one run), and the text ceiling
    (black diamonds: one per scene, the large one pooled). Axes 0-100 %. Drawn with PIL.
    Returns None when no run has exact metrics of action / interaction prompts.
    """
    from PIL import ImageDraw

    ex = stats.get("exact") or {}
    presets = [p for p in ex if (ex[p]["acting"]["action_followed"].get("n") or 0) > 0]
    if not presets:
        return None
    w, h = size
    left, right, top, bottom = 64, 200, 56, 54
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, w - right, top, h - bottom

    def xy(ix: float, ay: float) -> tuple[float, float]:
        return x0 + ix * (x1 - x0), y1 - ay * (y1 - y0)

    for t in range(0, 101, 20):
        gx, gy = xy(t / 100, t / 100)
        d.line((gx, y0, gx, y1), fill=(232, 232, 232))
        d.line((x0, gy, x1, gy), fill=(232, 232, 232))
        d.text((gx - 8, y1 + 6), f"{t}", fill=(90, 90, 90))
        d.text((x0 - 26, gy - 6), f"{t:>3}", fill=(90, 90, 90))
    d.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    d.text((x0, 8), "identity kept vs action followed (action + interaction prompts, "
           "micro parser)", fill="black")
    d.text(((x0 + x1) // 2 - 60, h - 24), "identity kept (%)", fill="black")
    d.text((6, y0 - 20), "action followed (%)", fill="black")
    colours = {p: _PRESET_COLOURS[i % len(_PRESET_COLOURS)] for i, p in enumerate(presets)}

    def dot(ix: float, ay: float, r: float, fill: tuple[int, int, int],
            outline: tuple[int, int, int] | None = None, diamond: bool = False) -> None:
        cx, cy = xy(ix, ay)
        if diamond:
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill,
                      outline=outline)
        else:
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)

    def light(c: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(int(v + (255 - v) * 0.45) for v in c)  # type: ignore[return-value]

    for pt in stats.get("exact_runs", []):
        if pt["preset"] in colours and None not in (pt["identity_kept"], pt["action_followed"]):
            dot(pt["identity_kept"], pt["action_followed"], 3, light(colours[pt["preset"]]))
    for pt in stats.get("ceiling_runs", []):
        if None not in (pt["identity_kept"], pt["action_followed"]):
            dot(pt["identity_kept"], pt["action_followed"], 4, (170, 170, 170), diamond=True)

    def pooled(data: dict[str, Any], colour: tuple[int, int, int], diamond: bool) -> None:
        idk, act = data["acting"]["identity_kept"], data["acting"]["action_followed"]
        if idk.get("rate") is None or act.get("rate") is None:
            return
        for st, horizontal in ((idk, True), (act, False)):
            ci = st.get("ci95_runs") or st.get("ci95")
            if ci:
                a = xy(ci[0], act["rate"]) if horizontal else xy(idk["rate"], ci[0])
                b = xy(ci[1], act["rate"]) if horizontal else xy(idk["rate"], ci[1])
                d.line((*a, *b), fill=colour, width=2)
        dot(idk["rate"], act["rate"], 7, colour, outline=(0, 0, 0), diamond=diamond)

    for p in presets:
        pooled(ex[p], colours[p], False)
    ceiling = stats.get("exact_ceiling") or {}
    if ceiling and (ceiling["acting"]["action_followed"].get("n") or 0) > 0:
        pooled(ceiling, (0, 0, 0), True)
    # legend
    lx, ly = x1 + 16, y0
    for p in presets:
        d.ellipse((lx, ly + 2, lx + 10, ly + 12), fill=colours[p], outline=(0, 0, 0))
        runs = ex[p]["acting"]["action_followed"].get("runs", 0)
        d.text((lx + 16, ly + 1), f"{p} ({runs} run{'s' if runs != 1 else ''})", fill="black")
        ly += 18
    if ceiling:
        d.polygon([(lx + 5, ly + 1), (lx + 10, ly + 7), (lx + 5, ly + 13), (lx, ly + 7)],
                  fill=(0, 0, 0))
        d.text((lx + 16, ly + 1), "text ceiling", fill="black")
        ly += 18
    d.text((lx, ly + 8), "small: one run", fill=(90, 90, 90))
    d.text((lx, ly + 22), "large: pooled, 95 % CI", fill=(90, 90, 90))
    return img


def comparison_figure(cells: Sequence[Cell], per_category: int = 2,
                      scale: int | None = None,
                      classes: Sequence[str] | None = None) -> Image.Image | None:
    """Methods side by side on the same prompts and noise: one row per preset, for the first
    scene and seed that have finished cells — the reference photo, then the first image of the
    first ``per_category`` prompts of every category (the prompts the first finished cell
    evaluated; every cell uses the same evaluation seed). Pictures are scaled to ``scale``
    pixels (default: their own size, at least 96) and captioned with the class-noun prompt and
    the preset (``classes``: the scenes' class nouns when they have no ``scene.json``).
    Returns None when no cell has finished or its metrics list no images.
    """
    from PIL import ImageDraw

    from dynasyn.generate import draw_caption

    done = [c for c in cells if c.finished]
    if not done:
        return None
    first = done[0]
    row_cells: list[Cell] = []
    for c in done:
        if (c.scene, c.seed) == (first.scene, first.seed) and c.preset not in (
                r.preset for r in row_cells):
            row_cells.append(c)
    records = json.loads((first.eval / METRICS_FILE).read_text()).get("prompts", [])
    picked: list[tuple[str, str]] = []  # (class prompt, image path relative to eval/)
    taken: dict[str, int] = {}
    for rec in records:
        if not rec.get("images") or "category" not in rec:
            continue
        if taken.get(rec["category"], 0) < per_category:
            taken[rec["category"]] = taken.get(rec["category"], 0) + 1
            picked.append((rec.get("class_prompt", rec.get("prompt", "")), rec["images"][0]))
    if not picked:
        return None
    ref = load_scene(first.scene_dir, classes=classes).image
    side = scale or max(96, ref.size[0] if ref.size[0] <= 256 else 256)
    label_w, head_h = 110, 34
    fig = Image.new("RGB", (label_w + side * (1 + len(picked)), head_h + side * len(row_cells)),
                    "white")
    draw = ImageDraw.Draw(fig)

    def caption(x: int, text: str) -> None:
        draw_caption(draw, (x + 2, 1), text, side)

    caption(label_w, "reference")
    for j, (text, _) in enumerate(picked):
        caption(label_w + side * (j + 1), text)
    for i, c in enumerate(row_cells):
        y = head_h + side * i
        draw.text((4, y + side // 2 - 6), c.preset, fill="black")
        fig.paste(ref.convert("RGB").resize((side, side), Image.NEAREST), (label_w, y))
        for j, (_, rel) in enumerate(picked):
            path = c.eval / rel
            if path.is_file():
                with Image.open(path) as im:
                    fig.paste(im.convert("RGB").resize((side, side), Image.NEAREST),
                              (label_w + side * (j + 1), y))
    return fig


# ------------------------------------------------------------------------------ entry point


def run_benchmark(
    scenes: Sequence[str | Path] | str | Path,
    presets: Sequence[str] | str,
    seeds: Sequence[int] | str | int,
    out: str | Path,
    model: str = "micro",
    train_overrides: dict[str, Any] | None = None,
    eval_kwargs: dict[str, Any] | None = None,
    augment_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    classes: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every (scene, preset, seed) cell into ``out``; write the tables.

    Args:
        scenes: scene directories (cells are named by each directory's name).
        presets: preset names (a list or a comma-separated string), e.g. all of
            :data:`dynasyn.presets.PRESETS`.
        seeds: training seeds (a list, an int or ``"0,1"``).
        out: the benchmark directory (created; a rerun resumes it).
        model: base model of every run (``micro``, a pipeline directory or a hub id).
        train_overrides: config values for every run (e.g. ``phase1_steps``,
            ``phase2_steps``, ``lora_rank``, ``device``); presets that train one phase only
            (DB, TI) get the sum of the phase steps in that phase.
        eval_kwargs: :func:`dynasyn.evaluate.evaluate` arguments (``n``, ``steps``,
            ``clip_model``, ``categories``, ``limit``, ``seed``, …); the evaluation seed is
            the same for every cell, so methods are compared on the same noise.
        augment_kwargs: :class:`~dynasyn.augment.pipeline.AugmentConfig` values
            (``num_prompts``, ``provider``, …; ``model`` is ``model``).
        progress: print a line per cell and show the training / evaluation progress bars.
        classes: class nouns, one per mask, for every scene (overriding their
            ``scene.json``; the command line's ``--classes``): every scene must then have that
            many masks. Per-scene classes belong in each scene's ``scene.json``.
        shard: ``(k, n)``: this call is shard ``k`` of ``n`` independent calls on the same
            ``out`` (several processes on one GPU, or machines sharing a disk): it takes the
            scenes whose index in ``scenes`` is ``k`` modulo ``n`` — every cell of a scene in
            one shard, so a scene's augmentation and ceiling images are made once — and
            writes no tables (a last call without ``shard`` or with ``report_only`` does).
        report_only: train and evaluate nothing; write the tables from the cells finished
            so far (the others are listed as missing).

    Returns:
        ``{"out", "main_process", "cells": [{"scene", "preset", "seed", "dir", "status"}],
        "table1", "table3", "missing", "exact", "exact_ceiling", "files"}`` (see
        :func:`collect`; ``files``, the tables
        written, is empty on the other processes); ``status`` is ``done``
        (finished before), ``trained``, ``resumed``, ``evaluated`` (trained before),
        ``failed: …`` or ``other process``; ``missing`` lists the cells without results.

    Raises:
        InputError: a scene, preset, seed, setting or the output directory cannot be used
            (checked before anything is trained or written).
    """
    from accelerate import PartialState

    # ---------------------------------------------------------------- validate everything
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise InputError(f"shard {shard[0]}/{shard[1]} does not exist; use K/N with "
                         "0 <= K < N, e.g. --shard 0/4")
    classes = list(classes) if classes else None
    scene_dirs = _scenes(scenes, classes)
    preset_names = _presets(presets)
    seed_list = _seeds(seeds)
    from dynasyn.models import resolve_model

    resolve_model(model)
    train_ov = dict(train_overrides or {})
    reserved = sorted(set(train_ov) & set(_RESERVED_TRAIN))
    if reserved:
        raise InputError(f"the benchmark sets {reserved[0]!r} of every run itself; "
                         "remove it from the training overrides")
    if classes:
        train_ov["classes"] = classes  # every run, and part of the settings a rerun must match
    ev_kw = _eval_kwargs(eval_kwargs)
    categories = list(ev_kw["categories"]) if ev_kw.get("prompt_file") is None else [
        c for c in CATEGORIES]
    needs_aug = any(PRESETS[p]["lambda_aug"] > 0 for p in preset_names)
    aug_cfg: AugmentConfig | None = None
    if needs_aug:
        aug_kw = dict(augment_kwargs or {})
        aug_kw.pop("model", None)
        try:
            aug_cfg = AugmentConfig(model=model, **aug_kw).validate()
        except TypeError as e:
            raise InputError(f"bad augmentation setting ({e})") from None
    out = Path(out).expanduser().resolve()
    cells = [Cell(s, d, p, k, out) for s, d in scene_dirs.items() for p in preset_names
             for k in seed_list]
    configs = {c: _cell_config(c, model, train_ov) for c in cells}
    settings = _settings(model, train_ov, ev_kw, None if aug_cfg is None else asdict(aug_cfg))
    manifest = _check_out(out, settings, scene_dirs)

    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    distributed = state.num_processes > 1
    if distributed and ev_kw.get("device", "auto") == "auto":  # this process's own device
        ev_kw["device"] = str(state.device)
    say = progress and main
    todo = [] if report_only else [c for c in cells if not c.finished]
    if shard is not None:
        k, n = shard
        order = {name: i for i, name in enumerate(scene_dirs)}
        todo = [c for c in todo if order[c.scene] % n == k]
        todo.sort(key=lambda c: (c.seed, preset_names.index(c.preset)))  # whole seeds first
    state.wait_for_everyone()  # all processes validated and share one to-do list
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    state.wait_for_everyone()

    # ---------------------------------------------------------------- augmentation (shared)
    status: dict[Cell, str] = {
        c: "done" if c.finished else "other shard" if shard else "not run"
        for c in cells if c not in todo}
    if aug_cfg is not None:
        for name, scene_dir in scene_dirs.items():
            if any(c.scene == name and c.needs_aug and not (c.run / RUN_INFO).is_file()
                   for c in todo):
                if say:
                    print(f"benchmark: augmenting {name}", file=sys.stderr, flush=True)
                augment(scene_dir, out / name / "augmented", aug_cfg, progress=say,
                        classes=classes)

    # ---------------------------------------------------------------- cells
    mine = todo[state.process_index :: state.num_processes]
    for c in todo:
        status[c] = "other process"
    for i, cell in enumerate(mine):
        if say:
            print(f"benchmark: [{i + 1}/{len(mine)}] {cell.name}", file=sys.stderr, flush=True)
        cell.dir.mkdir(parents=True, exist_ok=True)
        try:
            status[cell] = _do_cell(cell, configs[cell], ev_kw, progress and main, distributed)
        except Exception as e:  # noqa: BLE001 - one failed cell must not stop the others
            msg = str(e).splitlines()[0] if str(e) else ""
            status[cell] = f"failed: {type(e).__name__}: {msg}"
            log.warning("benchmark cell %s %s", cell.name, status[cell])
            atomic_write_text(cell.dir / "error.txt", status[cell] + "\n")
    state.wait_for_everyone()

    # ---------------------------------------------------------------- tables
    if shard is not None and not report_only:
        return {"out": str(out), "main_process": False,
                "cells": [{"scene": c.scene, "preset": c.preset, "seed": c.seed,
                           "dir": str(c.dir), "status": status.get(c, "other shard")}
                          for c in cells],
                "files": []}
    stats = collect(cells, categories, rescore=main)
    header = (f"scenes: {', '.join(scene_dirs)} · seeds: {', '.join(map(str, seed_list))} · "
              f"model: `{model}` · training: {_settings_text(settings['train'])} · "
              f"evaluation: {_settings_text(settings['evaluate'])}")
    files = _write_tables(out, stats, categories, header) if main else []
    if main:
        fig = comparison_figure(cells, classes=classes)
        if fig is not None:
            tmp = out / f".{FIGURE}.tmp"
            fig.save(tmp, format="PNG")
            os.replace(tmp, out / FIGURE)
            files.append(out / FIGURE)
        plot = identity_action_plot(stats)
        if plot is not None:
            tmp = out / f".{PLOT}.tmp"
            plot.save(tmp, format="PNG")
            os.replace(tmp, out / PLOT)
            files.append(out / PLOT)
    state.wait_for_everyone()
    return {
        "out": str(out),
        "main_process": main,
        "cells": [{"scene": c.scene, "preset": c.preset, "seed": c.seed, "dir": str(c.dir),
                   "status": status[c]} for c in cells],
        "table1": stats["table1"],
        "table3": stats["table3"],
        "missing": stats["missing"],
        "exact": stats["exact"],
        "exact_ceiling": stats["exact_ceiling"],
        "files": [str(f) for f in files],
    }
