"""The command line: bad input gives one line + exit 2 and writes nothing; train/generate work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynasyn.cli import main
from dynasyn.config import build_config
from dynasyn.errors import InputError


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    return err


def _fails(capsys, argv, expect: str, out: Path) -> None:
    assert main(argv) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and err.startswith("dynasyn: error:"), err
    assert expect in err, err
    assert not out.exists(), "nothing may be written on bad input"


def _scene_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def train_args(tiny_model):
    return ["--model", str(tiny_model), "--phase1-steps", "1", "--phase2-steps", "1",
            "--no-progress"]


def test_missing_image(capsys, scene2, tmp_path, train_args):
    (scene2 / "img.png").unlink()
    _fails(capsys, ["train", str(scene2), "--out", str(tmp_path / "o"), *train_args],
           "image", tmp_path / "o")


def test_unreadable_image(capsys, scene2, tmp_path, train_args):
    (scene2 / "img.png").write_bytes(b"not a png")
    _fails(capsys, ["train", str(scene2), "--out", str(tmp_path / "o"), *train_args],
           "img.png", tmp_path / "o")


def test_mask_size_mismatch(capsys, scene2, tmp_path, train_args):
    Image.new("L", (32, 32), 255).save(scene2 / "mask1.png")
    _fails(capsys, ["train", str(scene2), "--out", str(tmp_path / "o"), *train_args],
           "mask1.png", tmp_path / "o")


def test_empty_mask(capsys, scene2, tmp_path, train_args):
    Image.new("L", (64, 64), 0).save(scene2 / "mask0.png")
    _fails(capsys, ["train", str(scene2), "--out", str(tmp_path / "o"), *train_args],
           "mask0.png", tmp_path / "o")


def test_classes_differ_from_masks(capsys, scene2, tmp_path, train_args):
    _fails(capsys, ["train", str(scene2), "--classes", "a", "b", "c", "--out",
                    str(tmp_path / "o"), *train_args], "3", tmp_path / "o")


def test_unknown_preset(capsys, scene2, tmp_path, train_args):
    _fails(capsys, ["train", str(scene2), "--preset", "nope", "--out", str(tmp_path / "o"),
                    *train_args], "unknown preset 'nope'", tmp_path / "o")


def test_missing_model_path(capsys, scene2, tmp_path):
    _fails(capsys, ["train", str(scene2), "--model", str(tmp_path / "no-such-model"), "--out",
                    str(tmp_path / "o")], "no-such-model", tmp_path / "o")


def test_existing_output_needs_overwrite(capsys, scene2, tmp_path, train_args):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", str(scene2), "--out", str(out), *train_args]) == 2
    err = _err(capsys)
    assert "--overwrite" in err and err.count("\n") == 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_config_values(tmp_path):
    with pytest.raises(InputError, match="unknown config key 'lambda_foo'"):
        build_config("dynasyn", overrides={"lambda_foo": 1})
    f = tmp_path / "c.yaml"
    f.write_text("phase1_steps: 5\nlambda_ica: 0.02\n")
    cfg = build_config("break-a-scene", f, {"phase1_steps": 7})
    assert (cfg.phase1_steps, cfg.lambda_ica, cfg.phase2_steps, cfg.optimizer) == (7, 0.02, 400,
                                                                                   "adamw")
    with pytest.raises(InputError, match="not a valid int"):
        build_config("dynasyn", overrides={"phase1_steps": "many"})


def test_paper_values_are_the_dynasyn_defaults():
    paper = json.loads((Path(__file__).resolve().parents[2] / "shared/data/paper.json")
                       .read_text())["hyperparameters"] if (Path(__file__).resolve().parents[2]
                                                            / "shared/data/paper.json").exists() \
        else None
    if paper is None:
        pytest.skip("../shared not present")
    cfg = build_config("dynasyn")
    for k in ("phase1_steps", "phase2_steps", "phase1_lr", "phase2_lr", "lambda_md",
              "lambda_m2a", "lambda_ica", "lambda_aug"):
        assert getattr(cfg, k) == paper[k], k
    assert cfg.optimizer == "adam"


def test_train_then_generate_and_refuse_unknown_placeholder(capsys, scene2, tmp_path,
                                                            train_args):
    run = tmp_path / "run"
    assert main(["train", str(scene2), "--out", str(run), *train_args]) == 0
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    gen = tmp_path / "gen"
    assert main(["generate", str(run), "<asset0> is throwing the <asset1>", "-n", "2",
                 "--steps", "2", "--seed", "3", "--out", str(gen), "--no-progress"]) == 0
    names = sorted(p.name for p in gen.iterdir())
    assert names == ["asset0-is-throwing-the-asset1_3.png", "asset0-is-throwing-the-asset1_4.png",
                     "asset0-is-throwing-the-asset1_grid.png"]
    grid = Image.open(gen / "asset0-is-throwing-the-asset1_grid.png")
    assert grid.size == (128, 64)
    a = np.asarray(Image.open(gen / names[0]))
    assert a.shape == (64, 64, 3)
    capsys.readouterr()
    assert main(["generate", str(run), "<asset7> is running", "--out", str(tmp_path / "g2")]) == 2
    err = _err(capsys)
    assert "<asset7>" in err and "<asset0>, <asset1>" in err
    assert not (tmp_path / "g2").exists()


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "dynasyn train" in out and "break-a-scene" in out


def test_demo_runs_end_to_end_on_a_given_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_model), "--out", str(out), "--steps", "1", "-n", "1",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "demo_grid.png" in printed
    grid = Image.open(out / "demo_grid.png")
    assert grid.size[1] == 9 * (128 + 4)  # the reference scene + 8 prompts, one row each
    assert (out / "run" / "run.json").is_file() and (out / "augmented" / "prompts.jsonl").is_file()


def test_demo_without_the_micro_model_says_how_to_build_it(tmp_path, capsys, monkeypatch):
    import dynasyn.models as M

    monkeypatch.setattr(M, "micro_model_path", lambda: tmp_path / "nowhere")
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "python -m dynasyn.micro.train" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
