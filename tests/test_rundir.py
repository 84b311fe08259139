"""A run directory is self-contained: its scene copy and run-relative paths (issue 24)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dynasyn.cli import main
from dynasyn.config import build_config, load_config
from dynasyn.errors import InputError
from dynasyn.rundir import (
    copy_scene,
    find_run_scene,
    record_path,
    recorded_config,
    run_path,
    start_run,
)
from dynasyn.scene import load_scene

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_scene(a, b) -> None:
    assert a.classes == b.classes and [s.phrase for s in a.subjects] == [
        s.phrase for s in b.subjects]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))


# ------------------------------------------------------------------------------ units


def test_copy_scene_keeps_the_files_and_writes_the_classes_used(scene2, tmp_path):
    (scene2 / "scene.json").unlink()
    scene = load_scene(scene2, classes=["rabbit", "jacket"])
    dest = copy_scene(scene, tmp_path / "copy")
    assert sorted(p.name for p in dest.iterdir()) == ["img.png", "mask0.png", "mask1.png",
                                                      "scene.json"]
    for name in ("img.png", "mask0.png", "mask1.png"):
        assert (dest / name).read_bytes() == (scene2 / name).read_bytes()
    _same_scene(load_scene(dest), scene)  # loads alone: no --classes needed
    with pytest.raises(FileExistsError):
        copy_scene(scene, dest)


def test_recorded_paths_resolve_from_the_run(tmp_path, monkeypatch, tiny_model):
    run = tmp_path / "runs" / "r"
    (run / "augmented").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert record_path(run, "runs/r/augmented") == "augmented"
    assert record_path(run, tmp_path / "aug") == str(tmp_path / "aug")  # outside: absolute
    cfg = build_config("dynasyn", overrides=dict(scene="somewhere", augmented="runs/r/augmented",
                                                 model="owner/model"))
    rec = recorded_config(cfg, Path("runs/r"))
    assert (rec.scene, rec.augmented, rec.model) == ("scene", "augmented", "owner/model")
    local = build_config("dynasyn", overrides=dict(model=os.path.relpath(tiny_model)))
    assert recorded_config(local, run).model == str(tiny_model.resolve())  # a directory: absolute
    assert recorded_config(build_config("dynasyn"), run).model == "micro"
    # run-relative first; a path only the working directory has (older runs) as recorded
    assert run_path(run, "augmented") == run / "augmented"
    (tmp_path / "old-scene").mkdir()
    assert run_path(run, "old-scene") == Path("old-scene")
    assert run_path(run, tmp_path / "abs") == tmp_path / "abs"
    with pytest.raises(InputError, match="'gone'.*config.yaml.*pass --scene"):
        find_run_scene(run, "gone", "pass --scene DIR")


def test_overwriting_a_run_from_its_own_scene_copy(scene2, tmp_path):
    run = tmp_path / "run"
    cfg = build_config("dynasyn", overrides=dict(scene=str(scene2)))
    start_run(run, cfg, load_scene(scene2))
    (run / "stale.txt").write_text("old")
    own = load_scene(run / "scene")
    start_run(run, build_config("dynasyn", overrides=dict(scene=str(run / "scene"))), own,
              overwrite=True)
    assert not (run / "stale.txt").exists()
    _same_scene(load_scene(run / "scene"), load_scene(scene2))
    assert load_config(run / "config.yaml").scene == "scene"
    assert not list(tmp_path.glob(".run.scene-*"))  # no staging directory left behind


# ------------------------------------------------------------------------------ end to end


def test_a_run_works_from_anywhere_after_its_scene_is_deleted(tmp_path, monkeypatch, scene2,
                                                              tiny_model, tiny_clip, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(scene2, work / "photo")
    (work / "photo" / "scene.json").unlink()
    monkeypatch.chdir(work)
    assert main(["train", "photo", "--classes", "rabbit", "jacket", "--out", "runs/r",
                 "--model", str(tiny_model), "--phase1-steps", "1", "--phase2-steps", "1",
                 "--no-progress"]) == 0
    run = work / "runs" / "r"
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["scene"] == "scene"
    _same_scene(load_scene(run / "scene"), load_scene(work / "photo", classes=["rabbit", "jacket"]))

    shutil.rmtree(work / "photo")
    monkeypatch.chdir(elsewhere)
    ev = ["evaluate", str(run), "--prompts", "plain", "-n", "1", "--steps", "1", "--limit", "1",
          "--clip-model", str(tiny_clip), "--device", "cpu", "--no-progress"]
    assert main(ev) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["classes"] == ["rabbit", "jacket"]
    assert Path(metrics["settings"]["scene"]) == run / "scene"
    assert main(["generate", str(run), "<asset0> and <asset1>", "-n", "1", "--steps", "1",
                 "--no-progress"]) == 0
    assert (run / "generated" / "asset0-and-asset1_grid.png").is_file()
    assert not (elsewhere / "runs").exists()  # nothing was written relative to the cwd

    # resume works from anywhere too: an unfinished run (no run.json) is finished
    (run / "run.json").unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["classes"] == ["rabbit", "jacket"]


def test_an_old_run_with_a_working_directory_scene_still_evaluates(tmp_path, monkeypatch, scene2,
                                                                   tiny_model, tiny_clip, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(scene2, tmp_path / "photo")
    assert main(["train", "photo", "--out", "run", "--model", str(tiny_model),
                 "--phase1-steps", "1", "--phase2-steps", "1", "--no-progress"]) == 0
    # what a run written before scene copies looks like: the scene relative to the cwd
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cfg["scene"] = "photo"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.rmtree(tmp_path / "run" / "scene")
    ev = ["evaluate", "run", "--prompts", "plain", "-n", "1", "--steps", "1", "--limit", "1",
          "--clip-model", str(tiny_clip), "--device", "cpu", "--no-progress"]
    assert main(ev) == 0
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())[
        "settings"]["scene"] == "photo"
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), *ev[2:], "--out", "e"]) == 2
    err = capsys.readouterr().err
    assert "'photo'" in err and "--scene" in err and err.count("\n") == 1
    assert not (tmp_path / "other" / "e").exists()
    assert main(["evaluate", str(tmp_path / "run"), *ev[2:], "--out", "e",
                 "--scene", str(tmp_path / "photo")]) == 0
