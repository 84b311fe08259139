"""The low-VRAM recipe: the profile it resolves to, a tiny run under it, the 8-bit fallback."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types

import pytest
import torch
import yaml
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

from dynasyn.attention import CaptureCrossAttnProcessor
from dynasyn.config import build_config
from dynasyn.lowvram import LOW_VRAM_LORA_RANK, optimizer_class
from dynasyn.rundir import LOSS_LOG
from dynasyn.train import train

PROFILE = dict(lora_rank=LOW_VRAM_LORA_RANK, gradient_checkpointing=True, use_8bit_adam=True,
               prior_dtype="auto", efficient=True)


def _values(cfg, keys):
    return {k: getattr(cfg, k) for k in keys}


def test_profile_sets_its_keys_and_explicit_values_win(tmp_path):
    plain = build_config("dynasyn", overrides=dict(device="cpu"))
    assert _values(plain, PROFILE) != PROFILE and plain.mixed_precision == "no"
    cpu = build_config("dynasyn", overrides=dict(low_vram=True, device="cpu"))
    assert _values(cpu, PROFILE) == PROFILE
    assert cpu.mixed_precision == "no"  # autocast only on CUDA
    cuda = build_config("dynasyn", overrides=dict(low_vram="true"), assume_cuda=True)
    assert _values(cuda, PROFILE) == PROFILE and cuda.mixed_precision == "bf16"
    # explicit values (--set / options, and a config file) win over the profile
    mine = build_config("dynasyn", overrides=dict(low_vram=True, lora_rank=0,
                                                  mixed_precision="fp16",
                                                  use_8bit_adam=False), assume_cuda=True)
    assert (mine.lora_rank, mine.mixed_precision, mine.use_8bit_adam) == (0, "fp16", False)
    assert mine.gradient_checkpointing is True
    f = tmp_path / "c.yaml"
    f.write_text("low_vram: true\ngradient_checkpointing: false\nlora_rank: 4\n")
    fromfile = build_config("dynasyn", config_file=f, overrides=dict(device="cpu"))
    assert (fromfile.gradient_checkpointing, fromfile.lora_rank) == (False, 4)
    assert fromfile.use_8bit_adam is True


def _no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError


def _losses(run):
    return [json.loads(line) for line in (run / LOSS_LOG).read_text().splitlines()]


def test_low_vram_run_trains_with_the_same_first_step_losses(tiny_model, scene2, tmp_path,
                                                            monkeypatch, caplog, one_thread):
    """A tiny run under low_vram (CPU: LoRA r16, checkpointing, plain Adam after one warning)
    trains; its first step of each phase has the losses of the default run (checkpointing
    recomputes the same values; LoRA's B starts at zero, so phase 2 starts from the same
    model, and the prior is the same base weights with the adapters off)."""
    _no_bitsandbytes(monkeypatch)
    runs, trainers = {}, {}
    for low in (False, True):
        cfg = build_config("dynasyn", overrides=dict(
            model=str(tiny_model), scene=str(scene2), phase1_steps=1, phase2_steps=2,
            log_every=1, low_vram=low, device="cpu"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dynasyn"):
            trainers[low] = train(cfg, tmp_path / f"run{low}", progress=False)
        warned = [r.getMessage() for r in caplog.records if "use_8bit_adam" in r.getMessage()]
        assert len(warned) == (1 if low else 0), warned
        runs[low] = _losses(tmp_path / f"run{low}")
    assert "bitsandbytes is not installed" in warned[0] and "plain Adam" in warned[0]
    tr = trainers[True]
    assert type(tr.optimizer) is torch.optim.Adam
    assert tr.mode == "lora" and tr.cfg.lora_rank == LOW_VRAM_LORA_RANK
    assert tr.unet.is_gradient_checkpointing
    procs = list(tr.unet.attn_processors.values())
    assert all(isinstance(p, (AttnProcessor2_0, CaptureCrossAttnProcessor)) for p in procs)
    assert any(isinstance(p, CaptureCrossAttnProcessor) for p in procs)
    recorded = yaml.safe_load((tmp_path / "runTrue" / "config.yaml").read_text())
    assert recorded["low_vram"] is True and recorded["lora_rank"] == LOW_VRAM_LORA_RANK
    assert recorded["gradient_checkpointing"] is True and recorded["use_8bit_adam"] is True
    plain, low = runs[False], runs[True]
    assert [r["step"] for r in low] == [1, 2, 3]
    for i in (0, 1):  # phase 1's step, phase 2's first step
        for k in ("md", "m2a", "ica", "loss"):
            assert low[i][k] == pytest.approx(plain[i][k], rel=1e-5, abs=1e-9), (i, k)
    assert low[2]["loss"] != pytest.approx(plain[2]["loss"], rel=1e-7)  # then they train apart


def test_8bit_adam_is_used_when_bitsandbytes_is_there(monkeypatch, caplog):
    class AdamW8bit:  # stand-ins for bitsandbytes' classes
        pass

    class Adam8bit:
        pass

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit,
                                                             Adam8bit=Adam8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    cuda = torch.device("cuda")
    assert optimizer_class("adamw", True, cuda) is AdamW8bit
    assert optimizer_class("adam", True, cuda) is Adam8bit
    assert optimizer_class("adamw", False, cuda) is torch.optim.AdamW
    warned = [False]
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        assert optimizer_class("adamw", True, torch.device("cpu"), warned) is torch.optim.AdamW
        assert optimizer_class("adamw", True, torch.device("cpu"), warned) is torch.optim.AdamW
    assert len(caplog.records) == 1 and "no 8-bit AdamW for cpu" in caplog.records[0].getMessage()


def test_checkpointing_keeps_losses_and_gradients_of_full_phase_2(tiny_model, scene2, tmp_path,
                                                                  one_thread):
    """Gradient checkpointing with the attention losses on (capture blocks unchecked, every
    other block recomputed): the same losses and gradients as without it."""
    from dynasyn.train import Trainer

    out = {}
    for ckpt in (False, True):
        cfg = build_config("dynasyn", overrides=dict(
            model=str(tiny_model), scene=str(scene2), gradient_checkpointing=ckpt, device="cpu"))
        tr = Trainer(cfg, tmp_path / f"r{ckpt}", progress=False)
        tr.keep_original_rows()
        tr._setup_phase(2)
        logs = tr.compute_gradients(0)
        out[ckpt] = (logs, [p.grad.clone() for p in tr.params if p.grad is not None])
    assert tr.unet.is_gradient_checkpointing
    (la, ga), (lb, gb) = out[False], out[True]
    assert set(la) >= {"md", "m2a", "ica"} and la == pytest.approx(lb, rel=1e-6)
    assert len(ga) == len(gb) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(ga, gb, strict=True))


def test_train_records_the_resolved_profile_and_set_values(tiny_model, scene2, tmp_path,
                                                           monkeypatch, one_thread):
    from dynasyn.cli import main

    _no_bitsandbytes(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", str(scene2), "--model", str(tiny_model), "--out", str(run),
                 "--phase1-steps", "1", "--phase2-steps", "0", "--no-progress",
                 "--set", "low_vram=true", "--set", "lora_rank=0", "--device", "cpu"]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["low_vram"] is True and recorded["lora_rank"] == 0  # --set wins
    assert recorded["gradient_checkpointing"] is True and recorded["mixed_precision"] == "no"


def test_fp16_gradient_scaler_is_unscaled_before_clipping_and_step(tiny_model, scene2, tmp_path,
                                                                   one_thread):
    """fp16 on CUDA: accelerate scales the loss; the trainer unscales before clipping and lets
    the scaler step. A CPU GradScaler stands in: the step equals the unscaled one."""
    from dynasyn.train import Trainer

    after = []
    for scale in (None, 2.0**14):
        cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(scene2),
                                                     device="cpu"))
        tr = Trainer(cfg, tmp_path / f"r{scale}", progress=False)
        tr.keep_original_rows()
        tr._setup_phase(2)
        if scale is not None:
            tr.acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        try:
            for s in range(3):  # Adam's first step is scale-free: later ones are not
                tr.step(s)
        finally:
            tr.acc.scaler = None
        after.append([p.detach().clone() for p in tr.params])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*after, strict=True))


def test_lora_under_mixed_precision_stores_the_frozen_unet_half_exactly(tiny_model, scene2,
                                                                       tmp_path, one_thread):
    """LoRA + bf16: the never-trained UNet's linear/conv weights are kept in bf16 (prior_dtype
    auto); losses and gradients are bit-identical to fp32 storage (prior_dtype float32), and
    the run ends with the model files' fp32 weights back in place."""
    from accelerate.state import AcceleratorState
    from diffusers import UNet2DConditionModel

    from dynasyn.train import Trainer

    out = {}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        for dt in ("auto", "float32"):
            cfg = build_config("dynasyn", overrides=dict(
                model=str(tiny_model), scene=str(scene2), lora_rank=4, mixed_precision="bf16",
                prior_dtype=dt, device="cpu", phase1_steps=1, phase2_steps=1))
            tr = Trainer(cfg, tmp_path / dt, progress=False)
            tr.keep_original_rows()
            steps = []
            for phase in (1, 2):
                tr._setup_phase(phase)
                logs = tr.compute_gradients(phase - 1)
                steps.append((logs, [p.grad.clone() for p in tr.params if p.grad is not None]))
                tr.optimizer.zero_grad(set_to_none=True)
            out[dt] = (tr, steps)
        half, full = out["auto"][0], out["float32"][0]
        assert half.unet_half and not full.unet_half
        assert half.unet.conv_in.weight.dtype == torch.bfloat16
        assert half.unet.conv_norm_out.weight.dtype == torch.float32
        assert full.unet.conv_in.weight.dtype == torch.float32
        for (la, ga), (lb, gb) in zip(out["auto"][1], out["float32"][1], strict=True):
            assert la == lb
            assert len(ga) == len(gb) > 0 and all(torch.equal(a, b) for a, b in zip(ga, gb,
                                                                                    strict=True))
        from dynasyn.memory import estimate_memory

        actual = sum(p.numel() * p.element_size() for m in (half.unet, half.text_encoder,
                                                             half.vae) for p in m.parameters())
        assert estimate_memory(half.cfg, 2).phases[1].rows["weights"] == actual  # + LoRA
        half._restore_unet_weights()
        base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
        mine = {k.replace(".base_layer", ""): v for k, v in half.unet.state_dict().items()
                if "lora_" not in k}
        assert mine.keys() == base.keys()
        assert all(torch.equal(mine[k], base[k]) for k in base)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_lora_bf16_run_samples_after_training(tiny_model, scene2, tmp_path, one_thread):
    """The fp32 UNet weights are back before the run renders its samples outside autocast."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        cfg = build_config("dynasyn", overrides=dict(
            model=str(tiny_model), scene=str(scene2), lora_rank=4, mixed_precision="bf16",
            device="cpu", phase1_steps=1, phase2_steps=1, sample_prompts=["<asset0>"],
            sample_steps=2))
        tr = train(cfg, tmp_path / "run", progress=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not tr.unet_half and tr.unet.conv_in.weight.dtype == torch.float32
    assert list((tmp_path / "run" / "samples").iterdir())


def test_8bit_adam_trains_checkpoints_and_resumes_bit_identical(tiny_model, scene2, tmp_path):
    """bitsandbytes' 8-bit Adam (CPU kernels since 0.50): the run uses it, its quantized
    state goes into the safetensors checkpoint, and a resumed run ends bit-identical."""
    bnb = pytest.importorskip("bitsandbytes")
    from dynasyn.lowvram import _runs_on

    if not _runs_on(bnb.optim.Adam8bit, torch.device("cpu")):
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU 8-bit optimizer")
    cfg = build_config("dynasyn", overrides=dict(
        model=str(tiny_model), scene=str(scene2), phase1_steps=2, phase2_steps=2, lora_rank=4,
        use_8bit_adam=True, device="cpu", checkpoint_every=1, keep_checkpoints=10))
    tr = train(cfg, tmp_path / "a", progress=False)
    assert isinstance(tr.optimizer, bnb.optim.Adam8bit)
    # tensors of >= 4096 elements (the embedding table) get 1-byte states, not 4
    dtypes = {s["state1"].dtype for s in tr.optimizer.state.values() if "state1" in s}
    assert torch.uint8 in dtypes
    b = tmp_path / "b"
    train(cfg, b, progress=False)
    for ck in sorted((b / "checkpoints").iterdir())[3:]:  # resume in phase 2, its 8-bit state
        shutil.rmtree(ck)
    (b / "run.json").unlink()
    train(cfg, b, resume=True, progress=False)
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
        sa, sb = load_file(tmp_path / "a" / name), load_file(b / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
