"""Step 3 pseudo masks (attention / SAM) and Step 4 compose + inpaint + contact sheet."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.augment import masks as masks_mod
from dynasyn.augment.compose import (
    compose,
    contact_sheet,
    contact_sheet_size,
    cut_subject,
    fit_size,
    inpaint,
    inpaint_cv2,
    inpaint_diffuse,
    paste_into_box,
)
from dynasyn.augment.masks import (
    attention_masks,
    attention_prompts,
    box_of,
    peak_points,
    sam_masks,
)
from dynasyn.errors import InputError
from dynasyn.imageops import dilate, label_components


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def disk(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r


def flat_blob(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A flat-topped Gaussian-like blob (super-Gaussian, order 8) whose half level is r."""
    yy, xx = np.mgrid[0:size, 0:size]
    d2 = ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (r * r)
    return 1.0 / (1.0 + d2**4)


def ellipse_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0


# ----------------------------------------------------------------------------- small tools


def test_box_of_and_peaks():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert box_of(m) == (3, 2, 9, 5)
    with pytest.raises(ValueError):
        box_of(np.zeros((4, 4), bool))
    a = np.zeros((16, 16))
    a[3, 4] = 1.0
    a[12, 10] = 0.8
    a[3, 5] = 0.9  # next to the first peak: suppressed
    assert peak_points(a, 2) == [(4.0, 3.0), (10.0, 12.0)]
    assert peak_points(a, 1, size=64) == [(18.0, 14.0)]


# ----------------------------------------------------------------------------- attention masks


def test_attention_masks_recover_blobs_and_resolve_overlaps():
    h, size, f = 16, 64, 4
    spec = [(5.0, 5.0, 3.0), (11.0, 10.5, 3.5)]
    maps = np.stack([flat_blob(h, cx, cy, r) for cx, cy, r in spec]) * np.array([[[0.3]], [[2.0]]])
    got = attention_masks(torch.tensor(maps, dtype=torch.float32), size)
    assert len(got) == 2
    for m, (cx, cy, r) in zip(got, spec, strict=True):
        assert m.shape == (size, size) and m.dtype == bool
        assert iou(m, disk(size, cx * f, cy * f, r * f)) > 0.8
    # two overlapping blobs: disjoint masks, each pixel to the higher normalized attention
    ov = np.stack([flat_blob(h, 7, 8, 4), flat_blob(h, 10, 8, 4)])
    a, b = attention_masks(ov, size, threshold=0.3)
    assert not (a & b).any() and a.any() and b.any()
    assert a[32, 16] and b[32, 48]
    xs_a, xs_b = np.nonzero(a)[1], np.nonzero(b)[1]
    assert xs_a.mean() < xs_b.mean()


def test_attention_masks_largest_component_and_never_empty():
    h, size = 16, 48
    big_small = flat_blob(h, 5, 5, 3.5) + flat_blob(h, 13, 13, 1.2)
    zero = np.zeros((h, h))
    swallowed = flat_blob(h, 5, 5, 2.0) * 0.5  # fully inside subject 0's stronger blob
    got = attention_masks(np.stack([big_small, zero, swallowed]), size, threshold=0.5)
    assert got[0][15, 15] and not got[0][39, 39]  # the small far blob is dropped
    assert label_components(got[0])[1] == 1
    for m in got:
        assert m.any()
    assert got[1].sum() == round(0.02 * size * size)
    assert not (got[1] & got[0]).any()


def test_attention_masks_fill_holes_and_grabcut_warning(monkeypatch, caplog):
    size = 32
    ring = disk(size, 16, 16, 12).astype(float) - disk(size, 16, 16, 4)
    (m,) = attention_masks(ring[None], size, threshold=0.5, clean=False)
    assert m[16, 16] and m.sum() == disk(size, 16, 16, 12).sum()
    monkeypatch.setitem(sys.modules, "cv2", None)  # make `import cv2` fail
    monkeypatch.setattr(masks_mod, "_cv2_warned", False)
    img = np.zeros((size, size, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="dynasyn.augment.masks"):
        a = attention_masks(ring[None], size, 0.5, grabcut_image=img)
        attention_masks(ring[None], size, 0.5, grabcut_image=img)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "OpenCV" in caplog.records[0].getMessage()
    assert np.array_equal(a[0], attention_masks(ring[None], size, 0.5)[0])
    with pytest.raises(InputError):
        attention_masks(ring[None], size, threshold="mean")


def test_attention_masks_grabcut_with_cv2():
    pytest.importorskip("cv2")
    size = 48
    img = np.full((size, size, 3), 30, np.uint8)
    truth = disk(size, 24, 24, 12)
    img[truth] = (220, 60, 40)
    amap = flat_blob(12, 6, 6, 2.5)  # attention a bit smaller than the subject
    (m,) = attention_masks(amap[None], size, grabcut_image=img)
    assert iou(m, truth) > 0.9


# ----------------------------------------------------------------------------- compose


def test_paste_into_box_geometry():
    sub = ellipse_mask(20, 30)  # h=20, w=30
    scene = Image.new("RGB", (40, 30), (10, 200, 10))
    full = np.zeros((30, 40), bool)
    full[5:25, 4:34] = sub
    rgba, cm = cut_subject(scene, full)
    assert rgba.size == (30, 20) and rgba.mode == "RGBA" and np.array_equal(cm, sub)
    canvas = Image.new("RGB", (64, 64), (0, 0, 0))
    box = (10, 12, 50, 52)  # 40 x 40: s = min(40/30, 40/20) = 4/3 -> 40 x 27
    assert fit_size(rgba.size, box) == (40, 27)
    out, pm = paste_into_box(canvas, rgba, cm, box)
    x0, y0, x1, y1 = box_of(pm)
    assert box[0] <= x0 and box[1] <= y0 and x1 <= box[2] and y1 <= box[3]
    assert (x1 - x0, y1 - y0) == (40, 27) or abs((x1 - x0) / (y1 - y0) - 1.5) < 0.1
    expected = sub.sum() * (40 / 30) * (27 / 20)
    assert abs(pm.sum() - expected) / expected < 0.03
    assert abs((y0 + y1) / 2 - (box[1] + box[3]) / 2) <= 1  # centred
    px = np.asarray(out)
    assert (px[pm] == (10, 200, 10)).all() and (px[~pm] == 0).all()
    assert np.asarray(canvas).max() == 0  # the input canvas is untouched
    _, pb = paste_into_box(canvas, rgba, cm, box, anchor="bottom")
    assert box_of(pb)[3] == box[3]
    _, ps = paste_into_box(canvas, rgba, cm, box, keep_aspect=False)
    assert box_of(ps) == box
    # a box hanging over the canvas edge is clipped
    _, pc = paste_into_box(canvas, rgba, cm, (40, 40, 80, 80))
    assert pc.shape == (64, 64) and pc.any()


def _scene_two() -> tuple[Image.Image, list[np.ndarray]]:
    arr = np.full((40, 40, 3), 128, np.uint8)
    m0 = np.zeros((40, 40), bool)
    m0[4:20, 4:20] = True
    m1 = np.zeros((40, 40), bool)
    m1[24:36, 20:38] = True
    arr[m0] = (255, 0, 0)
    arr[m1] = (0, 0, 255)
    return Image.fromarray(arr), [m0, m1]


def test_compose_occlusion_and_gaps():
    scene, smasks = _scene_two()
    draft = Image.new("RGB", (64, 64), (0, 255, 0))
    d0 = disk(64, 24, 30, 16)  # box 32 x 32, round: its corners are not covered by a square
    d1 = np.zeros((64, 64), bool)
    d1[28:44, 28:58] = True  # box 30 x 16 (subject fits as 24 x 16), overlaps d0's box
    res = compose(draft, [d0, d1], scene, smasks)
    assert res.order == [0, 1]  # larger target box first
    p0, p1 = res.pasted_masks
    assert not (p0 & p1).any()
    _, full1 = paste_into_box(draft, *cut_subject(scene, smasks[1]), box_of(d1))
    assert np.array_equal(p1, full1)
    _, full0 = paste_into_box(draft, *cut_subject(scene, smasks[0]), box_of(d0))
    assert np.array_equal(p0, full0 & ~full1)  # subject 0 occluded by the later paste
    px = np.asarray(res.image)
    assert (px[p0] == (255, 0, 0)).all() and (px[p1] == (0, 0, 255)).all()
    uncovered = (d0 | d1) & ~(p0 | p1)
    assert uncovered.any()
    assert np.array_equal(res.gap_mask, dilate(uncovered, 2))
    # the given order puts subject 0 on top
    res2 = compose(draft, [d0, d1], scene, smasks, order=[1, 0])
    assert np.array_equal(res2.pasted_masks[0], full0)
    assert np.array_equal(res2.pasted_masks[1], full1 & ~full0)
    assert np.array_equal(compose(draft, [d0, d1], scene, smasks, gap_dilate=0).gap_mask, uncovered)
    with pytest.raises(InputError):
        compose(draft, [d0], scene, smasks)


# ----------------------------------------------------------------------------- inpainting


def test_inpaint_diffuse_constant_and_ramp():
    img = Image.new("RGB", (40, 30), (37, 120, 250))
    hole = np.zeros((30, 40), bool)
    hole[5:25, 8:30] = True
    out = np.asarray(inpaint_diffuse(img, hole))
    assert (out == (37, 120, 250)).all()
    ramp = np.zeros((30, 40, 3), np.uint8)
    ramp[..., 0] = np.arange(40)[None, :] * 5
    ramp[..., 1] = np.arange(30)[:, None] * 6
    damaged = ramp.copy()
    damaged[hole] = 0
    out = np.asarray(inpaint_diffuse(Image.fromarray(damaged), hole)).astype(int)
    assert np.abs(out - ramp.astype(int))[hole].max() <= 3
    assert np.array_equal(out[~hole], ramp[~hole])


def test_inpaint_cv2_missing_and_present(monkeypatch):
    img = Image.new("RGB", (24, 24), (90, 90, 90))
    hole = disk(24, 12, 12, 5)
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "cv2", None)
        with pytest.raises(InputError, match="opencv-python-headless"):
            inpaint_cv2(img, hole)
        assert np.asarray(inpaint(img, hole)).std() == 0  # auto falls back to diffusion
    pytest.importorskip("cv2")
    out = np.asarray(inpaint_cv2(img, hole))
    assert np.abs(out.astype(int) - 90).max() <= 3  # Telea rounds a little


# ----------------------------------------------------------------------------- contact sheet


def test_contact_sheet_size_and_outlines():
    a = Image.new("RGB", (32, 32), (0, 0, 0))
    b = Image.new("RGB", (40, 24), (0, 0, 0))
    m = np.zeros((32, 32), bool)
    m[8:20, 8:20] = True
    sheet = contact_sheet([("draft", a, [m]), ("composed", b, None), ("final", a, [m, ~m])])
    assert sheet.size == contact_sheet_size([(32, 32), (40, 24), (32, 32)], 2)
    assert sheet.size == (4 + 64 + 4 + 80 + 4 + 64 + 4, 4 + 14 + 64 + 4)
    px = np.asarray(sheet)
    assert (px == (255, 48, 48)).all(axis=-1).any()  # subject 0's outline colour is drawn
    assert (px == (48, 220, 48)).all(axis=-1).any()


# ----------------------------------------------------------------------------- SAM (tiny)


def _tiny_sam():
    transformers = pytest.importorskip("transformers")
    from transformers.models.sam import SamImageProcessorPil

    torch.manual_seed(0)
    side = 64
    cfg = transformers.SamConfig(
        vision_config=dict(
            hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
            image_size=side, patch_size=8, window_size=4, global_attn_indexes=(1,),
            num_pos_feats=8, mlp_dim=64,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=side, patch_size=8,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2, iou_head_hidden_dim=16),
    )
    model = transformers.SamModel(cfg).eval()
    ip = SamImageProcessorPil(
        size={"longest_edge": side}, pad_size={"height": side, "width": side},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16},
    )
    return model, transformers.SamProcessor(image_processor=ip)


def test_sam_masks_tiny_model():
    model, processor = _tiny_sam()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    amaps = np.stack([flat_blob(12, 3, 5, 2), flat_blob(12, 9, 6, 2)])
    am = [np.asarray(Image.fromarray(m).resize((80, 48), Image.NEAREST))
          for m in attention_masks(amaps, 48)]
    prompts = attention_prompts(am, amaps, k=2)
    assert len(prompts[0]["points"]) == 2 and len(prompts[0]["box"]) == 4
    for given in (prompts, [p["box"] for p in prompts], [p["points"] for p in prompts]):
        got = sam_masks(image, given, model, processor, fallback=am)
        assert len(got) == 2
        for m in got:
            assert m.shape == (48, 80) and m.dtype == bool and m.any()
        assert not (got[0] & got[1]).any()
