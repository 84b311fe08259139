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
    # the file and --set win over the preset; phase 2 keeps the micro recipe's 400 // 7
    assert (cfg.phase1_steps, cfg.lambda_ica, cfg.phase2_steps, cfg.optimizer) == (7, 0.02, 57,
                                                                                   "adamw")
    with pytest.raises(InputError, match="not a valid int"):
        build_config("dynasyn", overrides={"phase1_steps": "many"})


def test_paper_values_are_the_dynasyn_defaults(tmp_path):
    paper = json.loads((Path(__file__).resolve().parents[2] / "shared/data/paper.json")
                       .read_text())["hyperparameters"] if (Path(__file__).resolve().parents[2]
                                                            / "shared/data/paper.json").exists() \
        else None
    if paper is None:
        pytest.skip("../shared not present")
    cfg = build_config("dynasyn", overrides={"model": str(tmp_path)})  # not the micro recipe
    for k in ("phase1_steps", "phase2_steps", "phase1_lr", "phase2_lr", "lambda_md",
              "lambda_m2a", "lambda_ica", "lambda_aug"):
        assert getattr(cfg, k) == paper[k], k
    assert cfg.optimizer == "adam"


def test_micro_recipe_applies_on_the_micro_model_only_and_yields_to_explicit_values(tmp_path):
    micro = build_config("break-a-scene", overrides={"model": "micro"})
    assert (micro.placeholder_vectors, micro.placeholder_init) == (0, "phrase")
    other = build_config("dynasyn", overrides={"model": str(tmp_path)})
    assert (other.placeholder_vectors, other.placeholder_init) == (1, "class")
    f = tmp_path / "c.yaml"
    f.write_text("placeholder_init: class\n")
    mixed = build_config("dynasyn", f, {"model": "micro", "placeholder_vectors": 2})
    assert (mixed.placeholder_vectors, mixed.placeholder_init) == (2, "class")
    with pytest.raises(InputError, match="placeholder_init must be"):
        build_config("dynasyn", overrides={"placeholder_init": "random"})


def test_the_micro_recipe_trains_a_seventh_of_each_presets_steps_with_a_gentle_phase_1(tmp_path):
    def steps(preset, **ov):
        c = build_config(preset, overrides={"model": "micro", **ov})
        return c.phase1_steps, c.phase2_steps, c.phase1_lr, c.phase2_lr

    assert steps("dynasyn") == (100, 100, 5e-5, 2e-6)
    assert steps("break-a-scene")[:2] == (57, 57)
    assert steps("dreambooth")[:2] == (0, 200) and steps("textual-inversion")[:2] == (200, 0)
    assert steps("dynasyn", phase1_steps=700, phase1_lr=5e-4)[:3] == (700, 100, 5e-4)
    other = build_config("dynasyn", overrides={"model": str(tmp_path)})
    assert (other.phase1_steps, other.phase2_steps, other.phase1_lr) == (700, 700, 5e-4)


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


# ------------------------------------------------------------------------------ version, scene options


def test_version_prints_the_package_version(capsys):
    import dynasyn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dynasyn {dynasyn.__version__}"


SCENE_COMMANDS = ("train", "augment", "personalize", "benchmark", "evaluate", "zeroshot")


def _takes_a_scene(p) -> bool:
    return any(a.dest in ("scene", "scenes") for a in p._actions)


def test_every_scene_command_has_the_same_scene_options():
    """Every subcommand with a scene argument has the one "scene options" group."""
    import argparse

    from dynasyn.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    takers = {name for name, p in sub.choices.items() if _takes_a_scene(p)}
    assert set(SCENE_COMMANDS) <= takers
    groups = {}
    for name in sorted(takers):
        found = [g for g in sub.choices[name]._action_groups if g.title == "scene options"]
        assert found, f"`dynasyn {name}` takes a scene but not cli.add_scene_args' options"
        groups[name] = sorted((tuple(a.option_strings), a.nargs, a.metavar)
                              for a in found[0]._group_actions)
        assert ("--classes",) in [o for o, _, _ in groups[name]], name
    assert len({tuple(v) for v in groups.values()}) == 1, groups


def _without_scene_json(scene: Path) -> Path:
    (scene / "scene.json").unlink()
    return scene


@pytest.fixture
def bare_scene(scene2) -> Path:
    """A two-subject scene without scene.json: its classes must come from --classes."""
    return _without_scene_json(scene2)


AUG_ARGS = ["--num-prompts", "2", "--draft-steps", "2", "--gsa-steps", "4"]


def test_augment_takes_classes_for_a_scene_without_scene_json(capsys, bare_scene, tmp_path,
                                                              tiny_model):
    out = tmp_path / "aug"
    _fails(capsys, ["augment", str(bare_scene), "--model", str(tiny_model), "--out", str(out),
                    *AUG_ARGS], "--classes", out)
    assert main(["augment", str(bare_scene), "--classes", "rabbit", "jacket", "--model",
                 str(tiny_model), "--out", str(out), *AUG_ARGS, "--no-progress"]) == 0
    records = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(records) == 2
    nouns = {"rabbit", "jacket"}
    for r in records:
        assert any(n in r["class_prompt"] for n in nouns), r
        assert not any(n in r["class_prompt"] for n in ("panda", "bowl")), r
    printed = capsys.readouterr().out
    assert str(out) in printed and "--classes rabbit jacket" in printed


def test_train_takes_classes_and_records_them_in_the_runs_scene_copy(capsys, bare_scene,
                                                                     tmp_path, train_args):
    run = tmp_path / "run"
    _fails(capsys, ["train", str(bare_scene), "--out", str(run), *train_args], "--classes", run)
    assert main(["train", str(bare_scene), "--classes", "rabbit", "jacket", "--out", str(run),
                 *train_args]) == 0
    assert json.loads((run / "run.json").read_text())["classes"] == ["rabbit", "jacket"]
    copy = json.loads((run / "scene" / "scene.json").read_text())
    assert [s["class"] for s in copy["subjects"]] == ["rabbit", "jacket"]
    printed = capsys.readouterr().out
    assert f"run written to {run}" in printed and f"dynasyn evaluate {run}" in printed


def test_personalize_takes_classes(capsys, bare_scene, tmp_path, tiny_model):
    run = tmp_path / "run"
    argv = ["personalize", str(bare_scene), "--model", str(tiny_model), "--out", str(run),
            "--phase1-steps", "1", "--phase2-steps", "1", *AUG_ARGS, "--no-progress"]
    _fails(capsys, argv, "--classes", run)
    assert main([*argv, "--classes", "rabbit", "jacket"]) == 0
    assert json.loads((run / "run.json").read_text())["classes"] == ["rabbit", "jacket"]
    rec = json.loads((run / "augmented" / "prompts.jsonl").read_text().splitlines()[0])
    assert "rabbit" in rec["class_prompt"] or "jacket" in rec["class_prompt"]
    from dynasyn.config import load_config

    assert load_config(run / "config.yaml").augmented == "augmented"  # relative to the run
    printed = capsys.readouterr().out
    assert f"{run / 'augmented'}" in printed and f"run written to {run}" in printed


def test_benchmark_takes_classes_for_every_scene(capsys, bare_scene, tmp_path, tiny_model,
                                                 tiny_clip):
    out = tmp_path / "bench"
    argv = ["benchmark", str(bare_scene), "--presets", "textual-inversion", "--out", str(out),
            "--model", str(tiny_model), "--phase1-steps", "1", "--phase2-steps", "0", "-n", "1",
            "--steps", "1", "--limit", "1", "--clip-model", str(tiny_clip), "--device", "cpu",
            "--no-progress"]
    _fails(capsys, argv, "--classes", out)
    _fails(capsys, [*argv, "--classes", "rabbit"], "1 class given", out)
    assert main([*argv, "--classes", "rabbit", "jacket"]) == 0
    run = out / bare_scene.name / "textual-inversion" / "seed0" / "run"
    assert json.loads((run / "run.json").read_text())["classes"] == ["rabbit", "jacket"]
    assert (run.parent / "eval" / "metrics.json").is_file()
    assert str(out) in capsys.readouterr().out


def test_evaluate_takes_the_scene_options(capsys, scene2, tmp_path, train_args, tiny_clip):
    run = tmp_path / "run"
    assert main(["train", str(scene2), "--out", str(run), *train_args]) == 0
    other = _without_scene_json(_scene_copy(scene2, tmp_path / "elsewhere"))
    ev = ["evaluate", str(run), "--prompts", "plain", "-n", "1", "--steps", "1", "--limit", "1",
          "--clip-model", str(tiny_clip), "--device", "cpu", "--no-progress"]
    _fails(capsys, [*ev, "--classes", "rabbit", "--out", str(tmp_path / "e0")], "1 given but the run has 2",
           tmp_path / "e0")
    assert main([*ev, "--scene", str(other), "--classes", "rabbit", "jacket",
                 "--out", str(tmp_path / "e1")]) == 0
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert metrics["classes"] == ["rabbit", "jacket"]
    assert metrics["settings"]["scene"] == str(other)
    assert all("rabbit" in p["class_prompt"] or "jacket" in p["class_prompt"]
               for p in metrics["prompts"])
    assert main([*ev, "--out", str(tmp_path / "e2")]) == 0  # default: the run's classes and copy
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert metrics["classes"] == ["panda", "bowl"]
    assert metrics["settings"]["scene"] == str(run / "scene")


def test_zeroshot_is_a_dynasyn_command_and_refuses_missing_weights(capsys, scene2, tmp_path,
                                                                    monkeypatch):
    import dynasyn.dynamicid.train as ztrain

    monkeypatch.setattr(ztrain, "default_out", lambda: tmp_path / "no-weights")
    out = tmp_path / "zs"
    code = main(["zeroshot", str(scene2), "<asset0> is jumping", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dynasyn: error:") and "weights" in err
    assert len(err.splitlines()) == 1 and not out.exists()
