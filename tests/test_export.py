"""``dynasyn export``: every exported file, reloaded by diffusers' own single-path loaders,
gives the run's images for a fixed seed; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel

from dynasyn.cli import main
from dynasyn.config import build_config
from dynasyn.export import export_run
from dynasyn.generate import load_run
from dynasyn.ldm import unet_to_ldm
from dynasyn.tiny import synthetic_scene, tiny_pipeline
from dynasyn.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of <asset0> and <asset1>"


def _render(pipe, prompt: str = PROMPT) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="np").images[0]


def _base(model: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _single_file(path: Path, base: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(base), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_embeddings(pipe, folder: Path) -> None:
    for f in sorted(folder.glob("*.safetensors")):
        pipe.load_textual_inversion(str(f))  # one path, no token=: the key names the token


def _train(model: Path, scene: Path, out: Path, **kw) -> Path:
    cfg = build_config("dynasyn", overrides={"model": str(model), "scene": str(scene),
                                             "phase1_steps": 2, "phase2_steps": 2, **kw})
    train(cfg, out, progress=False)
    return out


def _gelu_model(path: Path) -> Path:
    """SD 2.x's shapes: v-prediction, linear projections, an OpenCLIP-like (GELU) text encoder."""
    pipe = tiny_pipeline(layout="sd21", prediction_type="v_prediction")
    cfg = pipe.text_encoder.config
    cfg.hidden_act = "gelu"
    torch.manual_seed(1)
    pipe.register_modules(text_encoder=CLIPTextModel(cfg))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A LoRA run with multi-vector placeholders (3 + 1 vectors), full runs on SD 1.x- and
    SD 2.x-shaped models and an embeddings-only run; learning rates high enough that every
    trained part moves visibly in two steps."""
    root = tmp_path_factory.mktemp("export")
    scene = synthetic_scene(root / "scene", 2)
    meta = json.loads((scene / "scene.json").read_text())
    meta["subjects"][0]["phrase"] = "red striped panda"
    (scene / "scene.json").write_text(json.dumps(meta))
    lr = dict(phase1_lr=5e-2)
    return {
        "lora": _train(tiny_model, scene, root / "lora", lora_rank=4, lora_lr=5e-2,
                       placeholder_vectors=0, placeholder_init="phrase", **lr),
        "full": _train(tiny_model, scene, root / "full", phase2_lr=1e-3, **lr),
        "full-sd2": _train(_gelu_model(root / "sd2"), scene, root / "full-sd2", phase2_lr=1e-3,
                           **lr),
        "embeddings": _train(tiny_model, scene, root / "emb", phase2_steps=0, **lr),
    }


def _model(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["base_model"])


# ------------------------------------------------------------------------------ a1111 / comfyui


def test_lora_run_exports_files_stock_diffusers_loads_from_single_paths(runs, tmp_path):
    run = runs["lora"]
    out = tmp_path / "a1111"
    manifest = export_run(run, "a1111", out)
    assert sorted(manifest["files"]) == ["embeddings/asset0.safetensors",
                                         "embeddings/asset1.safetensors",
                                         "models/Lora/lora_lora.safetensors"]
    assert manifest["prompt_words"] == {"<asset0>": "asset0", "<asset1>": "asset1"}
    assert all((out / f).stat().st_mode & 0o777 == 0o644 for f in manifest["files"])
    # one key per file, (vectors, dim): the multi-vector placeholder keeps its 3 rows
    e0, e1 = (load_file(str(out / f"embeddings/asset{i}.safetensors")) for i in (0, 1))
    assert list(e0) == ["<asset0>"] and e0["<asset0>"].shape == (3, 32)
    assert list(e1) == ["<asset1>"] and e1["<asset1>"].shape == (1, 32)
    lora = load_file(str(out / "models/Lora/lora_lora.safetensors"))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora)
    assert all(k.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")) for k in lora)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in lora
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in lora

    expected = _render(load_run(run, device="cpu"))
    pipe = _base(_model(run))
    _load_embeddings(pipe, out / "embeddings")
    assert pipe.tokenizer.tokenize("<asset0>") == ["<asset0>"]
    assert pipe.maybe_convert_prompt("<asset0>", pipe.tokenizer) == "<asset0> <asset0>_1 <asset0>_2"
    without_lora = _render(pipe)
    pipe.load_lora_weights(str(out / "models/Lora/lora_lora.safetensors"))
    np.testing.assert_allclose(_render(pipe), expected, atol=1e-5)
    assert np.abs(without_lora - expected).max() > 1e-3  # the LoRA (UNet and text encoder) acts


def test_comfyui_gets_the_same_files_in_its_folders(runs, tmp_path):
    a = export_run(runs["lora"], "a1111", tmp_path / "a")
    c = export_run(runs["lora"], "comfyui", tmp_path / "c", name="my run")
    assert sorted(c["files"]) == ["models/embeddings/asset0.safetensors",
                                  "models/embeddings/asset1.safetensors",
                                  "models/loras/my-run_lora.safetensors"]
    assert c["prompt_words"]["<asset1>"] == "embedding:asset1"
    for fa, fc in zip(sorted(a["files"]), sorted(c["files"]), strict=True):
        ta, tc = load_file(str(tmp_path / "a" / fa)), load_file(str(tmp_path / "c" / fc))
        assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)


@pytest.mark.parametrize("kind", ["full", "full-sd2"])
def test_full_run_checkpoint_loads_with_from_single_file(runs, kind, tmp_path):
    run, out = runs[kind], tmp_path / "x"
    manifest = export_run(run, "comfyui", out, name="mine")
    assert sorted(manifest["files"]) == ["models/checkpoints/mine.safetensors",
                                         "models/embeddings/asset0.safetensors",
                                         "models/embeddings/asset1.safetensors"]
    ckpt = out / "models/checkpoints/mine.safetensors"
    sd = load_file(str(ckpt))
    text = "cond_stage_model.model." if kind == "full-sd2" else "cond_stage_model.transformer."
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", text)) for k in sd)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (16, 4, 3, 3)
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1×1 conv, as in SD
    if kind == "full-sd2":
        assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (
            96, 32)
    else:  # the base vocabulary: placeholders live in the embedding files
        assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
                  ].shape[0] == 49408

    expected = _render(load_run(run, device="cpu"))
    assert manifest["single_file_config"] == str(_model(run))
    pipe = _single_file(ckpt, manifest["single_file_config"])
    _load_embeddings(pipe, out / "models/embeddings")
    np.testing.assert_allclose(_render(pipe), expected, atol=1e-5)
    base = _base(_model(run))
    _load_embeddings(base, out / "models/embeddings")
    assert np.abs(_render(base) - expected).max() > 1e-3  # the fine-tuned weights act


def test_lora_run_as_a_fused_checkpoint(runs, tmp_path):
    run, out = runs["lora"], tmp_path / "x"
    manifest = export_run(run, "a1111", out, parts=["checkpoint", "embeddings"])
    assert "models/Stable-diffusion/lora.safetensors" in manifest["files"]
    pipe = _single_file(out / "models/Stable-diffusion/lora.safetensors", _model(run))
    _load_embeddings(pipe, out / "embeddings")
    np.testing.assert_allclose(_render(pipe), _render(load_run(run, device="cpu")), atol=1e-4)


def test_embeddings_run_exports_only_embeddings(runs, tmp_path):
    run, out = runs["embeddings"], tmp_path / "x"
    assert export_run(run, "a1111", out)["files"] == ["embeddings/asset0.safetensors",
                                                      "embeddings/asset1.safetensors"]
    pipe = _base(_model(run))
    _load_embeddings(pipe, out / "embeddings")
    np.testing.assert_allclose(_render(pipe), _render(load_run(run, device="cpu")), atol=1e-6)


# ------------------------------------------------------------------------------ diffusers


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_diffusers_folder_loads_alone(runs, kind, tmp_path, capsys):
    run, out = runs[kind], tmp_path / "pipe"
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert not getattr(pipe.unet, "peft_config", None)  # LoRA fused into the weights
    np.testing.assert_allclose(_render(pipe), _render(load_run(run, device="cpu")), atol=1e-4)


# ------------------------------------------------------------------------------ bad input


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".export-" in p.name]


@pytest.mark.parametrize("args, message", [
    (["--format", "a1112"], "unknown format 'a1112'; choose one of: a1111, comfyui, diffusers"),
    (["--format", "a1111", "--only", "lora"], "is a full run: it has no LoRA to export"),
    (["--format", "diffusers", "--only", "lora"], "--only applies to --format a1111 / comfyui"),
    (["--format", "a1111", "--only", "loras"], "unknown part 'loras' in --only"),
    (["--format", "a1111", "--only", ","], "--only names no part"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["export", str(runs["full"]), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynasyn: error: ") and message in err[0]
    assert not out.exists() and not _leftovers(tmp_path)


def test_missing_run_embeddings_checkpoint_and_occupied_out(runs, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "a1111", "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(runs["embeddings"]), "--format", "a1111", "--only", "checkpoint",
                 "--out", str(tmp_path / "o")]) == 2
    assert "trained only embeddings" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert main(["export", str(runs["embeddings"]), "--format", "a1111", "--out",
                 str(tmp_path / "o")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(runs["embeddings"]), "--format", "a1111", "--out",
                 str(runs["embeddings"].parent), "--overwrite"]) == 2
    assert "holds it" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert main(["export", str(runs["embeddings"]), "--format", "a1111", "--out",
                 str(tmp_path / "o"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["dynasyn-export.json",
                                                                  "embeddings"]
    assert not _leftovers(tmp_path)


def test_a_failed_export_leaves_the_previous_one(runs, tmp_path, monkeypatch):
    out = tmp_path / "o"
    export_run(runs["full"], "a1111", out, parts=["embeddings"])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def broken(pipe):
        raise RuntimeError("disk full")

    monkeypatch.setattr("dynasyn.ldm.pipeline_to_ldm", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(runs["full"], "a1111", out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not _leftovers(tmp_path)


def test_a_unet_outside_the_sd_layout_is_refused():
    unet = tiny_pipeline().unet
    sd = {**unet.state_dict(), "extra_block.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="outside the SD 1.x/2.x layout.*extra_block"):
        unet_to_ldm(sd, unet.config)


def test_sd_shaped_unet_and_vae_get_the_original_key_names():
    """SD 1.x's block structure (a last down block and first up block without attention, two
    layers per block, channels 1:2:4:4) at small width: the original checkpoint's key counts
    (686 UNet, 248 VAE) and names, and diffusers' converter reads them back exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from dynasyn.ldm import vae_to_ldm

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8)
    u, v = unet_to_ldm(unet.state_dict(), unet.config), vae_to_ldm(vae.state_dict(), vae.config)
    assert (len(u), len(v)) == (686, 248)
    for k in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
              "input_blocks.11.0.out_layers.3.weight", "middle_block.1.proj_in.weight",
              "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
              "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias"):
        assert k in u, k
    for k in ("encoder.down.1.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
              "decoder.up.0.block.2.conv2.weight", "encoder.mid.attn_1.q.weight"):
        assert k in v, k
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: x for k, x in u.items()},
                                       unet.config)
    assert back.keys() == unet.state_dict().keys()
    assert all(torch.equal(back[k], x) for k, x in unet.state_dict().items())
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: x for k, x in v.items()},
                                      vae.config)
    assert all(torch.equal(back[k], x) for k, x in vae.state_dict().items())
