"""Tests for dynasyn.scene: loading, validation, tensors() and save_scene()."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.errors import InputError
from dynasyn.scene import Scene, Subject, load_scene, save_scene

SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"

REAL = {
    "bear": (
        ["bowl", "seashell", "panda"],
        ["green bowl", "orange seashell", "toy panda with a white belly"],
    ),
    "creature": (
        ["figurine", "bowl", "stone"],
        ["pale creature figurine", "black stone bowl", "pink pebble"],
    ),
    "toys": (
        ["toy", "duck", "ball"],
        ["blue rubber dragon toy", "rubber duck in a red dress", "small soccer ball"],
    ),
}


def _square(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A float mask of shape (h, w), 1 inside box = (top, left, bottom, right)."""
    m = np.zeros((h, w), np.float32)
    t, lft, b, r = box
    m[t:b, lft:r] = 1.0
    return m


def _write_scene(
    d: Path,
    size: tuple[int, int] = (32, 24),
    n: int = 2,
    classes: list[str] | None = None,
    json_file: bool = True,
) -> Path:
    """A small synthetic scene written by hand (not by save_scene), image img.png."""
    w, h = size
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 20, 30)).save(d / "img.png")
    for i in range(n):
        m = np.zeros((h, w), np.uint8)
        m[2 + 3 * i : 8 + 3 * i, 2:10] = 255
        Image.fromarray(m, mode="L").save(d / f"mask{i}.png")
    if json_file:
        classes = classes or [f"thing{i}" for i in range(n)]
        subjects = [{"mask": f"mask{i}.png", "class": c} for i, c in enumerate(classes)]
        (d / "scene.json").write_text(json.dumps({"image": "img.png", "subjects": subjects}))
    return d


def _refused(path: Path, *names: str, **kwargs) -> str:
    """Assert load_scene refuses ``path`` with a one-line message mentioning every name."""
    with pytest.raises(InputError) as info:
        load_scene(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


# ---------------------------------------------------------------------------- real scenes


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_scenes_load(name: str) -> None:
    if not (SCENES / name).is_dir():
        pytest.skip(f"shared data not found at {SCENES} (expected ../shared beside the checkout)")
    classes, phrases = REAL[name]
    scene = load_scene(SCENES / name)
    assert len(scene) == 3
    assert scene.classes == classes
    assert [s.phrase for s in scene.subjects] == phrases
    assert [s.placeholder for s in scene.subjects] == ["<asset0>", "<asset1>", "<asset2>"]
    assert scene.placeholders == ["<asset0>", "<asset1>", "<asset2>"]
    assert [s.mask_path.name for s in scene.subjects] == ["mask0.png", "mask1.png", "mask2.png"]
    assert scene.image.mode == "RGB" and scene.image.size == (512, 512)
    assert scene.image_path.name == "img.jpg"
    for m in scene.masks:
        assert m.dtype == np.float32 and m.shape == (512, 512)
        assert m.min() >= 0.0 and m.max() <= 1.0
        # soft edges are kept at the original size
        assert ((m > 0) & (m < 1)).any()
    image, masks = scene.tensors(64)
    assert image.shape == (3, 64, 64) and masks.shape == (3, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_real_scene_classes_override() -> None:
    if not (SCENES / "bear").is_dir():
        pytest.skip(f"shared data not found at {SCENES} (expected ../shared beside the checkout)")
    scene = load_scene(SCENES / "bear", classes=["dish", "shell", "teddy bear"])
    assert scene.classes == ["dish", "shell", "teddy bear"]
    # phrases still come from scene.json
    assert scene.subjects[2].phrase == "toy panda with a white belly"


# ---------------------------------------------------------------------------- layout rules


def test_no_scene_json_needs_classes(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", n=3, json_file=False)
    _refused(d, "--classes", "mask0.png")
    scene = load_scene(d, classes=["cup", "teddy bear", "ball"], phrases=["red cup", None, None])
    assert scene.classes == ["cup", "teddy bear", "ball"]
    assert [s.phrase for s in scene.subjects] == ["red cup", None, None]
    assert isinstance(scene.subjects[0], Subject) and isinstance(scene, Scene)
    assert scene.image_path.name == "img.png"


def test_image_name_fallbacks(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    os.replace(d / "img.png", d / "image.webp")  # content is PNG; PIL reads by content
    assert load_scene(d, classes=["a", "b"]).image_path.name == "image.webp"
    Image.new("RGB", (32, 24)).save(d / "img.jpg")
    assert load_scene(d, classes=["a", "b"]).image_path.name == "img.jpg"


def test_scene_json_names_image_and_masks(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    os.replace(d / "img.png", d / "photo.png")
    os.replace(d / "mask0.png", d / "b.png")
    os.replace(d / "mask1.png", d / "a.png")
    subjects = [
        {"mask": "a.png", "class": "cat", "phrase": "grey cat"},
        {"mask": "b.png", "class": "dog", "phrase": None},
    ]
    (d / "scene.json").write_text(json.dumps({"image": "photo.png", "subjects": subjects}))
    scene = load_scene(d)
    assert scene.image_path.name == "photo.png"
    assert [s.mask_path.name for s in scene.subjects] == ["a.png", "b.png"]
    assert scene.classes == ["cat", "dog"] and scene.subjects[1].phrase is None


def test_soft_edges_binarize_at_half(tmp_path: Path) -> None:
    w, h = 64, 8
    grad = np.tile(np.arange(w, dtype=np.uint8) * 4, (h, 1))  # 0, 4, ..., 252 along x
    d = tmp_path / "s"
    d.mkdir()
    Image.new("RGB", (w, h), "white").save(d / "img.png")
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = grad  # channel 0 carries the mask
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(d / "mask0.png")
    scene = load_scene(d, classes=["ramp"])
    m = scene.masks[0]
    np.testing.assert_allclose(m, grad / 255.0, atol=1e-6)  # soft values kept
    assert ((m >= 0.5) == (grad >= 128)).all()
    # 128/255 >= 0.5 > 124/255: columns 32.. are subject
    image, masks = scene.tensors(h)  # h is the short side: the central 8x8 columns 28..35
    assert masks.shape == (1, h, h)
    assert masks[0, :, :4].sum() == 0 and masks[0, :, 4:].min() == 1


def test_tensors_shapes_and_ranges(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", size=(40, 30))
    scene = load_scene(d)
    for r in (8, 30, 64):
        image, masks = scene.tensors(r)
        assert image.dtype == torch.float32 and image.shape == (3, r, r)
        assert masks.dtype == torch.float32 and masks.shape == (2, r, r)
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        scene.tensors(0)


@pytest.mark.parametrize("size", [(96, 48), (48, 96), (97, 51)])
def test_tensors_crop_image_and_masks_together(tmp_path: Path, size: tuple[int, int]) -> None:
    """A mask over a red rectangle still covers exactly the red pixels after tensors()."""
    w, h = size
    pixels = np.full((h, w, 3), (0, 0, 255), np.uint8)  # blue background
    # a red rectangle off-centre but inside the central square; a green one outside it
    cx, cy = w // 2, h // 2
    red = (cy - 14, cx - 4, cy + 2, cx + 18) if w > h else (cy - 4, cx - 18, cy + 14, cx + 2)
    t, lft, b, r = red
    pixels[t:b, lft:r] = (255, 0, 0)
    pixels[:12, :12] = (0, 255, 0)
    scene_dir = save_scene(
        tmp_path / "s",
        Image.fromarray(pixels),
        [_square(h, w, red), _square(h, w, (cy - 2, cx - 2, cy + 2, cx + 2))],
        ["box", "dot"],
    )
    scene = load_scene(scene_dir)
    R = 32
    image, masks = scene.tensors(R)
    rgb = (image.permute(1, 2, 0) + 1) * 127.5  # R x R x 3 in 0..255
    redness = (rgb[..., 0] - rgb[..., 2] + 255) / 510  # 1 = red, 0 = blue
    m = masks[0].bool()
    assert m.sum() > 50
    # mask and red pixels agree (a 1-pixel misalignment would give ~20 differences)
    assert ((redness >= 0.5) ^ m).sum() <= 2
    # and both sit where the geometry says: short side -> R, central square
    side = min(w, h)
    x0, y0, scale = (w - side) / 2, (h - side) / 2, R / side
    ys, xs = torch.nonzero(m, as_tuple=True)
    expected = [(t - y0) * scale, (lft - x0) * scale, (b - y0) * scale, (r - x0) * scale]
    got = [ys.min().item(), xs.min().item(), ys.max().item() + 1, xs.max().item() + 1]
    assert np.allclose(got, expected, atol=1.0), (got, expected)
    # the green square in the corner is cropped away
    assert ((rgb[..., 1] > 200) & (rgb[..., 0] < 60)).sum() == 0
    # and the centre dot lands at the centre
    ys, xs = torch.nonzero(masks[1], as_tuple=True)
    assert abs(ys.float().mean().item() - (R - 1) / 2) < 1.0
    assert abs(xs.float().mean().item() - (R - 1) / 2) < 1.0


def test_mask_empty_after_crop_raises_from_tensors(tmp_path: Path) -> None:
    w, h = 64, 16
    d = save_scene(
        tmp_path / "s",
        Image.new("RGB", (w, h)),
        [_square(h, w, (0, 0, 16, 8)), _square(h, w, (4, 28, 12, 36))],
        ["left", "centre"],
    )
    scene = load_scene(d)  # fine at the original size
    with pytest.raises(InputError) as info:
        scene.tensors(16)
    msg = str(info.value)
    assert "mask0.png" in msg and "\n" not in msg


# ---------------------------------------------------------------------------- bad inputs


def test_missing_and_not_a_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope", "nope", "does not exist")
    f = tmp_path / "file.txt"
    f.write_text("x")
    _refused(f, "file.txt", "not a directory")


def test_no_image(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    (d / "img.png").unlink()
    _refused(d, "img.jpg", "no image", classes=["a", "b"])


def test_scene_json_image_missing(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    (d / "img.png").unlink()
    _refused(d, "img.png", "scene.json")


def test_corrupt_image(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    (d / "img.png").write_bytes(b"not an image\n at all")
    _refused(d, "img.png", "cannot read")


def test_truncated_image(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    (d / "img.png").unlink()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(d / "img.jpg")
    data = (d / "img.jpg").read_bytes()
    (d / "img.jpg").write_bytes(data[: len(data) // 2])
    _refused(d, "img.jpg", classes=["a", "b"])


def test_corrupt_mask(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    (d / "mask1.png").write_bytes(b"\x89PNG garbage")
    _refused(d, "mask1.png", "cannot read")


def test_no_masks(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    for i in range(2):
        (d / f"mask{i}.png").unlink()
    _refused(d, "mask0.png", "no masks", classes=["a"])


def test_mask_gap(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", n=3, json_file=False)
    (d / "mask1.png").unlink()
    _refused(d, "mask2.png", "mask1.png", classes=["a", "b"])


def test_mask_size_mismatch(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s", size=(32, 24))
    Image.new("L", (16, 16), 255).save(d / "mask1.png")
    msg = _refused(d, "mask1.png", "img.png", "16x16", "32x24")
    assert "resize" in msg


def test_empty_mask(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    Image.new("L", (32, 24), 127).save(d / "mask0.png")  # 127/255 < 0.5 everywhere
    _refused(d, "mask0.png", "empty")


@pytest.mark.parametrize("classes", [["a"], ["a", "b", "c"]])
def test_class_count_mismatch(tmp_path: Path, classes: list[str]) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    _refused(d, "mask0.png", "mask1.png", f"{len(classes)} class", classes=classes)
    d2 = _write_scene(tmp_path / "s2")  # override of scene.json's classes
    _refused(d2, "mask1.png", classes=classes)


def test_phrase_count_mismatch(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    _refused(d, "mask1.png", "1 phrase given", phrases=["only one"])


@pytest.mark.parametrize("noun", ["", "   ", "<asset0>", "a>b", "teddy\nbear", "tab\tbed"])
def test_bad_class_noun(tmp_path: Path, noun: str) -> None:
    d = _write_scene(tmp_path / "s", json_file=False)
    _refused(d, "mask1.png", classes=["ok", noun])
    d2 = _write_scene(tmp_path / "s2", classes=[noun, "ok"])
    _refused(d2, "mask0.png", "scene.json")


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"image": "img.png"}', "subjects"),
        ('{"subjects": []}', "subjects"),
        ('{"subjects": "mask0.png"}', "subjects"),
        ('{"subjects": [{"class": "a"}, {"mask": "mask1.png", "class": "b"}]}', "mask"),
        ('{"subjects": [{"mask": 3, "class": "a"}]}', "mask"),
        ('{"subjects": [{"mask": "mask0.png"}, {"mask": "mask1.png", "class": "b"}]}', "class"),
        ('{"subjects": [{"mask": "mask0.png", "class": 5}]}', "class"),
        ('{"subjects": [{"mask": "mask0.png", "class": "a", "phrase": 1}]}', "phrase"),
        ('{"image": 7, "subjects": [{"mask": "mask0.png", "class": "a"}]}', "image"),
        ('{"subjects": [{"mask": "gone.png", "class": "a"}]}', "gone.png"),
        (
            '{"subjects": [{"mask": "mask0.png", "class": "a"}, {"mask": "mask0.png", '
            '"class": "b"}]}',
            "twice",
        ),
        ("not json\nat all", "not valid JSON"),
    ],
)
def test_malformed_scene_json(tmp_path: Path, content: str, hint: str) -> None:
    d = _write_scene(tmp_path / "s")
    (d / "scene.json").write_text(content)
    _refused(d, "scene.json", hint)


def test_scene_json_without_class_ok_with_classes_argument(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    subjects = [{"mask": "mask0.png"}, {"mask": "mask1.png"}]
    (d / "scene.json").write_text(json.dumps({"subjects": subjects}))
    assert load_scene(d, classes=["x", "y"]).classes == ["x", "y"]


def test_loading_writes_nothing(tmp_path: Path) -> None:
    d = _write_scene(tmp_path / "s")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    load_scene(d).tensors(16)
    with pytest.raises(InputError):
        load_scene(d, classes=["a"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------- save_scene


def test_save_scene_round_trip(tmp_path: Path) -> None:
    h, w = 20, 30
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    soft = np.clip(np.linspace(-0.5, 1.5, w, dtype=np.float32)[None, :].repeat(h, 0), 0, 1)
    hard = np.zeros((h, w), bool)
    hard[5:10, 5:12] = True
    as_u8 = (hard.astype(np.uint8) * 200)[::-1].copy()
    out = save_scene(
        tmp_path / "a" / "scene",
        Image.fromarray(pixels),
        [soft, hard, as_u8],
        ["ramp", "teddy bear", "box"],
        ["a soft ramp", None, "grey box"],
    )
    assert out == tmp_path / "a" / "scene"
    assert sorted(p.name for p in out.iterdir()) == [
        "img.png",
        "mask0.png",
        "mask1.png",
        "mask2.png",
        "scene.json",
    ]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["scene"]  # no temp dirs left
    assert Image.open(out / "mask0.png").mode == "L"
    scene = load_scene(out)
    np.testing.assert_array_equal(np.asarray(scene.image), pixels)
    np.testing.assert_allclose(scene.masks[0], soft, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(scene.masks[1] >= 0.5, hard)
    np.testing.assert_array_equal(scene.masks[2] >= 0.5, as_u8 >= 128)
    assert scene.classes == ["ramp", "teddy bear", "box"]
    assert [s.phrase for s in scene.subjects] == ["a soft ramp", None, "grey box"]
    meta = json.loads((out / "scene.json").read_text())
    assert meta["image"] == "img.png" and len(meta["subjects"]) == 3


def test_save_scene_refuses_and_overwrites(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8))
    m = _square(8, 8, (2, 2, 6, 6))
    out = save_scene(tmp_path / "s", img, [m], ["a"])
    with pytest.raises(InputError):
        save_scene(out, img, [m], ["b"])
    assert load_scene(out).classes == ["a"]
    save_scene(out, img, [m, m], ["b", "c"], overwrite=True)
    assert load_scene(out).classes == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    bad = [
        ([m], ["a", "b"]),  # count
        ([np.zeros((8, 8))], ["a"]),  # empty
        ([np.ones((4, 8))], ["a"]),  # size
        ([m], ["<a>"]),  # noun
        ([], []),  # nothing
    ]
    for masks, classes in bad:
        with pytest.raises(InputError) as info:
            save_scene(tmp_path / "t", img, masks, classes)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # nothing written
