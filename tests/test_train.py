"""The two-phase trainer on a tiny pipeline: what changes, what stays bit-identical, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from dynasyn.augment.data import write_item
from dynasyn.config import build_config
from dynasyn.errors import InputError, TrainingError
from dynasyn.presets import PRESETS
from dynasyn.sampling import step_generator, step_rng
from dynasyn.tiny import synthetic_scene
from dynasyn.train import Trainer, train


def _cfg(model, scene, preset="dynasyn", **kw):
    base = dict(model=str(model), scene=str(scene), phase1_steps=2, phase2_steps=2,
                num_class_images=2)  # break-a-scene's prior preservation: 2, not 100
    base.update(kw)
    return build_config(preset, overrides=base)


def _base(model):
    pipe = StableDiffusionPipeline.from_pretrained(model)
    return pipe


def _same_state(a: torch.nn.Module, b: torch.nn.Module, skip: str | None = None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if skip is None or skip not in k)


def _phase2_gradients(cfg, out, steps=2):
    tr = Trainer(cfg, out, progress=False)
    tr.keep_original_rows()
    tr._setup_phase(2)
    for s in range(steps):
        tr.optimizer.zero_grad(set_to_none=True)
        logs = tr.compute_gradients(s)
    return tr, logs, {i: p.grad.clone() for i, p in enumerate(tr.params) if p.grad is not None}


def test_bf16_run_stores_an_exact_half_precision_prior(tiny_model, scene2, tmp_path):
    """Under bf16 mixed precision the frozen prior is kept in bf16 (auto) and changes nothing:
    same losses and gradients as the straightforward full fp32 copies."""
    aug = _augmented(tmp_path / "aug", n=2)
    out = []
    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state
    try:
        for efficient in (True, False):
            cfg = _cfg(tiny_model, scene2, augmented=aug, efficient=efficient, lambda_aug=0.1,
                       mixed_precision="bf16")
            out.append(_phase2_gradients(cfg, tmp_path / f"run{efficient}"))
    finally:  # the other tests run in fp32
        AcceleratorState._reset_state(reset_partial_state=True)
    (tr, logs, grads), (naive, nlogs, ngrads) = out
    assert tr.prior_unet.conv_in.weight.dtype == torch.bfloat16
    assert tr.prior_unet.conv_norm_out.weight.dtype == torch.float32
    assert naive.prior_unet.conv_in.weight.dtype == torch.float32
    assert set(logs) == {"md", "m2a", "ica", "aug", "loss"}
    for k in logs:
        assert logs[k] == pytest.approx(nlogs[k], rel=1e-5, abs=1e-8), k
    assert grads.keys() == ngrads.keys() and grads
    for i in grads:
        assert torch.allclose(grads[i], ngrads[i], rtol=1e-3, atol=1e-6), i


def test_prior_dtype_under_fp32_halves_the_prior_and_stays_close(tiny_model, scene2, tmp_path):
    aug = _augmented(tmp_path / "aug", n=2)
    runs = {}
    for dt in ("float32", "bfloat16"):
        cfg = _cfg(tiny_model, scene2, augmented=aug, lambda_aug=0.1, prior_dtype=dt)
        runs[dt] = _phase2_gradients(cfg, tmp_path / dt, steps=1)
    size = {dt: sum(p.numel() * p.element_size() for p in r[0].prior_unet.parameters())
            for dt, r in runs.items()}
    assert size["bfloat16"] < 0.55 * size["float32"]
    a, b = runs["float32"][1], runs["bfloat16"][1]
    assert a["md"] == b["md"] and a["m2a"] == b["m2a"]  # the trained passes are untouched
    assert a["ica"] != b["ica"] and b["ica"] == pytest.approx(a["ica"], rel=0.05)
    with pytest.raises(InputError, match="prior_dtype must be one of"):
        _cfg(tiny_model, scene2, prior_dtype="half")


def test_joint_prior_pass_equals_one_pass_each(tiny_model, scene2, tmp_path):
    cfg = _cfg(tiny_model, scene2, augmented=_augmented(tmp_path / "aug", n=2), lambda_aug=0.1)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr._setup_phase(2)
    rng, gen = step_rng(0, 5, 0), step_generator(0, 5, 0)
    batch, aug = tr.scene_batch(rng, gen), tr.aug_batch(rng, gen)
    joint = tr.joint_prior_maps([batch, aug])
    for m, b in zip(joint, (batch, aug), strict=True):
        alone = tr.prior_maps(b["z"], b["t"], b["cl"], b["k"])
        assert m.shape == alone.shape
        assert torch.allclose(m, alone, atol=1e-6)


def test_phase1_changes_only_placeholder_rows(tiny_model, scene2, tmp_path):
    tr = train(_cfg(tiny_model, scene2, phase2_steps=0, phase1_steps=3), tmp_path / "run",
               progress=False)
    base = _base(tiny_model)
    emb = tr.text_encoder.get_input_embeddings().weight
    base_emb = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb[:49408], base_emb)  # every other row bit-identical
    assert _same_state(tr.unet, base.unet) and _same_state(tr.vae, base.vae)
    assert _same_state(tr.text_encoder, base.text_encoder, skip="token_embedding")
    init = torch.stack([base_emb[tr.tokenizer(c, add_special_tokens=False).input_ids].mean(0)
                        for c in tr.classes])
    assert not torch.equal(emb[49408:], init)  # the placeholders did learn
    saved = load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))
    assert list(saved) == ["<asset0>", "<asset1>"]
    assert torch.equal(saved["<asset1>"], emb[49409])


def _render(pipe, prompt="a photo of <asset0> and <asset1>"):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="np").images


def test_full_mode_outputs_reload_with_stock_diffusers_calls(tiny_model, scene2, tmp_path):
    run = tmp_path / "run"
    tr = train(_cfg(tiny_model, scene2, prior_model="frozen"), run, progress=False)
    base = _base(tiny_model)
    assert not _same_state(tr.unet, base.unet)
    assert _same_state(tr.vae, base.vae)
    assert torch.equal(tr.text_encoder.get_input_embeddings().weight[:49408],
                       base.text_encoder.get_input_embeddings().weight)
    assert _same_state(tr.prior_unet, base.unet)  # the ICA prior stayed frozen
    expected = _render(tr.pipeline())
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model,
        unet=UNet2DConditionModel.from_pretrained(run / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(run / "text_encoder"),
    )
    sd = load_file(str(run / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(list(sd.values()), token=list(sd.keys()))
    assert np.array_equal(_render(pipe), expected)
    info = json.loads((run / "run.json").read_text())
    assert info["mode"] == "full" and info["placeholders"] == ["<asset0>", "<asset1>"]


def test_multi_vector_phrase_placeholders_train_save_and_reload(tiny_model, tmp_path):
    scene = synthetic_scene(tmp_path / "scene", 2)
    meta = json.loads((scene / "scene.json").read_text())
    meta["subjects"][0]["phrase"] = "red striped panda"
    (scene / "scene.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    cfg = _cfg(tiny_model, scene, placeholder_vectors=0, placeholder_init="phrase",
               phase2_steps=0)
    tr = train(cfg, run, progress=False)
    sd = load_file(str(run / "learned_embeds.safetensors"))
    assert sd["<asset0>"].shape == (3, 32) and sd["<asset1>"].shape == (32,)
    base = _base(tiny_model).text_encoder.get_input_embeddings().weight
    ids0 = tr.tokenizer("striped", add_special_tokens=False).input_ids
    assert not torch.equal(sd["<asset0>"][1], base[ids0].mean(0))  # trained away from its init
    expected = _render(tr.pipeline())
    pipe = _base(tiny_model)
    pipe.load_textual_inversion(list(sd.values()), token=list(sd.keys()))
    assert np.array_equal(_render(pipe), expected)


def test_lora_mode_outputs_reload_with_load_lora_weights(tiny_model, scene2, tmp_path):
    run = tmp_path / "run"
    tr = train(_cfg(tiny_model, scene2, lora_rank=4, lora_lr=1e-2), run, progress=False)
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert not (run / "unet").exists()
    expected = _render(tr.pipeline())
    pipe = _base(tiny_model)
    without = _render(pipe.__class__.from_pretrained(tiny_model), "a photo of a panda")
    pipe.load_lora_weights(str(run))
    sd = load_file(str(run / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(list(sd.values()), token=list(sd.keys()))
    assert np.array_equal(_render(pipe), expected)
    assert not np.array_equal(_render(pipe, "a photo of a panda"), without)  # adapters act


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_a_four_subject_scene(preset, tiny_model, scene4, tmp_path):
    steps = dict(phase1_steps=1, phase2_steps=1)
    if preset == "dreambooth":
        steps = dict(phase1_steps=0, phase2_steps=2)
    if preset == "textual-inversion":
        steps = dict(phase1_steps=2, phase2_steps=0)
    aug = _augmented(tmp_path / "aug", n=4) if PRESETS[preset]["lambda_aug"] > 0 else None
    tr = train(_cfg(tiny_model, scene4, preset, augmented=aug, **steps), tmp_path / "run",
               progress=False)
    logs = [json.loads(x) for x in (tmp_path / "run/logs/losses.jsonl").read_text().splitlines()]
    keys = set().union(*logs)
    lam = PRESETS[preset]
    for term in ("md", "m2a", "ica", "aug"):
        assert (term in keys) == (lam[f"lambda_{term}"] > 0), term
    assert tr.n == 4 and (tmp_path / "run/run.json").is_file()


def _augmented(root, n=2):
    rng = np.random.default_rng(1)
    for j, (tpl, subjects) in enumerate([("{0} is throwing the {1}", [0, 1]),
                                          ("{0} is jumping", [n - 1])]):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        masks = []
        for k in range(len(subjects)):
            m = np.zeros((64, 64))
            m[8 + 24 * k : 30 + 24 * k, 10:40] = 1
            masks.append(m)
        write_item(root, f"{j:04d}", img, masks, {
            "template": tpl, "subjects": subjects, "seed": j,
            "phrase_prompt": tpl, "class_prompt": tpl, "placeholder_prompt": tpl})
    return str(root)


def test_aug_loss_alone_trains_placeholders_from_augmented_items(tiny_model, scene2, tmp_path):
    aug = _augmented(tmp_path / "aug")
    cfg = _cfg(tiny_model, scene2, phase1_steps=2, phase2_steps=0, lambda_md=0.0,
               lambda_m2a=0.0, lambda_ica=0.0, lambda_aug=1.0, augmented=aug)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert len(tr.aug) == 2 and tr.aug[0].masks.shape == (2, 64, 64)
    tr.keep_original_rows()
    tr._setup_phase(1)
    before = tr.embedding[49408:].detach().clone()
    logs = tr.step(0)
    assert logs["aug"] > 0 and "md" not in logs and "m2a" not in logs
    assert not torch.equal(tr.embedding[49408:], before)


def test_sd21_layout_v_prediction_trains_against_velocity(tiny_vpred_model, scene2, tmp_path):
    tr = train(_cfg(tiny_vpred_model, scene2, phase1_steps=1, phase2_steps=1), tmp_path / "run",
               progress=False)
    assert tr.prediction_type == "v_prediction"
    assert tr.tokenizer.pad_token_id == 0 and tr.unet.config.use_linear_projection
    from dynasyn.sampling import step_generator

    z, t, target = tr._noisy(tr.scene_latents[False], step_generator(0, 0))
    g = step_generator(0, 0)
    lat = tr.scene_latents[False]
    x0 = (lat.mean + lat.std * torch.randn(lat.mean.shape, generator=g)) * tr.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    assert torch.allclose(target, tr.noise_scheduler.get_velocity(x0, noise, t))
    assert not torch.allclose(target, noise)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model, scene2, tmp_path,
                                                              monkeypatch):
    import dynasyn.train as T

    real = T.masked_diffusion_loss
    calls = {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        out = real(*a)
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(T, "masked_diffusion_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite at step 3.*step-000002"):
        train(_cfg(tiny_model, scene2, phase1_steps=4, phase2_steps=0, checkpoint_every=2), run,
              progress=False)
    assert (run / "checkpoints" / "step-000002" / "state.json").is_file()
    assert not (run / "run.json").exists()


@pytest.mark.parametrize("phase", [1, 2])
def test_efficient_step_has_the_same_losses_and_gradients(phase, tiny_model, scene4, tmp_path):
    """Early-stopped passes, caches and split backward change nothing but the cost."""
    aug = _augmented(tmp_path / "aug", n=4)
    grads, logs = [], []
    for efficient in (True, False):
        cfg = _cfg(tiny_model, scene4, augmented=aug, efficient=efficient, lambda_aug=0.1)
        tr = Trainer(cfg, tmp_path / f"run{efficient}", progress=False)
        tr.keep_original_rows()
        tr._setup_phase(phase)
        if phase == 2 and efficient:  # the prior: no text-encoder copy, a partial UNet copy
            assert tr.prior_te is None
            possible = tr._possible_class_prompts()
            assert len(possible) == 64 + 2  # 4 subjects: 64 ordered unions; 2 augmented items
            assert set(tr.class_cache) == {tuple(p.input_ids.tolist()) for p in possible}
            n_prior = sum(p.numel() for p in tr.prior_unet.parameters())
            assert n_prior < sum(p.numel() for p in tr.unet.parameters())
        for s in range(2):  # the second step reuses the class-prompt cache
            tr.optimizer.zero_grad(set_to_none=True)
            out = tr.compute_gradients(s)
        logs.append(out)
        grads.append({i: p.grad.clone() for i, p in enumerate(tr.params) if p.grad is not None})
    assert set(logs[0]) == {"md", "m2a", "ica", "aug", "loss"}
    for k in logs[0]:
        assert logs[0][k] == pytest.approx(logs[1][k], rel=1e-5, abs=1e-8), k
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for i in grads[0]:
        assert torch.allclose(grads[0][i], grads[1][i], rtol=1e-4, atol=1e-7), i
