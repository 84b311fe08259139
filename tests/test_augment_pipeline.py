"""`dynasyn augment` end to end on a tiny model: every provider choice, cache/resume, real scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dynasyn.augment.pipeline as P
from dynasyn.augment.data import load_augmented
from dynasyn.augment.pipeline import AugmentConfig, augment
from dynasyn.cli import main
from dynasyn.errors import InputError

FAST = dict(draft_steps=2, gsa_steps=4, num_prompts=2)


def _check_dir(out: Path, n_subjects: int) -> list[dict]:
    recs = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    for r in recs:
        for k in ("template", "subjects", "phrase_prompt", "class_prompt", "placeholder_prompt",
                  "seed", "draft", "composed", "sheet"):
            assert k in r, k
        assert "<asset" in r["placeholder_prompt"] and "<asset" not in r["class_prompt"]
        for s in r["subjects"]:
            m = np.asarray(Image.open(out / f"{r['id']}_mask{s}.png"))
            assert m.any(), "final masks are never empty"
        assert (out / r["sheet"]).is_file() and (out / r["draft"]).is_file()
    items = load_augmented(out, n_subjects, 64)  # the trainer's reader accepts it
    assert len(items) == len(recs)
    return recs


@pytest.mark.parametrize("scene_name", ["bear", "creature", "toys"])
def test_real_scenes_give_complete_directories(scene_name, tiny_model, bear, tmp_path):
    scene = bear.parent / scene_name
    out = augment(scene, tmp_path / "aug", AugmentConfig(model=str(tiny_model), **FAST),
                  progress=False)
    recs = _check_dir(out, 3)
    assert len(recs) == 2


def test_cache_resume_and_unchanged_rerun(tiny_model, scene2, tmp_path, monkeypatch):
    cfg = AugmentConfig(model=str(tiny_model), **dict(FAST, num_prompts=3))
    calls = []
    real = P.render_item
    monkeypatch.setattr(P, "render_item", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = augment(scene2, tmp_path / "aug", cfg, progress=False)
    assert len(calls) == 3
    before = (out / "prompts.jsonl").read_text()
    # unchanged rerun: no model work at all (not even loading)
    monkeypatch.setattr("dynasyn.models.load_pipeline",
                        lambda *a, **k: pytest.fail("model loaded on an unchanged rerun"))
    augment(scene2, out, cfg, progress=False)
    assert len(calls) == 3 and (out / "prompts.jsonl").read_text() == before
    # a run killed midway: one cached item missing → only that one is rendered again
    monkeypatch.undo()
    monkeypatch.setattr(P, "render_item", lambda *a, **k: calls.append(1) or real(*a, **k))
    key = json.loads(before.splitlines()[1])["key"]
    import shutil

    shutil.rmtree(out / "cache" / key)
    augment(scene2, out, cfg, progress=False)
    assert len(calls) == 4 and (out / "prompts.jsonl").read_text() == before


def test_cv2_inpainter_and_sam_segmenter(tiny_model, scene2, tmp_path):
    pytest.importorskip("cv2")
    from test_augment_compose import _tiny_sam

    model, processor = _tiny_sam()
    sam_dir = tmp_path / "sam"
    model.save_pretrained(sam_dir)
    processor.save_pretrained(sam_dir)
    cfg = AugmentConfig(model=str(tiny_model), inpainter="cv2", segmenter="sam",
                        sam_model=str(sam_dir), **FAST)
    _check_dir(augment(scene2, tmp_path / "aug", cfg, progress=False), 2)


def test_sd_inpaint_checkpoint(tiny_model, scene2, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from dynasyn.tiny import tiny_pipeline

    base = tiny_pipeline()
    cfg9 = dict(base.unet.config)
    cfg9["in_channels"] = 9
    unet9 = UNet2DConditionModel.from_config(cfg9)
    comps = dict(base.components, unet=unet9, safety_checker=None, feature_extractor=None)
    comps.pop("image_encoder", None)
    StableDiffusionInpaintPipeline(**comps, requires_safety_checker=False).save_pretrained(
        tmp_path / "inpaint")
    cfg = AugmentConfig(model=str(tiny_model), inpainter="sd-inpaint",
                        inpaint_model=str(tmp_path / "inpaint"), **FAST)
    _check_dir(augment(scene2, tmp_path / "aug", cfg, progress=False), 2)


def test_bad_augment_options(tiny_model, scene2, tmp_path, capsys):
    with pytest.raises(InputError, match="--sam-model"):
        AugmentConfig(segmenter="sam").validate()
    assert main(["augment", str(scene2), "--model", str(tiny_model), "--out",
                 str(tmp_path / "a"), "--strength", "1.5"]) == 2
    assert "--strength" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_personalize_trains_with_the_augmented_items(tiny_model, scene2, tmp_path):
    run = tmp_path / "run"
    assert main(["personalize", str(scene2), "--model", str(tiny_model), "--out", str(run),
                 "--num-prompts", "2", "--draft-steps", "2", "--gsa-steps", "4",
                 "--phase1-steps", "1", "--phase2-steps", "1", "--no-progress"]) == 0
    logs = [json.loads(x) for x in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    assert all("aug" in r for r in logs)
    assert (run / "augmented" / "prompts.jsonl").is_file() and (run / "run.json").is_file()


def test_two_processes_split_the_items(tiny_model, scene2, tmp_path, monkeypatch):
    import subprocess
    import sys

    out = tmp_path / "aug"
    worker = Path(__file__).with_name("mp_augment_worker.py")
    r = subprocess.run([sys.executable, str(worker), str(tiny_model), str(scene2), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _check_dir(out, 2)
    assert len(recs) == 4
    a, b = (json.loads((out / f"proc{i}.json").read_text()) for i in (0, 1))
    assert len(a) == len(b) == 2 and sorted(a + b) == sorted(r["template"] for r in recs)
    # the same inputs in one process find every item cached (identical keys, no model work)
    calls = []
    monkeypatch.setattr(P, "render_item", lambda *a, **k: calls.append(1))
    augment(scene2, out, AugmentConfig(model=str(tiny_model), num_prompts=4, draft_steps=2,
                                       gsa_steps=4), progress=False)
    assert calls == []
