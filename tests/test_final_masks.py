"""--final-masks: the L_AUG masks segmented again in the image after GSA, or the pasted ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dynasyn.augment.pipeline as P
from dynasyn.attention import install_attention_capture
from dynasyn.augment.pipeline import AugmentConfig, augment, item_key
from dynasyn.augment.prompts import PromptItem
from dynasyn.augment.resegment import final_image_maps, resegment_masks
from dynasyn.cli import build_parser, main
from dynasyn.errors import InputError
from dynasyn.models import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(draft_steps=2, gsa_steps=4, num_prompts=2)


def _square(y, x, side=16, size=64):
    m = np.zeros((size, size), bool)
    m[y : y + side, x : x + side] = True
    return m


def _blob_map(y, x, side=4, grid=16):
    """A (grid, grid) attention map peaking on a square (in map pixels)."""
    a = np.full((grid, grid), 0.05, np.float32)
    a[y : y + side, x : x + side] = 1.0
    return a


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def _final_image(*squares):
    """A grey image with coloured squares ``(y, x, side, rgb)`` drawn in."""
    a = np.full((64, 64, 3), 200, np.uint8)
    for y, x, side, rgb in squares:
        a[y : y + side, x : x + side] = rgb
    return Image.fromarray(a)


@pytest.mark.parametrize("grabcut", [True, False])
def test_resegmented_masks_follow_the_final_image_not_the_paste(grabcut):
    pytest.importorskip("cv2") if grabcut else None
    pasted = [_square(4, 4), _square(4, 44)]
    # GSA moved both subjects down: they are drawn, and attended, elsewhere
    img = _final_image((40, 4, 16, (220, 40, 40)), (40, 44, 16, (40, 60, 220)))
    maps = np.stack([_blob_map(10, 1), _blob_map(10, 11)])
    masks, info = resegment_masks(img, maps, pasted, grabcut=grabcut)
    assert [r["source"] for r in info] == ["resegmented", "resegmented"]
    assert _iou(masks[0], _square(40, 4)) > 0.7 and _iou(masks[1], _square(40, 44)) > 0.7
    for m, p, r in zip(masks, pasted, info, strict=True):
        assert not (m & p).any() and r["iou_pasted"] == 0.0 and r["reason"] is None
    assert not (masks[0] & masks[1]).any()


def test_grabcut_fits_a_coarse_attention_blob_to_the_subject():
    pytest.importorskip("cv2")
    img = _final_image((22, 22, 20, (220, 40, 40)))
    truth = _square(22, 22, side=20)
    maps = _blob_map(6, 6, side=6)[None]  # 24 px wide, 2 px off the subject's corner
    coarse, _ = resegment_masks(img, maps, [truth], grabcut=False)
    fitted, _ = resegment_masks(img, maps, [truth])
    assert _iou(fitted[0], truth) > 0.75 and _iou(fitted[0], truth) > _iou(coarse[0], truth) + 0.2


def test_a_degenerate_segmentation_falls_back_to_the_pasted_mask_and_says_why():
    img = Image.new("RGB", (64, 64), (200, 200, 200))
    pasted = [_square(4, 4), _square(36, 36, side=24)]
    flat = np.full((16, 16), 0.3, np.float32)
    # (the fallback rules do not depend on the GrabCut refinement, left out here)
    masks, info = resegment_masks(img, np.stack([_blob_map(0, 0, side=5), flat]), pasted,
                                  grabcut=False)
    assert info[1] == {"source": "pasted", "reason": "flat attention map",
                       "iou_pasted": info[1]["iou_pasted"]}
    assert np.array_equal(masks[1], pasted[1]) and info[0]["source"] == "resegmented"
    # a segmentation far smaller than the pasted subject is degenerate too
    tiny = _blob_map(12, 12, side=1)
    masks, info = resegment_masks(img, np.stack([_blob_map(0, 0, side=5), tiny]), pasted,
                                  grabcut=False)
    assert info[1]["source"] == "pasted" and info[1]["reason"].startswith("area 0.")
    assert np.array_equal(masks[1], pasted[1])
    # the fallback's pixels are taken from a re-segmented neighbour: masks stay disjoint
    big = _blob_map(5, 5, side=11)  # covers the second subject's pasted square too
    pasted = [_square(0, 0, side=34), _square(40, 40, side=24)]
    masks, info = resegment_masks(img, np.stack([big, flat]), pasted, grabcut=False)
    assert info[0]["source"] == "resegmented" and info[1]["source"] == "pasted"
    assert not (masks[0] & masks[1]).any() and masks[0].any()


def test_with_sam_the_final_image_is_segmented_by_sam_prompted_by_attention():
    pytest.importorskip("cv2")
    from test_augment_compose import _tiny_sam

    img = _final_image((40, 4, 16, (220, 40, 40)), (40, 44, 16, (40, 60, 220)))
    pasted = [_square(4, 4), _square(4, 44)]
    maps = np.stack([_blob_map(10, 1), _blob_map(10, 11)])
    calls = []
    model, processor = _tiny_sam()
    real = model.forward
    model.forward = lambda *a, **k: calls.append(k.get("input_boxes")) or real(*a, **k)
    masks, info = resegment_masks(img, maps, pasted, sam=(model, processor))
    assert len(calls) == 2  # one SAM decoding per subject, prompted by its attention box
    assert len(masks) == 2 and all(m.any() for m in masks) and not (masks[0] & masks[1]).any()
    assert all(r["source"] in ("resegmented", "pasted") for r in info)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p = load_pipeline(str(tiny_model))
    install_attention_capture(p.unet)
    return p


def test_final_image_maps_read_the_image_with_the_phrase_prompt(pipe):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    args = (pipe, img, "{0} and {1}", ["a panda", "a bowl"], ["panda", "bowl"])
    maps = final_image_maps(*args, seed=3)
    assert maps.shape[0] == 2 and maps.ndim == 3 and np.isfinite(maps).all()
    assert np.allclose(maps, final_image_maps(*args, seed=3))
    other = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert not np.allclose(maps, final_image_maps(pipe, other, *args[2:], seed=3))


def test_augment_with_resegmented_masks_records_them_and_never_reuses_pasted_items(
        tiny_model, scene2, tmp_path, monkeypatch):
    out = tmp_path / "aug"
    pasted = augment(scene2, out, AugmentConfig(model=str(tiny_model), **FAST), progress=False)
    recs_p = [json.loads(x) for x in (pasted / "prompts.jsonl").read_text().splitlines()]
    assert all(r["final_masks"] == "pasted" and "mask_sources" not in r for r in recs_p)
    calls = []
    real = P.render_item
    monkeypatch.setattr(P, "render_item", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = AugmentConfig(model=str(tiny_model), final_masks="resegment", **FAST)
    augment(scene2, out, cfg, progress=False)
    assert len(calls) == 2  # the changed option renders new items, none reused
    recs = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert {r["key"] for r in recs}.isdisjoint({r["key"] for r in recs_p})
    for r in recs:
        assert r["final_masks"] == "resegment" and isinstance(r["grabcut"], bool)
        assert sorted(r["mask_sources"]) == sorted(str(s) for s in r["subjects"])
        for s in r["subjects"]:
            src = r["mask_sources"][str(s)]
            assert src["source"] in ("resegmented", "pasted")
            assert (src["reason"] is None) == (src["source"] == "resegmented")
        assert (out / "cache" / r["key"] / "final_maps.npy").is_file()
        masks = [np.asarray(Image.open(out / f"{r['id']}_mask{s}.png")) > 0
                 for s in r["subjects"]]
        assert all(m.any() for m in masks)
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()


def test_the_masks_written_are_the_resegmented_ones(tiny_model, scene2, tmp_path, monkeypatch):
    import dynasyn.augment.resegment as R

    seen = []

    def moved(image, maps, pasted, sam=None):  # a segmentation that differs from the paste
        new = [_square(8 * k, 0, side=8) for k in range(len(pasted))]
        seen.append((pasted, new))
        return new, [{"source": "resegmented", "reason": None, "iou_pasted": 0.5}
                     for _ in pasted]

    monkeypatch.setattr(R, "resegment_masks", moved)
    cfg = AugmentConfig(model=str(tiny_model), final_masks="resegment", **dict(FAST, num_prompts=1))
    out = augment(scene2, tmp_path / "aug", cfg, progress=False)
    r = json.loads((out / "prompts.jsonl").read_text().splitlines()[0])
    (pasted, new), = seen
    for slot, s in enumerate(r["subjects"]):
        written = np.asarray(Image.open(out / f"{r['id']}_mask{s}.png")) > 0
        assert np.array_equal(written, new[slot])
        assert not np.array_equal(written, pasted[slot])


def test_the_option_is_validated_keyed_and_on_the_command_line(capsys):
    with pytest.raises(InputError, match="--final-masks must be one of pasted, resegment"):
        AugmentConfig(final_masks="sam").validate()
    item = PromptItem(template="{0} is jumping", subjects=[0], kind="action")
    keys = {f: item_key(AugmentConfig(final_masks=f), "m", "d", item, ["a"], ["b"])
            for f in ("pasted", "resegment")}
    assert keys["pasted"] != keys["resegment"]
    assert keys["pasted"] == "7475a689dfe161d3"  # the key pasted items had before the option
    # re-segmented masks differ with and without OpenCV's GrabCut: keyed apart
    import dynasyn.augment.resegment as R

    with pytest.MonkeyPatch.context() as mp:
        flipped = not R.grabcut_available()
        mp.setattr(R, "grabcut_available", lambda: flipped)
        other = item_key(AugmentConfig(final_masks="resegment"), "m", "d", item, ["a"], ["b"])
    assert other not in keys.values()
    for cmd in ("augment", "personalize"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "--final-masks {pasted,resegment}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["augment", "nowhere", "--out", "x", "--final-masks", "sam"])
    assert e.value.code == 2 and "invalid choice: 'sam'" in capsys.readouterr().err


def test_a_given_sam_model_segments_the_final_image(tiny_model, scene2, tmp_path, monkeypatch):
    from test_augment_compose import _tiny_sam

    import dynasyn.augment.resegment as R

    model, processor = _tiny_sam()
    model.save_pretrained(tmp_path / "sam")
    processor.save_pretrained(tmp_path / "sam")
    got = []
    real = R.resegment_masks
    monkeypatch.setattr(R, "resegment_masks",
                        lambda *a, sam=None, **k: got.append(sam) or real(*a, sam=sam, **k))
    cfg = AugmentConfig(model=str(tiny_model), final_masks="resegment", sam_model=str(tmp_path / "sam"),
                        **dict(FAST, num_prompts=1))  # drafts by attention, the final image by SAM
    augment(scene2, tmp_path / "aug", cfg, progress=False)
    assert len(got) == 1 and type(got[0][0]).__name__ == "SamModel"
