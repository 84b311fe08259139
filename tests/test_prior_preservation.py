"""Break-a-Scene's prior preservation: class images from the base model (cached), the prior
term in the loss and the gradient, on by default in its preset only, and off = the old step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.class_images import default_dir, ensure_class_images, load_class_images
from dynasyn.config import build_config
from dynasyn.errors import InputError
from dynasyn.losses import prior_preservation_loss
from dynasyn.models import load_pipeline
from dynasyn.presets import PRESETS
from dynasyn.sampling import step_generator, step_rng
from dynasyn.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_break_a_scene_preserves_the_prior_by_default_with_the_official_values():
    for name in PRESETS:
        cfg = build_config(name, overrides={"model": "micro"})
        assert cfg.prior_preservation == (name == "break-a-scene"), name
    cfg = build_config("break-a-scene")
    assert (cfg.prior_loss_weight, cfg.num_class_images, cfg.class_prompt) == (
        1.0, 100, "a photo at the beach")
    off = build_config("break-a-scene", overrides={"prior_preservation": "false"})
    assert not off.prior_preservation
    with pytest.raises(InputError, match="num_class_images >= 1"):
        build_config("break-a-scene", overrides={"num_class_images": 0})


def test_class_images_are_the_base_models_renders_and_are_cached(tiny_model, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("DYNASYN_CACHE", str(tmp_path / "cache"))
    pipe = load_pipeline(str(tiny_model))
    d = ensure_class_images(pipe, str(tiny_model), "a photo at the beach", 2, 64)
    assert d == default_dir(str(tiny_model), "a photo at the beach", 64)
    assert d.parent.parent == tmp_path / "cache"
    assert sorted(p.name for p in d.glob("*.png")) == ["0000.png", "0001.png"]
    # image 1 is the base pipeline's render of the class prompt from seed 1
    again = pipe("a photo at the beach", num_inference_steps=50, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(1)).images[0]
    diff = np.abs(np.asarray(Image.open(d / "0001.png"), np.int16) - np.asarray(again, np.int16))
    assert diff.max() <= 1  # batched vs single rendering: float rounding at most
    # cached: nothing is rendered again, one more image renders only that one
    calls = []
    real = type(pipe).__call__

    def counting(self, prompt, **kw):
        calls.append(len(prompt))
        return real(self, prompt, **kw)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    assert ensure_class_images(pipe, str(tiny_model), "a photo at the beach", 2, 64) == d
    assert calls == []
    ensure_class_images(pipe, str(tiny_model), "a photo at the beach", 3, 64)
    assert calls == [1]
    assert load_class_images(d, 3, 32).shape == (3, 3, 32, 32)
    with pytest.raises(InputError, match="0003.png is missing"):
        load_class_images(d, 4, 32)


def _phase2(model, scene, out, **kw):
    cfg = build_config("break-a-scene", overrides=dict(
        model=str(model), scene=str(scene), phase1_steps=1, phase2_steps=1, num_class_images=2,
        **kw))
    tr = Trainer(cfg, out, progress=False)
    tr.keep_original_rows()
    tr._setup_phase(2)
    return tr


def test_prior_term_is_in_the_loss_and_the_gradient(tiny_model, scene2, tmp_path):
    classes = tmp_path / "classes"
    on = _phase2(tiny_model, scene2, tmp_path / "on", class_data_dir=str(classes))
    off = _phase2(tiny_model, scene2, tmp_path / "off", prior_preservation=False)
    assert len(on.class_latents) == 2 and len(list(classes.glob("*.png"))) == 2
    assert off.class_latents == [] and off.class_dir is None
    logs_on, logs_off = on.compute_gradients(0), off.compute_gradients(0)
    # off is the step without the term: the same draws, the same scene losses
    assert set(logs_off) == {"md", "m2a", "loss"} and set(logs_on) == {"md", "m2a", "prior", "loss"}
    assert logs_on["md"] == logs_off["md"] and logs_on["m2a"] == logs_off["m2a"]
    assert logs_on["loss"] == pytest.approx(logs_off["loss"] + logs_on["prior"], rel=1e-6)

    # the prior term recomputed here: the class image drawn after the scene batch, the class
    # prompt through the model being trained, unmasked MSE; its gradient is the difference
    rng, gen = step_rng(0, 0), step_generator(0, 0)
    off.scene_batch(rng, gen)
    j = rng.randrange(2)
    z, t, target = off._noisy(on.class_latents[j], gen)
    ids = off.tokenizer("a photo at the beach", padding="max_length",
                        max_length=off.tokenizer.model_max_length, return_tensors="pt").input_ids
    pred = off.unet(z, t, off.text_encoder(ids)[0]).sample
    ref = prior_preservation_loss(pred, target)
    assert logs_on["prior"] == pytest.approx(float(ref.detach()), rel=1e-5)
    assert any(not torch.allclose(a.grad, b.grad) for a, b in zip(on.params, off.params,
                                                                  strict=True))
    ref.backward()  # off's gradients + the recomputed prior term's = on's
    for p_on, p_off in zip(on.params, off.params, strict=True):
        assert torch.allclose(p_on.grad, p_off.grad, rtol=1e-4, atol=1e-8)


def test_phase1_and_off_render_no_class_images(tiny_model, scene2, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNASYN_CACHE", str(tmp_path / "cache"))
    cfg = build_config("break-a-scene", overrides=dict(
        model=str(tiny_model), scene=str(scene2), phase1_steps=1, phase2_steps=0))
    tr = Trainer(cfg, tmp_path / "run", progress=False)  # phase 1 only: the term is zero
    assert tr.class_dir is None and not (tmp_path / "cache").exists()
