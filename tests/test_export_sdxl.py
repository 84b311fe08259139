"""``dynasyn export`` of SDXL runs: every exported file, reloaded by diffusers' own loaders,
gives the run's images (``load_run``) for a fixed seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from dynasyn.cli import main
from dynasyn.config import build_config
from dynasyn.export import export_run
from dynasyn.generate import load_run
from dynasyn.tiny import save_tiny_pipeline, synthetic_scene, tiny_xl_pipeline
from dynasyn.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of <asset0> and <asset1>"
VOCAB = 49408  # CLIP's base vocabulary


def _render(pipe, prompt: str = PROMPT) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="np").images[0]


def _ready(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _base(model: Path) -> StableDiffusionXLPipeline:
    return _ready(StableDiffusionXLPipeline.from_pretrained(model))


def _single_file(path: Path, base: Path | str) -> StableDiffusionXLPipeline:
    return _ready(StableDiffusionXLPipeline.from_single_file(str(path), config=str(base),
                                                             local_files_only=True))


def _load_embeddings(pipe, folder: Path) -> None:
    """diffusers' documented way for SDXL embedding files: one call per text encoder."""
    for f in sorted(folder.glob("*.safetensors")):
        sd, token = load_file(str(f)), f"<{f.stem}>"
        pipe.load_textual_inversion(sd["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)


def _xl_model(path: Path) -> Path:
    """The tiny SDXL pipeline with SDXL's two text-encoder widths made different (32 and 48,
    projection 40), as CLIP-L and OpenCLIP-bigG are (768 and 1280): diffusers' single-file
    loader tells them apart by width."""
    pipe = tiny_xl_pipeline()
    cfg = pipe.text_encoder_2.config
    cfg.hidden_size, cfg.projection_dim = 48, 40
    torch.manual_seed(1)
    unet = dict(pipe.unet.config, cross_attention_dim=32 + 48,
                projection_class_embeddings_input_dim=6 * 8 + 40)
    pipe.register_modules(text_encoder_2=CLIPTextModelWithProjection(cfg),
                          unet=UNet2DConditionModel.from_config(unet))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _train(model: Path, scene: Path, out: Path, **kw) -> Path:
    cfg = build_config("dynasyn", overrides={"model": str(model), "scene": str(scene),
                                             "phase1_steps": 2, "phase2_steps": 2, **kw})
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """SDXL LoRA (3 + 1 vectors), full and embeddings-only runs; a full run on the stock tiny
    SDXL (both encoders 32 wide); learning rates that move every trained part in two steps."""
    root = tmp_path_factory.mktemp("export-xl")
    scene = synthetic_scene(root / "scene", 2)
    meta = json.loads((scene / "scene.json").read_text())
    meta["subjects"][0]["phrase"] = "red striped panda"
    (scene / "scene.json").write_text(json.dumps(meta))
    model, lr = _xl_model(root / "xl"), dict(phase1_lr=5e-2)
    return {
        "lora": _train(model, scene, root / "lora", lora_rank=4, lora_lr=5e-2,
                       placeholder_vectors=0, placeholder_init="phrase", **lr),
        "full": _train(model, scene, root / "full", lora_rank=0, phase2_lr=1e-3, **lr),
        "embeddings": _train(model, scene, root / "emb", phase2_steps=0, **lr),
        "same-width": _train(save_tiny_pipeline(root / "xl32", layout="sdxl"), scene,
                             root / "same-width", lora_rank=0, phase1_steps=1, phase2_steps=1),
    }


def _model(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["base_model"])


def _run_code(manifest: dict) -> StableDiffusionXLPipeline:
    """Execute the manifest's ``diffusers_code`` lines as they stand."""
    scope: dict = {"StableDiffusionXLPipeline": StableDiffusionXLPipeline}
    exec("\n".join(manifest["diffusers_code"]), scope)  # noqa: S102 - our own generated lines
    return _ready(scope["pipe"])


# ------------------------------------------------------------------------------ a1111 / comfyui


def test_lora_run_files_load_in_stock_diffusers(runs, tmp_path):
    run, out = runs["lora"], tmp_path / "a1111"
    manifest = export_run(run, "a1111", out)
    assert manifest["architecture"] == "sdxl"
    assert sorted(manifest["files"]) == ["embeddings/asset0.safetensors",
                                         "embeddings/asset1.safetensors",
                                         "models/Lora/lora_lora.safetensors"]
    # A1111 / ComfyUI's SDXL embedding layout: clip_l and clip_g, (vectors, dim) each
    e0, e1 = (load_file(str(out / f"embeddings/asset{i}.safetensors")) for i in (0, 1))
    assert sorted(e0) == sorted(e1) == ["clip_g", "clip_l"]
    assert (e0["clip_l"].shape, e0["clip_g"].shape) == ((3, 32), (3, 48))
    assert (e1["clip_l"].shape, e1["clip_g"].shape) == ((1, 32), (1, 48))
    run_rows = load_file(str(run / "learned_embeds_2.safetensors"))["<asset1>"]
    assert torch.equal(e1["clip_g"], run_rows.reshape(1, 48))

    path = out / "models/Lora/lora_lora.safetensors"
    lora = load_file(str(path))
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in lora)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in lora), prefix
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in lora
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in lora
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in lora
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"

    expected = _render(load_run(run, device="cpu"))
    pipe = _base(_model(run))
    _load_embeddings(pipe, out / "embeddings")
    assert pipe.maybe_convert_prompt("<asset0>", pipe.tokenizer_2) == "<asset0> <asset0>_1 <asset0>_2"
    without_lora = _render(pipe)
    pipe.load_lora_weights(str(path))
    np.testing.assert_allclose(_render(pipe), expected, atol=1e-5)
    assert np.abs(without_lora - expected).max() > 1e-3  # the LoRA acts
    # the manifest's own loading code does the same
    np.testing.assert_allclose(_render(_run_code(manifest)), expected, atol=1e-5)


def test_comfyui_gets_the_same_files(runs, tmp_path):
    a = export_run(runs["lora"], "a1111", tmp_path / "a", parts=["embeddings", "lora"])
    c = export_run(runs["lora"], "comfyui", tmp_path / "c")
    assert sorted(c["files"]) == ["models/embeddings/asset0.safetensors",
                                  "models/embeddings/asset1.safetensors",
                                  "models/loras/lora_lora.safetensors"]
    for fa, fc in zip(sorted(a["files"]), sorted(c["files"]), strict=True):
        ta, tc = load_file(str(tmp_path / "a" / fa)), load_file(str(tmp_path / "c" / fc))
        assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)


def test_full_run_checkpoint_round_trips_through_from_single_file(runs, tmp_path):
    run, out = runs["full"], tmp_path / "x"
    manifest = export_run(run, "comfyui", out, name="mine")
    ckpt = out / "models/checkpoints/mine.safetensors"
    assert "models/checkpoints/mine.safetensors" in manifest["files"]
    sd = load_file(str(ckpt))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.",
                             "conditioner.embedders.0.transformer.",
                             "conditioner.embedders.1.model.")) for k in sd)
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 6 * 8 + 40
    te1, te2 = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
    assert sd[te1 + "embeddings.token_embedding.weight"].shape == (VOCAB, 32)
    assert sd[te2 + "token_embedding.weight"].shape == (VOCAB, 48)  # the base vocabulary
    assert sd[te2 + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert sd[te2 + "text_projection"].shape == (48, 40)  # x @ P, as OpenCLIP

    ours = load_run(run, device="cpu")
    expected = _render(ours)
    back = _single_file(ckpt, manifest["single_file_config"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        for k, v in a.items():  # the run's encoders also hold the placeholder rows
            ref = v[:VOCAB] if "token_embedding" in k else v
            assert torch.equal(b[k], ref), f"{name}.{k}"
    _load_embeddings(back, out / "models/embeddings")
    np.testing.assert_allclose(_render(back), expected, atol=1e-5)
    np.testing.assert_allclose(_render(_run_code(manifest)), expected, atol=1e-5)
    base = _base(_model(run))
    _load_embeddings(base, out / "models/embeddings")
    assert np.abs(_render(base) - expected).max() > 1e-3  # the fine-tuned weights act


def test_lora_run_as_a_fused_checkpoint(runs, tmp_path):
    run, out = runs["lora"], tmp_path / "x"
    manifest = export_run(run, "a1111", out, parts=["checkpoint", "embeddings"])
    assert "models/Stable-diffusion/lora.safetensors" in manifest["files"]
    pipe = _single_file(out / "models/Stable-diffusion/lora.safetensors", _model(run))
    assert not getattr(pipe.text_encoder_2, "peft_config", None)
    _load_embeddings(pipe, out / "embeddings")
    np.testing.assert_allclose(_render(pipe), _render(load_run(run, device="cpu")), atol=1e-4)


def test_embeddings_run(runs, tmp_path):
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
    printed = capsys.readouterr().out
    assert f"StableDiffusionXLPipeline.from_pretrained({str(out.resolve())!r})" in printed
    assert "SDXL" in printed
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        assert not getattr(te, "peft_config", None)  # LoRA fused into the weights
        assert "<asset1>" in tok.get_vocab()
        assert te.get_input_embeddings().weight.shape[0] == len(tok)
    assert not getattr(pipe.unet, "peft_config", None)
    np.testing.assert_allclose(_render(pipe), _render(load_run(run, device="cpu")), atol=1e-4)


# ------------------------------------------------------------------------------ bad input


def test_encoders_of_one_width_cannot_be_a_checkpoint(runs, tmp_path, capsys):
    """diffusers' single-file loader would read CLIP-L's weights into both encoders: refused
    in one line, nothing written; the other parts and formats still export."""
    run, out = runs["same-width"], tmp_path / "out"
    assert main(["export", str(run), "--format", "a1111", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynasyn: error: ")
    assert "both text encoders are 32 wide" in err[0] and "--format diffusers" in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".export-" in p.name]
    assert export_run(run, "a1111", out, parts=["embeddings"])["files"] == [
        "embeddings/asset0.safetensors", "embeddings/asset1.safetensors"]
