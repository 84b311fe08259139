"""`dynasyn benchmark`: the paper's tables, resumable cells, process sharding (issue 5)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import dynasyn.evaluate.benchmark as B
from dynasyn.config import load_config
from dynasyn.errors import InputError
from dynasyn.evaluate.benchmark import (
    ABLATION_LABELS,
    FIGURE,
    MANIFEST,
    METHOD_LABELS,
    PAPER_TABLE1,
    Cell,
    collect,
    identity_action_plot,
    run_benchmark,
    table1_markdown,
    table3_markdown,
)
from dynasyn.presets import PRESETS
from dynasyn.scene import load_scene
from dynasyn.tiny import synthetic_scene

CATS = ["plain", "action", "interaction"]
TABLE_FILES = ["table1.md", "table1.csv", "table3.md", "table3.csv", "cells.csv"]


# ------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_args(tmp_path_factory, tiny_model, tiny_clip) -> dict[str, Any]:
    """Every preset on one two-subject scene, one seed, 1 + 1 steps, one image per prompt."""
    root = tmp_path_factory.mktemp("bench")
    return dict(
        scenes=[synthetic_scene(root / "sceneA", 2)],
        presets=",".join(PRESETS),
        seeds=[0],
        out=root / "out",
        model=str(tiny_model),
        train_overrides=dict(phase1_steps=1, phase2_steps=1, num_class_images=2),
        eval_kwargs=dict(n=1, steps=1, limit=1, clip_model=str(tiny_clip), device="cpu"),
        augment_kwargs=dict(num_prompts=2, provider="template", draft_steps=2, gsa_steps=4),
        progress=False,
    )


@pytest.fixture(scope="module")
def bench(bench_args) -> dict[str, Any]:
    """The benchmark above, run once for the module (tests copy its directory to change it)."""
    return run_benchmark(**bench_args)


@pytest.fixture
def bench_copy(bench, bench_args, tmp_path) -> dict[str, Any]:
    """``bench_args`` pointing at a private copy of the finished benchmark directory."""
    out = tmp_path / "out"
    shutil.copytree(bench_args["out"], out, symlinks=True)
    return dict(bench_args, out=out)


class Calls:
    """Counts the calls of the benchmark's train / evaluate / augment (still running them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.train: list[dict[str, Any]] = []
        self.evaluate: list[Path] = []
        self.augment: list[Path] = []
        real_train, real_eval, real_aug = B.train, B.evaluate, B.augment

        def train(cfg, out, **kw):
            self.train.append(dict(kw, out=Path(out), preset=cfg.preset))
            return real_train(cfg, out, **kw)

        def evaluate(run, **kw):
            self.evaluate.append(Path(run))
            return real_eval(run, **kw)

        def augment(scene, out, cfg, **kw):
            self.augment.append(Path(out))
            return real_aug(scene, out, cfg, **kw)

        monkeypatch.setattr(B, "train", train)
        monkeypatch.setattr(B, "evaluate", evaluate)
        monkeypatch.setattr(B, "augment", augment)


def _cell(args: dict[str, Any], preset: str, seed: int = 0) -> Path:
    return Path(args["out"]) / "sceneA" / preset / f"seed{seed}"


def _md_rows(text: str) -> list[list[str]]:
    """The data rows of every markdown table in ``text`` (header and rule excluded)."""
    rows, prev = [], ""
    for line in text.splitlines():
        if line.startswith("| ") and not prev.startswith("|"):
            pass  # a header
        elif line.startswith("| "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        prev = line
    return rows


# ------------------------------------------------------------------------------ end to end


def test_benchmark_writes_the_papers_tables(bench, bench_args):
    out = Path(bench_args["out"])
    assert bench["missing"] == [] and bench["out"] == str(out)
    assert len(bench["cells"]) == len(PRESETS)
    assert {c["status"] for c in bench["cells"]} == {"trained"}
    for name in TABLE_FILES:
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp*")) and not list(out.glob(".table*"))
    # one augmented directory per scene, used by every preset with L_AUG and no other
    assert (out / "sceneA" / "augmented" / "prompts.jsonl").is_file()
    for preset in PRESETS:
        cell = _cell(bench_args, preset)
        assert (cell / "run" / "run.json").is_file() and (cell / "eval" / "metrics.json").is_file()
        cfg = load_config(cell / "run" / "config.yaml")
        assert cfg.preset == preset and cfg.seed == 0
        if PRESETS[preset]["lambda_aug"] > 0:
            assert Path(cfg.augmented) == out / "sceneA" / "augmented"
        else:
            assert cfg.augmented is None
        # one-phase presets keep their phase and train the same number of steps
        assert cfg.phase1_steps + cfg.phase2_steps == 2
        assert (cfg.phase1_steps == 0) == (preset == "dreambooth")
        assert (cfg.phase2_steps == 0) == (preset == "textual-inversion")

    t1 = (out / "table1.md").read_text()
    ours, paper = _md_rows(t1.split("## Paper")[0]), _md_rows(t1.split("## Paper")[1])
    assert [r[0] for r in ours] == list(METHOD_LABELS.values())
    assert [r[0] for r in paper] == [v for k, v in METHOD_LABELS.items() if k in PAPER_TABLE1]
    head = next(ln for ln in t1.splitlines() if ln.startswith("| Method | runs"))
    assert "Plain IR | Plain CLIP-T | Plain CLIP-I | Plain ID-region" in head
    assert "Interaction IR | Interaction CLIP-T | Interaction CLIP-I" in head
    for r in ours:
        assert len(r) == 2 + 3 * 4 and r[1] == "1"
        assert r[2] == "–"  # no ImageReward installed: IR is a dash
        assert all(" ± " in c for i, c in enumerate(r[2:]) if i % 4)
    assert paper[-1] == ["DynASyn", "0.901", "0.376", "0.797", "0.827", "0.359", "0.771",
                         "0.758", "0.346", "0.731"]

    t3 = (out / "table3.md").read_text()
    ours3, paper3 = _md_rows(t3.split("## Paper")[0]), _md_rows(t3.split("## Paper")[1])
    assert [r[0] for r in ours3] == list(ABLATION_LABELS.values())
    assert ours3[-1][1] == "`dynasyn`" and ours3[-1][3] == "–"
    assert paper3[-1] == ["MD+App+Act", "0.829", "0.360", "0.767"]

    rows1 = list(csv.DictReader((out / "table1.csv").open()))
    assert [r["preset"] for r in rows1] == list(METHOD_LABELS)
    assert rows1[0]["plain_image_reward_mean"] == "" and float(rows1[0]["plain_clip_t_std"]) == 0
    assert {f"{c}_{k}_{s}" for c in CATS for k in ("clip_t", "clip_i", "identity_region")
            for s in ("mean", "std")} <= set(rows1[0])
    rows3 = list(csv.DictReader((out / "table3.csv").open()))
    assert [r["preset"] for r in rows3] == list(ABLATION_LABELS)
    # Table 3 is the mean of the per-category means, Table 1 holds those categories
    dyn1 = next(r for r in rows1 if r["preset"] == "dynasyn")
    dyn3 = next(r for r in rows3 if r["preset"] == "dynasyn")
    assert float(dyn3["clip_t_mean"]) == pytest.approx(
        sum(float(dyn1[f"{c}_clip_t_mean"]) for c in CATS) / 3, abs=1e-5)
    assert len(list(csv.DictReader((out / "cells.csv").open()))) == 3 * len(PRESETS)
    assert bench["table1"]["dynasyn"]["action"]["clip_t"]["n"] == 1
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["scenes"] == {"sceneA": str(Path(bench_args["scenes"][0]).resolve())}


def test_figure_shows_every_method_on_the_same_prompts(bench, bench_args):
    out = Path(bench_args["out"])
    assert str(out / FIGURE) in bench["files"]
    fig = Image.open(out / FIGURE).convert("RGB")
    presets = list(PRESETS)
    first = _cell(bench_args, presets[0]) / "eval"
    records = json.loads((first / "metrics.json").read_text())["prompts"]
    per_cat: dict[str, list[str]] = {}
    for r in records:
        per_cat.setdefault(r["category"], []).append(r["images"][0])
    picked = [p for paths in per_cat.values() for p in paths[:2]]
    ref_w = load_scene(bench_args["scenes"][0]).image.size[0]
    side = max(96, min(ref_w, 256))
    assert fig.size == (110 + side * (1 + len(picked)), 34 + side * len(PRESETS))
    # row i, column j+1 is preset i's first image of picked prompt j, at the same noise
    for i, preset in enumerate(presets):
        ev = _cell(bench_args, preset) / "eval"
        for j in (0, len(picked) - 1):
            want = Image.open(ev / picked[j]).convert("RGB").resize((side, side), Image.NEAREST)
            x, y = 110 + side * (j + 1), 34 + side * i
            got = fig.crop((x, y, x + side, y + side))
            assert np.array_equal(np.asarray(got), np.asarray(want)), (preset, j)


def test_rerun_skips_finished_cells_and_redoes_a_deleted_one(bench_copy, monkeypatch):
    calls = Calls(monkeypatch)
    out = Path(bench_copy["out"])
    (out / "table1.md").unlink()
    res = run_benchmark(**bench_copy)
    assert (calls.train, calls.evaluate, calls.augment) == ([], [], [])
    assert {c["status"] for c in res["cells"]} == {"done"} and (out / "table1.md").is_file()

    # a deleted metrics.json: exactly that cell is evaluated again (its run is kept)
    md = _cell(bench_copy, "md")
    (md / "eval" / "metrics.json").unlink()
    res = run_benchmark(**bench_copy)
    assert calls.train == [] and calls.augment == [] and calls.evaluate == [md / "run"]
    assert (md / "eval" / "metrics.json").is_file() and (md / "eval" / "report.html").is_file()
    assert [c["status"] for c in res["cells"] if c["status"] != "done"] == ["evaluated"]

    # a half-trained run (no run.json, no checkpoint) is trained again from scratch; a preset
    # with L_AUG re-runs the (cached) augmentation of its scene first
    calls.evaluate.clear()
    act = _cell(bench_copy, "md+act")
    (act / "run" / "run.json").unlink()
    shutil.rmtree(act / "eval")
    res = run_benchmark(**bench_copy)
    assert [(c["preset"], c["out"], c["overwrite"], c.get("resume", False))
            for c in calls.train] == [("md+act", act / "run", True, False)]
    assert calls.evaluate == [act / "run"] and calls.augment == [out / "sceneA" / "augmented"]
    assert (act / "run" / "run.json").is_file() and res["missing"] == []


def test_a_run_with_checkpoints_is_resumed(bench_copy, monkeypatch):
    db = _cell(bench_copy, "dreambooth")
    info = (db / "run" / "run.json").read_text()
    (db / "run" / "run.json").unlink()
    (db / "eval" / "metrics.json").unlink()
    ck = db / "run" / "checkpoints" / "step-000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    seen: list[dict[str, Any]] = []

    def fake_train(cfg, out, **kw):  # a resumed training only has to finish the run
        seen.append(dict(kw, preset=cfg.preset))
        (Path(out) / "run.json").write_text(info)

    monkeypatch.setattr(B, "train", fake_train)
    res = run_benchmark(**bench_copy)
    assert len(seen) == 1 and seen[0]["resume"] is True and seen[0]["preset"] == "dreambooth"
    assert [c["status"] for c in res["cells"] if c["status"] != "done"] == ["resumed"]


def test_a_failed_cell_is_reported_and_retried(bench_copy, monkeypatch):
    ti = _cell(bench_copy, "textual-inversion")
    (ti / "eval" / "metrics.json").unlink()

    def broken(run, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(B, "evaluate", broken)
    res = run_benchmark(**bench_copy)
    assert res["missing"] == ["sceneA/textual-inversion/seed0 (failed: RuntimeError: out of "
                              "memory)"]
    t1 = (Path(bench_copy["out"]) / "table1.md").read_text()
    assert "textual-inversion/seed0 (failed" in t1
    assert [r[0] for r in _md_rows(t1.split("## Paper")[0])] == ["DB (+mask)", "Break-a-Scene",
                                                                 "MuDI (Seg-Mix)", "DynASyn"]
    monkeypatch.undo()
    res = run_benchmark(**bench_copy)
    assert res["missing"] == [] and not (ti / "error.txt").exists()


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_anything_is_written(bench_args, tmp_path):
    args = dict(bench_args, out=tmp_path / "new")
    with pytest.raises(InputError, match="unknown preset 'dreamboth'"):
        run_benchmark(**dict(args, presets="dynasyn,dreamboth"))
    with pytest.raises(InputError, match="no presets"):
        run_benchmark(**dict(args, presets=""))
    with pytest.raises(InputError, match="does not exist"):
        run_benchmark(**dict(args, scenes=[tmp_path / "nope"]))
    other = synthetic_scene(tmp_path / "b" / "sceneA", 2)
    with pytest.raises(InputError, match="two scenes are named 'sceneA'"):
        run_benchmark(**dict(args, scenes=[*args["scenes"], other]))
    with pytest.raises(InputError, match="not an integer"):
        run_benchmark(**dict(args, seeds="0,x"))
    with pytest.raises(InputError, match="'seed'"):
        run_benchmark(**dict(args, train_overrides=dict(seed=3)))
    with pytest.raises(InputError, match="unknown config key"):
        run_benchmark(**dict(args, train_overrides=dict(phase3_steps=3)))
    with pytest.raises(InputError, match="unknown prompt category"):
        run_benchmark(**dict(args, eval_kwargs=dict(args["eval_kwargs"], categories="dance")))
    with pytest.raises(InputError, match="unknown evaluation setting"):
        run_benchmark(**dict(args, eval_kwargs=dict(args["eval_kwargs"], images=3)))
    with pytest.raises(InputError, match="provider"):
        run_benchmark(**dict(args, augment_kwargs=dict(provider="oracle")))
    assert not (tmp_path / "new").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="holds no benchmark"):
        run_benchmark(**dict(args, out=foreign))
    with pytest.raises(InputError, match="not a directory"):
        run_benchmark(**dict(args, out=foreign / "keep.txt"))
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_a_rerun_with_other_settings_is_refused(bench_copy, bench_args):
    out = Path(bench_copy["out"])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(InputError, match="other train settings"):
        run_benchmark(**dict(bench_copy, train_overrides=dict(phase1_steps=2, phase2_steps=1)))
    with pytest.raises(InputError, match="other evaluate settings"):
        run_benchmark(**dict(bench_copy, eval_kwargs=dict(bench_args["eval_kwargs"], n=2)))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # fewer presets (none with L_AUG) and a changed device are fine: nothing to redo
    res = run_benchmark(**dict(bench_copy, presets="dreambooth", augment_kwargs=None,
                               eval_kwargs=dict(bench_args["eval_kwargs"], device="auto")))
    assert [c["status"] for c in res["cells"]] == ["done"]


def test_a_benchmark_from_before_an_augment_option_existed_resumes_at_its_default():
    from dataclasses import asdict

    from dynasyn.augment.pipeline import AugmentConfig
    from dynasyn.evaluate.benchmark import _jsonable, _same_augment

    new = _jsonable(asdict(AugmentConfig(model="micro", num_prompts=8)))
    old = {k: v for k, v in new.items() if k != "gsa_sampler"}  # written before the option
    assert _same_augment(new, old) and _same_augment(None, old) and _same_augment(new, None)
    assert not _same_augment(dict(new, gsa_sampler="sde"), old)  # not the default: other items
    assert not _same_augment(dict(new, num_prompts=9), dict(new))


# ------------------------------------------------------------------------------ tables


def _fake_cell(root: Path, scene: str, preset: str, seed: int,
               values: dict[str, dict[str, float | None]]) -> Cell:
    cell = Cell(scene, root / scene, preset, seed, root)
    cell.eval.mkdir(parents=True)
    cats = {c: {k: {"mean": v, "std": 0.0, "n": 1} for k, v in m.items()}
            for c, m in values.items()}
    (cell.eval / "metrics.json").write_text(json.dumps({"categories": cats}))
    return cell


def test_cells_are_mean_and_std_over_scenes_and_seeds(tmp_path):
    def vals(t, ir=None):
        return {"plain": {"clip_t": t, "clip_i": 0.5, "identity_region": 0.4, "image_reward": ir},
                "action": {"clip_t": t + 0.1, "clip_i": 0.5, "identity_region": 0.4,
                           "image_reward": ir},
                "interaction": {"clip_t": t + 0.2, "clip_i": 0.5, "identity_region": 0.4,
                                "image_reward": ir}}

    cells = [_fake_cell(tmp_path, "a", "dynasyn", 0, vals(0.2, 1.0)),
             _fake_cell(tmp_path, "b", "dynasyn", 0, vals(0.4, 0.0)),
             _fake_cell(tmp_path, "a", "md", 0, vals(0.1)),
             Cell("a", tmp_path / "a", "md", 1, tmp_path)]  # never run
    stats = collect(cells, CATS)
    t1 = stats["table1"]["dynasyn"]
    assert t1["plain"]["clip_t"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1),
                                     "n": 2}
    assert t1["interaction"]["image_reward"]["mean"] == pytest.approx(0.5)
    assert stats["table3"]["dynasyn"]["clip_t"]["mean"] == pytest.approx(0.4)
    assert stats["table3"]["md"]["image_reward"]["mean"] is None
    assert stats["missing"] == ["a/md/seed1 (not run)"]
    md1 = table1_markdown(stats, CATS)
    row = next(r for r in _md_rows(md1.split("## Paper")[0]) if r[0] == "DynASyn")
    assert row[1] == "2" and row[2:4] == ["0.500 ± 0.500", "0.300 ± 0.100"]
    md3 = table3_markdown(stats, CATS)
    rows3 = _md_rows(md3.split("## Paper")[0])
    assert [r[0] for r in rows3] == ["MD", "MD+App+Act"] and rows3[0][3] == "–"
    assert "a/md/seed1 (not run)" in md3 and "a/md/seed1" not in md1


def _exact_images(kept: int, followed: int, total: int = 4, subjects: int = 1) -> list[dict]:
    """``total`` score_image-like results: ``kept`` keep identity (every subject),
    ``followed`` follow the action; the first image also leaks the other subject."""
    return [{"subjects": [{"subject": s, "identity_kept": i < kept, "identity_mixing": i == 0,
                           "mixing": ["leak: blue (subject 1)"] if i == 0 else []}
                          for s in range(subjects)],
             "action_followed": i < followed, "identity_and_action": i < min(kept, followed)}
            for i in range(total)]


def _exact_cell(root: Path, scene: str, preset: str, seed: int, kept: int, followed: int,
                ceiling: tuple[int, int] | None = None) -> Cell:
    from dynasyn.evaluate.exact import EXACT_VERSION, summarize

    cell = _fake_cell(root, scene, preset, seed,
                      {c: {"clip_t": 0.5, "clip_i": 0.5, "identity_region": 0.5} for c in CATS})
    metrics = json.loads((cell.eval / "metrics.json").read_text())
    records = [{"category": "action", "exact": {"images": _exact_images(kept, followed)}},
               {"category": "interaction",
                "exact": {"images": _exact_images(kept, followed, subjects=2)}}]
    metrics["exact"] = {"version": EXACT_VERSION, **summarize(records)}
    metrics["classes"] = ["star", "ball"]
    if ceiling is not None:
        recs = [{"category": "action", "exact": {"images": _exact_images(*ceiling)}},
                {"category": "interaction", "exact": {"images": _exact_images(*ceiling)}}]
        metrics["exact_ceiling"] = summarize(recs)
    (cell.eval / "metrics.json").write_text(json.dumps(metrics))
    return cell


def test_exact_metrics_are_pooled_over_runs_with_the_ceiling_once_per_scene(tmp_path):
    cells = [_exact_cell(tmp_path, "a", "dynasyn", 0, 1, 3, ceiling=(3, 2)),
             _exact_cell(tmp_path, "a", "dynasyn", 1, 2, 3, ceiling=(3, 2)),
             _exact_cell(tmp_path, "b", "dynasyn", 0, 4, 1, ceiling=(1, 1)),
             _exact_cell(tmp_path, "a", "break-a-scene", 0, 2, 2, ceiling=(3, 2)),
             _exact_cell(tmp_path, "a", "md", 0, 0, 0, ceiling=(3, 2))]
    stats = collect(cells, CATS)
    dyn = stats["exact"]["dynasyn"]
    # identity: 4 action images + 8 interaction subject-images per run, pooled over 3 runs
    assert dyn["overall"]["identity_kept"]["n"] == 36
    assert dyn["overall"]["identity_kept"]["k"] == 3 * (1 + 2 + 4)
    act = dyn["action"]["action_followed"]
    assert (act["k"], act["n"], act["runs"]) == (7, 12, 3)
    assert act["rate"] == pytest.approx(7 / 12, abs=1e-6)
    assert act["ci95"] == pytest.approx(B.wilson_interval(7, 12), abs=1e-6)
    lo, hi = act["ci95_runs"]
    assert lo < 7 / 12 < hi  # the runs differ (3/4, 3/4, 1/4): a bootstrap interval
    assert stats["exact"]["break-a-scene"]["overall"]["identity_kept"]["ci95_runs"] is None
    # the ceiling: each scene once (a: 3 of 4 kept, b: 1 of 4), not once per cell
    ceil = stats["exact_ceiling"]
    assert ceil["action"]["identity_kept"]["k"] == 4 and ceil["action"]["identity_kept"]["n"] == 8
    assert ceil["overall"]["identity_kept"]["runs"] == 2
    assert len(stats["ceiling_runs"]) == 2 and len(stats["exact_runs"]) == 5
    assert stats["exact_runs"][0]["action_followed"] == pytest.approx(6 / 8)

    md1 = table1_markdown(stats, CATS)
    exact_part = md1.split("## Exact metrics")[1].split("## Paper")[0]
    rows = _md_rows(exact_part)
    assert [r[0] for r in rows] == ["Break-a-Scene", "DynASyn", "Text ceiling"]
    head = next(ln for ln in exact_part.splitlines() if ln.startswith("| Method"))
    assert "Action ID kept | Action Action | Action ID & action | Action Mixing" in head
    assert "Plain" not in head  # no plain images in these cells
    dyn_row = rows[1]
    assert dyn_row[1] == "3" and dyn_row[2].startswith(f"{100 * 7 / 12:.1f} [")
    assert rows[2][1] == "2 scenes"
    md3 = table3_markdown(stats, CATS)
    rows3 = _md_rows(md3.split("## Paper")[0])
    assert [r[0] for r in rows3] == ["MD", "MD+App+Act", "Text ceiling"]
    assert "ID kept (%)" in md3 and rows3[0][7].startswith("0.0 [")
    exact_rows = list(csv.DictReader(io.StringIO(B.exact_csv(stats))))
    ceil_rows = [r for r in exact_rows if r["preset"] == "text-ceiling"]
    assert {r["category"] for r in ceil_rows} >= {"action", "interaction", "overall", "acting"}
    t1 = list(csv.DictReader(io.StringIO(B.table1_csv(stats, CATS))))
    assert t1[-1]["method"] == "Text ceiling" and t1[-1]["action_identity_kept_rate"] == "0.5"

    plot = identity_action_plot(stats)
    assert plot is not None and plot.size == (760, 560)
    px = np.asarray(plot).reshape(-1, 3)
    for colour in B._PRESET_COLOURS[:3]:  # one colour per preset with action images
        assert (px == colour).all(axis=1).sum() > 20, colour
    assert identity_action_plot({"exact": {}}) is None


def test_an_old_micro_cell_is_rescored_from_its_images(tmp_path):
    from dynasyn.evaluate.exact import EXACT_VERSION
    from dynasyn.micro.world import Identity, SceneSpec, render

    scene = Path(__file__).resolve().parents[1] / "examples" / "star_ball"
    cell = _fake_cell(tmp_path, "star_ball", "dynasyn", 0,
                      {c: {"clip_t": 0.5, "clip_i": 0.5, "identity_region": 0.5} for c in CATS})
    cell = Cell("star_ball", scene, "dynasyn", 0, tmp_path)
    (cell.eval / "images").mkdir()
    star = Identity("star", "red", "striped")
    Image.fromarray(render(SceneSpec((star,), "jumping"), 64, 0).image).save(
        cell.eval / "images" / "a.png")
    metrics = json.loads((cell.eval / "metrics.json").read_text())
    metrics.update(classes=["star", "ball"], prompts=[
        {"category": "action", "subjects": [0], "images": ["images/a.png"],
         "class_prompt": "a star is jumping"}])
    (cell.eval / "metrics.json").write_text(json.dumps(metrics))
    assert collect([cell], CATS)["exact"] == {}  # no rescoring asked
    stats = collect([cell], CATS, rescore=True)
    assert stats["exact"]["dynasyn"]["action"]["action_followed"]["k"] == 1
    saved = json.loads((cell.eval / "metrics.json").read_text())
    assert saved["exact"]["version"] == EXACT_VERSION
    assert saved["prompts"][0]["exact"]["images"][0]["subjects"][0]["identity_kept"]


def test_a_micro_benchmark_has_exact_tables_the_ceiling_once_and_the_plot(
        tiny_model, tiny_clip, tmp_path, monkeypatch):
    import dynasyn.evaluate.exact as E

    sampled = []
    real = E.ceiling_images

    def counting(*a, **kw):
        images, keys, n = real(*a, **kw)
        sampled.append(n)
        return images, keys, n

    monkeypatch.setattr("dynasyn.evaluate.run.ceiling_images", counting)
    scene = tmp_path / "star_ball"
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "star_ball", scene)
    res = run_benchmark([scene], "break-a-scene,md", [0], tmp_path / "out", model=str(tiny_model),
                        train_overrides=dict(phase1_steps=1, phase2_steps=1, num_class_images=2),
                        eval_kwargs=dict(n=1, steps=1, limit=1, clip_model=str(tiny_clip),
                                         categories="action,interaction", device="cpu"),
                        progress=False)
    out = tmp_path / "out"
    assert res["missing"] == [] and sorted(sampled) == [0, 2]  # the second cell reuses them
    assert len(list((out / B.CEILING_CACHE).glob("*.png"))) == 2
    assert set(res["exact"]) == {"break-a-scene", "md"}
    assert res["exact_ceiling"]["overall"]["identity_kept"]["runs"] == 1
    assert "## Exact metrics" in (out / "table1.md").read_text()
    assert "Text ceiling" in (out / "table3.md").read_text()
    assert (out / "exact.csv").is_file() and (out / B.PLOT).is_file()
    assert str(out / B.PLOT) in res["files"]


def test_one_phase_presets_keep_their_phase():
    ov = dict(phase1_steps=3, phase2_steps=5)
    assert B._phase_steps("dynasyn", ov) == ov
    assert B._phase_steps("dreambooth", ov) == dict(phase1_steps=0, phase2_steps=8)
    assert B._phase_steps("textual-inversion", ov) == dict(phase1_steps=8, phase2_steps=0)
    assert B._phase_steps("dreambooth", {}) == {}


# ------------------------------------------------------------------------------ processes


def _worker(model: str, scene: str, out: str, clip: str) -> None:
    """One of two CPU processes: real sharding and barriers, fake training and evaluation."""
    from accelerate import PartialState

    done: list[dict[str, Any]] = []

    def fake_train(cfg, run, accelerator=None, **kw):
        Path(run).mkdir(parents=True, exist_ok=True)
        (Path(run) / "run.json").write_text("{}")
        done.append({"run": str(run), "processes": accelerator.num_processes,
                     "main": accelerator.is_main_process})

    def fake_evaluate(run, out, **kw):
        stats = {"mean": 0.25, "std": 0.0, "n": 1}
        cats = {c: {"clip_t": stats, "clip_i": stats, "identity_region": stats} for c in CATS}
        Path(out).mkdir(parents=True)
        (Path(out) / "metrics.json").write_text(json.dumps({"categories": cats}))

    B.train, B.evaluate = fake_train, fake_evaluate
    run_benchmark([scene], "dreambooth,textual-inversion,md", [0, 1], out, model=model,
                  eval_kwargs=dict(clip_model=clip), progress=False)
    state = PartialState()
    (Path(out) / f"proc{state.process_index}.json").write_text(
        json.dumps({"done": done, "world": state.num_processes}))


def test_cells_are_spread_over_processes(tiny_model, scene2, tmp_path, tiny_clip):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, __file__, str(tiny_model), str(scene2), str(out),
                        str(tiny_clip)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    p0, p1 = (json.loads((out / f"proc{i}.json").read_text()) for i in (0, 1))
    assert p0["world"] == p1["world"] == 2
    runs0, runs1 = [d["run"] for d in p0["done"]], [d["run"] for d in p1["done"]]
    assert len(runs0) == len(runs1) == 3 and not set(runs0) & set(runs1)
    # every process trains its cells alone: a one-process accelerator
    assert all(d["processes"] == 1 and d["main"] for d in p0["done"] + p1["done"])
    cells = [f"{p}/seed{k}" for p in ("dreambooth", "textual-inversion", "md") for k in (0, 1)]
    assert [str(Path(x).relative_to(out / scene2.name).parent) for x in runs0] == cells[0::2]
    rows = list(csv.DictReader((out / "table1.csv").open()))
    assert [r["preset"] for r in rows] == ["textual-inversion", "dreambooth"]
    assert rows[0]["runs"] == "2" and float(rows[0]["action_clip_t_mean"]) == 0.25


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(_worker, args=tuple(sys.argv[1:5]), num_processes=2)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Tables and json are written via a private temporary file; the result is not private."""
    from dynasyn.config import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "table1.md", "| a |\n")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.md", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "table1.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.md").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "table1.md").read_text() == "| a |\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shards_split_the_scenes_and_report_only_writes_the_tables(bench_args, tmp_path,
                                                                    monkeypatch):
    """``shard=(k, n)``: a shard trains only its scenes and writes no tables;
    ``report_only`` trains nothing and tabulates what is finished."""
    scenes = [synthetic_scene(tmp_path / f"scene{c}", 2) for c in "AB"]
    args = dict(bench_args, scenes=scenes, presets="md", seeds=[0, 1], out=tmp_path / "out")
    calls = Calls(monkeypatch)
    first = run_benchmark(**args, shard=(1, 2))  # scene index 1 = sceneB
    assert {Path(c["out"]).parts[-4:-1] for c in calls.train} == {
        ("sceneB", "md", "seed0"), ("sceneB", "md", "seed1")}
    assert first["files"] == [] and not (Path(args["out"]) / "table1.md").exists()
    assert {c["status"] for c in first["cells"] if c["scene"] == "sceneA"} == {"other shard"}

    calls.train.clear()
    calls.evaluate.clear()
    partial = run_benchmark(**args, report_only=True)
    assert calls.train == [] and calls.evaluate == []
    assert sorted(partial["missing"]) == ["sceneA/md/seed0 (not run)", "sceneA/md/seed1 (not run)"]
    assert (Path(args["out"]) / "table1.md").is_file()

    run_benchmark(**args, shard=(0, 2))
    assert {Path(c["out"]).parts[-4] for c in calls.train} == {"sceneA"}
    assert run_benchmark(**args, report_only=True)["missing"] == []
    with pytest.raises(InputError, match="shard 2/2 does not exist"):
        run_benchmark(**args, shard=(2, 2))
