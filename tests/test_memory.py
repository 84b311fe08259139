"""dynasyn train --estimate-memory: exact parameter arithmetic, the activation formula, the CLI."""

from __future__ import annotations

import re

import pytest
import torch

from dynasyn.attention import (
    install_attention_capture,
    keep_capture_layers_unchecked,
    resolve_downsample,
    store_weights_as,
)
from dynasyn.cli import main
from dynasyn.config import build_config
from dynasyn.known_models import KNOWN_MODELS
from dynasyn.memory import (
    GiB,
    Models,
    activation_bytes,
    capture_block_params,
    empty_models,
    estimate_memory,
    measure_unet_pass,
    n_params,
)
from dynasyn.tiny import tiny_pipeline
from dynasyn.train import Trainer

SD21 = "stabilityai/stable-diffusion-2-1-base"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def test_known_configs_build_the_published_parameter_counts():
    sd21 = empty_models(KNOWN_MODELS[SD21])
    assert n_params(sd21.unet) == 865_910_724
    assert [n_params(t) for t in sd21.text_encoders] == [340_387_840]
    assert n_params(sd21.vae) == 83_653_863
    xl = empty_models(KNOWN_MODELS[SDXL])
    assert n_params(xl.unet) == 2_567_463_684
    assert [n_params(t) for t in xl.text_encoders] == [123_060_480, 694_659_840]
    assert xl.kind == "sdxl" and next(xl.unet.parameters()).device.type == "meta"


def _trainer_params(cfg, out, phase):
    tr = Trainer(cfg, out, progress=False)
    weights = sum(n_params(m) for m in (tr.unet, tr.text_encoder, tr.vae))
    tr.keep_original_rows()
    tr._setup_phase(phase)
    return tr, weights, sum(p.numel() for p in tr.params)


@pytest.mark.parametrize("lora", [0, 4])
def test_parameter_rows_are_the_trainers_exact_counts(tiny_model, scene2, tmp_path, lora,
                                                      one_thread):
    cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(scene2),
                                                 lora_rank=lora, device="cpu"))
    est = estimate_memory(cfg, n_subjects=2)
    p1, p2 = est.phases
    _, weights, trained1 = _trainer_params(cfg, tmp_path / "a", 1)
    tr, _, trained2 = _trainer_params(cfg, tmp_path / "b", 2)
    assert p1.trained_params == trained1 and p2.trained_params == trained2
    assert p1.rows["weights"] == 4 * weights
    for p in (p1, p2):
        assert p.rows["gradients"] == 4 * p.trained_params
        assert p.rows["optimizer"] == 8 * p.trained_params  # Adam: two fp32 states
    if lora:
        assert p2.rows["weights"] == 4 * (weights + trained2 - trained1)  # + the adapters
        assert p2.rows["frozen prior"] == 0  # the base model with adapters off
    else:
        assert p2.rows["frozen prior"] == 4 * n_params(tr.prior_unet)  # attention-only copy
    eight = estimate_memory(build_config("dynasyn", overrides=dict(
        model=str(tiny_model), lora_rank=lora, use_8bit_adam=True)), n_subjects=2)
    assert [p.rows["optimizer"] for p in eight.phases] == [2 * p.trained_params
                                                           for p in est.phases]


def _ratios(unet, vae, resolution: int, vae_factor: int) -> dict[tuple[str, bool], float]:
    """Estimate / CPU count (:func:`measure_unet_pass`) per mode and checkpointing, with
    the UNet set up as the trainer sets it up."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    out = {}
    for mode in ("fp32", "bf16", "bf16-half"):
        torch.manual_seed(0)
        u = UNet2DConditionModel.from_config(config).requires_grad_(False)
        install_attention_capture(u, None)
        capture = resolve_downsample(u, None)
        if mode == "bf16-half":
            store_weights_as(u, torch.bfloat16)
        models = Models("sd", u, [], vae)
        mixed = mode != "fp32"
        for ckpt in (False, True):
            if ckpt:
                u.enable_gradient_checkpointing()
                keep_capture_layers_unchecked(u)
            est = activation_bytes(models, resolution, 1, ckpt, mixed, capture=capture)
            if mode == "bf16":
                est += 2 * (capture_block_params(u, capture) if ckpt else n_params(u))
            out[mode, ckpt] = est / measure_unet_pass(u, resolution, mixed, vae_factor)
    return out


@pytest.mark.parametrize("layout", ["sd15", "sd21"])
def test_activation_formula_is_close_to_a_cpu_count(layout, one_thread):
    """The estimate against the tensors a forward + backward pass keeps alive at once."""
    pipe = tiny_pipeline(layout=layout)
    ratios = _ratios(pipe.unet, pipe.vae, 64, 4)
    assert all(0.65 <= r <= 1.4 for r in ratios.values()), ratios


@pytest.mark.slow
def test_activation_formula_on_sd21_at_256px(one_thread):
    from diffusers import UNet2DConditionModel

    cfg = KNOWN_MODELS[SD21]
    models = empty_models(cfg)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
    ratios = _ratios(unet, models.vae, 256, 8)
    assert all(0.65 <= r <= 1.4 for r in ratios.values()), ratios


def test_low_vram_and_its_parts_lower_the_estimate():
    models = empty_models(KNOWN_MODELS[SD21])

    def peak(**kw):
        cfg = build_config("dynasyn", overrides=dict(model=SD21, **kw), assume_cuda=True)
        return estimate_memory(cfg, 2, models).peak

    default, low = peak(), peak(low_vram=True)
    assert low < default / 3
    assert peak(gradient_checkpointing=True) < default
    assert peak(lora_rank=16) < default
    assert peak(use_8bit_adam=True) < default
    assert peak(low_vram=True, lora_rank=0) < default  # full phase 2, still lower
    assert peak(low_vram=True) <= 12 * GiB  # the goal for SD 2.1 at 512 px


def _table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2).split()
    return rows


def test_cli_prints_the_table_and_writes_nothing(tiny_model, scene2, tmp_path, capsys,
                                                 monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["train", str(scene2), "--model", str(tiny_model), "--estimate-memory",
                 "--set", "low_vram=true", "--lora-rank", "4"]) == 0
    out = capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert out.startswith("estimated peak GPU memory: ") and "not a measurement" in out
    rows = _table(out)
    for name in ("weights", "gradients", "optimizer", "frozen prior", "activations", "total"):
        assert len(rows[name]) == 2, name
    cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(scene2),
                                                 low_vram=True, lora_rank=4))
    _, _, trained = _trainer_params(cfg, tmp_path / "t", 2)
    assert rows["trained parameters"][1] == f"{trained:,}"
    assert "bf16" in out and "8-bit Adam" in out  # resolved as for a CUDA device


@pytest.mark.parametrize("argv, expect", [
    (["--model", "/no/such/model"], "not a local pipeline directory"),
    (["--set", "lora_rank=-1"], "lora_rank must be >= 0"),
    (["--set", "attention_downsample=3"], "attention_downsample=3"),
])
def test_cli_bad_input_is_one_line(tiny_model, scene2, tmp_path, capsys, argv, expect):
    model = [] if "--model" in argv else ["--model", str(tiny_model)]
    assert main(["train", str(scene2), "--estimate-memory", *model, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dynasyn: error:") and expect in err, err


def test_cli_bad_scene_and_missing_out(tiny_model, tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope"), "--estimate-memory",
                 "--model", str(tiny_model)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["train", str(tmp_path / "nope"), "--model", str(tiny_model)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_cli_set_values_win_over_the_profile(tiny_model, scene2, capsys):
    argv = ["train", str(scene2), "--model", str(tiny_model), "--estimate-memory",
            "--set", "low_vram=true"]
    assert main(argv) == 0
    assert "phase 2 (LoRA r16)" in capsys.readouterr().out
    assert main([*argv, "--set", "lora_rank=0", "--set", "mixed_precision=no"]) == 0
    out = capsys.readouterr().out
    assert "phase 2 (full)" in out and "mixed precision no" in out


def test_the_docs_estimates_are_the_commands(one_thread):
    """docs/low-vram.md's table is what --estimate-memory computes (2 subjects, CUDA)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "low-vram.md").read_text()
    rows = [r for r in doc.splitlines() if r.startswith("| stable-diffusion")]
    assert len(rows) >= 6
    models = {}
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        name, px, config, peak = cells[0], int(cells[1]), cells[2].strip("`"), cells[-1]
        model = next(k for k in KNOWN_MODELS if k.split("/")[1] == name)
        kw = {}
        for part in config.split(", "):
            if part == "low_vram":
                kw["low_vram"] = True
            elif "=" in part:
                k, v = part.split("=")
                kw[k] = int(v) if v.isdigit() else v
        cfg = build_config("dynasyn", overrides=dict(model=model, **kw), assume_cuda=True)
        models.setdefault(model, empty_models(KNOWN_MODELS[model]))
        est = estimate_memory(cfg, 2, models[model])
        assert est.resolution == px
        assert peak == f"**{est.peak / GiB:.1f}**", (r, est.peak / GiB)
