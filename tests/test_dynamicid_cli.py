"""``dynasyn zeroshot`` (dynasyn.dynamicid.cli): bad input is one line and writes nothing; a
tiny run writes images as ``dynasyn generate`` does."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from dynasyn.dynamicid.cli import add_parser, parse_box, run
from dynasyn.dynamicid.encoder import tiny_id_encoder
from dynasyn.dynamicid.saa import install_saa
from dynasyn.dynamicid.weights import save_weights
from dynasyn.errors import InputError
from dynasyn.tiny import save_tiny_pipeline, synthetic_scene, tiny_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    model = save_tiny_pipeline(root / "sd")
    pipe = tiny_pipeline()
    install_saa(pipe.unet)
    weights = save_weights(root / "w", unet=pipe.unet, encoder=tiny_id_encoder(32))
    wide = tiny_pipeline(cross_attention_dim=24)
    install_saa(wide.unet)
    other = save_weights(root / "w24", unet=wide.unet, encoder=tiny_id_encoder(24))
    scene = synthetic_scene(root / "scene", 2, classes=["star", "ball"])
    return root, model, weights, other, scene


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["zeroshot", *argv])


def _fails(tmp_path, match: str, *argv: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match) as e:
        run(_args(*argv, "--out", str(out), "--no-progress"))
    assert "\n" not in str(e.value)
    assert not out.exists()  # nothing written


def test_bad_input_is_refused_before_anything_is_written(setup, tmp_path):
    root, model, weights, other, scene = setup
    no_masks = tmp_path / "nomask"
    no_masks.mkdir()
    shutil.copy(scene / "img.png", no_masks / "img.png")
    common = ["--model", str(model), "--weights", str(weights)]
    _fails(tmp_path, "no masks", str(no_masks), "<asset0> is jumping", *common,
           "--classes", "star")
    _fails(tmp_path, r"<asset2> but scene .* has 2 subjects", str(scene),
           "<asset2> is jumping", *common)
    _fails(tmp_path, "outside the 64x64 image", str(scene), "<asset0> next to <asset1>",
           *common, "--boxes", "0,0,30,64", "30,0,70,64")
    _fails(tmp_path, "layout does not match the model", str(scene), "<asset0> is jumping",
           "--model", str(model), "--weights", str(other))
    _fails(tmp_path, "one reference per subject", str(scene), "<asset0> is jumping", *common,
           "--refs", str(scene / "img.png"))


def test_parse_box_normalizes_pixels_and_refuses_bad_boxes():
    assert parse_box("16,0,48,32", 64, 64) == (0.25, 0.0, 0.75, 0.5)
    for bad in ("1,2,3", "10,10,5,20", "-1,0,10,10", "a,b,c,d"):
        with pytest.raises(InputError):
            parse_box(bad, 64, 64)


def test_zeroshot_writes_images_like_generate(setup, tmp_path):
    _, model, weights, _, scene = setup
    out = tmp_path / "out"
    rc = run(_args(str(scene), "<asset0> is on top of <asset1>", "--model", str(model),
                   "--weights", str(weights), "-n", "2", "--steps", "1", "--out", str(out),
                   "--no-progress"))
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["asset0-is-on-top-of-asset1_0.png", "asset0-is-on-top-of-asset1_1.png",
                     "asset0-is-on-top-of-asset1_grid.png", "zeroshot.json"]
    info = json.loads((out / "zeroshot.json").read_text())
    assert info["boxes"] == "auto" and info["n"] == 2 and info["seconds_per_image"] > 0


def test_micro_without_bundled_weights_says_how_to_train_them(setup, tmp_path, monkeypatch):
    import dynasyn.dynamicid.train as T

    monkeypatch.setattr(T, "default_out", lambda: tmp_path / "not-bundled")
    _fails(tmp_path, "no DynamicID weights are bundled", str(setup[4]), "<asset0> is jumping",
           "--model", "micro")


def test_the_bundled_weights_personalize_an_example_with_no_flags(tmp_path):
    """The fresh-clone path: the bundled weights on the bundled micro model."""
    from pathlib import Path

    from PIL import Image

    from dynasyn.dynamicid.train import default_out

    info = json.loads((default_out() / "dynamicid.json").read_text())
    assert info["format"] == "dynasyn-dynamicid" and info["cross_attention_dim"] == 48
    scene = Path(__file__).resolve().parents[1] / "examples" / "star_ball"
    out = tmp_path / "out"
    assert run(_args(str(scene), "<asset0> is sleeping", "-n", "1", "--steps", "2",
                     "--out", str(out), "--no-progress")) == 0
    img = Image.open(out / "asset0-is-sleeping_0.png")
    assert img.size == (64, 64)
