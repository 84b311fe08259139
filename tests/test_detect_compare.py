"""Detect-and-Compare: approximate identity mixing on photos (MuDI's idea), in `evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.evaluate.detect_compare import (
    detect_compare,
    detect_compare_block,
    detect_compare_summary,
)
from dynasyn.evaluate.metrics import ClipScorer, subject_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _subject(colour, pattern, size=64):
    img = np.full((size, size, 3), 128, np.uint8)
    img[16:48, 16:48] = colour
    img[24:32, 20:44] = pattern
    mask = np.zeros((size, size), np.float32)
    mask[16:48, 16:48] = 1
    return Image.fromarray(img), mask


def test_a_crop_identical_to_reference_0_is_own_for_0_and_mixing_for_1(tiny_clip):
    scorer = ClipScorer.from_name(tiny_clip)
    refs = [subject_reference(*_subject((220, 40, 40), (20, 20, 200))),
            subject_reference(*_subject((40, 200, 60), (250, 250, 250)))]
    ref_e = scorer.image_embeds(refs)
    crop_e = scorer.image_embeds([refs[0]])  # the generated crop is reference 0 itself
    own, = detect_compare(crop_e, ref_e, [0])
    assert own["own"] == pytest.approx(1.0, abs=1e-5) and own["closest"] == 0
    assert own["score"] > 0 and not own["mixing"]
    mixed, = detect_compare(crop_e, ref_e, [1])  # the same crop, labelled subject 1
    assert mixed["closest"] == 0 and mixed["mixing"] and mixed["score"] < 0
    assert mixed["score"] == pytest.approx(-own["score"], abs=1e-5)


def test_scores_are_own_minus_the_best_other_reference():
    refs = torch.eye(3)
    crops = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    a, b = detect_compare(crops, refs, [0, 2])
    assert (a["own"], a["other"], a["closest"]) == (0.6, 0.8, 1)
    assert a["score"] == pytest.approx(-0.2) and a["mixing"]
    assert (b["own"], b["other"]) == (0.8, 0.6) and b["score"] == pytest.approx(0.2)
    assert not b["mixing"]
    with pytest.raises(ValueError, match="two reference"):
        detect_compare(crops[:1], refs[:1], [0])
    with pytest.raises(ValueError, match="2 crops for 1"):
        detect_compare(crops, refs, [0])
    summary = detect_compare_summary([a, b])
    assert summary["mixing"]["k"] == 1 and summary["mixing"]["n"] == 2
    assert summary["mixing"]["rate"] == 0.5 and summary["score"]["mean"] == pytest.approx(0.0)
    block = detect_compare_block(
        [{"category": "plain", "detect_compare": {"clip": [[a]]}},
         {"category": "action", "detect_compare": {"clip": [[b], [a]]}}], ["clip"])
    assert block["approximate"] is True and list(block["categories"]) == ["plain", "action"]
    assert block["categories"]["plain"]["clip"]["mixing"]["rate"] == 1.0
    assert block["categories"]["action"]["clip"]["mixing"]["n"] == 2
    assert block["overall"]["clip"]["mixing"] == {"k": 2, "n": 3, "rate": pytest.approx(2 / 3),
                                                  "ci95": block["overall"]["clip"]["mixing"]["ci95"]}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    from dynasyn.config import build_config
    from dynasyn.tiny import synthetic_scene
    from dynasyn.train import train

    root = tmp_path_factory.mktemp("dcrun")
    scene = synthetic_scene(root / "scene", 2)
    cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(scene),
                                                 phase1_steps=1, phase2_steps=1, log_every=1))
    train(cfg, root / "run", progress=False)
    return root / "run"


def test_evaluate_reports_detect_compare_per_category(trained_run, tiny_clip, tmp_path):
    from dynasyn.evaluate import evaluate
    from dynasyn.evaluate.report import summary_table

    out = tmp_path / "ev"
    res = evaluate(trained_run, categories="plain,interaction", n=1, steps=1, limit=1,
                   clip_model=str(tiny_clip), out=out, device="cpu", progress=False)
    data = json.loads((out / "metrics.json").read_text())
    dc = data["detect_compare"]
    assert dc == res["detect_compare"] and dc["approximate"] and dc["embeddings"] == ["clip"]
    assert list(dc["categories"]) == ["plain", "interaction"]
    assert dc["categories"]["plain"]["clip"]["mixing"]["n"] == 1
    assert dc["categories"]["interaction"]["clip"]["mixing"]["n"] == 2
    assert dc["overall"]["clip"]["mixing"]["n"] == 3
    for p in data["prompts"]:
        (slots,) = p["detect_compare"]["clip"]
        assert [s["subject"] for s in slots] == p["subjects"]
        for s in slots:
            assert s["score"] == pytest.approx(s["own"] - s["other"], abs=1e-5)
            assert s["mixing"] == (s["other"] > s["own"]) and isinstance(s["region"], bool)
    html = (out / "report.html").read_text()
    assert "Detect-and-Compare" in html and "mixing [95 % CI]" in html
    assert "detect-and-compare" in summary_table(data)


def test_with_a_dino_model_detect_compare_also_uses_dino(trained_run, tiny_clip, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from dynasyn.evaluate import evaluate

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=37)).save_pretrained(
        tmp_path / "dino")
    res = evaluate(trained_run, categories="interaction", n=1, steps=1, limit=1,
                   clip_model=str(tiny_clip), dino_model=tmp_path / "dino", out=tmp_path / "ev",
                   device="cpu", progress=False)
    dc = res["detect_compare"]
    assert dc["embeddings"] == ["clip", "dino"]
    assert dc["overall"]["dino"]["mixing"]["n"] == dc["overall"]["clip"]["mixing"]["n"] == 2
    (p,) = res["prompts"]
    clip_slots, dino_slots = p["detect_compare"]["clip"][0], p["detect_compare"]["dino"][0]
    assert [s["subject"] for s in dino_slots] == p["subjects"]
    assert [s["own"] for s in dino_slots] != [s["own"] for s in clip_slots]


def test_one_subject_runs_skip_detect_compare_with_a_note(tiny_model, tiny_clip, tmp_path):
    from dynasyn.config import build_config
    from dynasyn.evaluate import evaluate
    from dynasyn.tiny import synthetic_scene
    from dynasyn.train import train

    scene = synthetic_scene(tmp_path / "scene", 1)
    cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(scene),
                                                 phase1_steps=1, phase2_steps=1, log_every=1))
    train(cfg, tmp_path / "run", progress=False)
    res = evaluate(tmp_path / "run", categories="plain", n=1, steps=1, limit=1,
                   clip_model=str(tiny_clip), out=tmp_path / "ev", device="cpu", progress=False)
    assert "detect_compare" not in res
    assert any(n.startswith("Detect-and-Compare skipped") for n in res["notes"])
