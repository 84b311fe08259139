"""SDXL in the trainer and generation, on a tiny SDXL-shaped pipeline built from configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from dynasyn.attention import cross_attention_layers, resolve_downsample
from dynasyn.config import build_config
from dynasyn.errors import InputError
from dynasyn.generate import load_run
from dynasyn.models import load_pipeline
from dynasyn.sdxl import encode_ids, second_ids
from dynasyn.tiny import save_tiny_pipeline
from dynasyn.tokens import encode_template
from dynasyn.train import Trainer, train

PROMPT = "<asset0> is jumping next to <asset1>"


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tinyxl") / "sdxl", layout="sdxl")


def _cfg(model, scene, **kw):
    base = dict(model=str(model), scene=str(scene), phase1_steps=2, phase2_steps=2)
    base.update(kw)
    return build_config("dynasyn", overrides=base)


def _images(pipe, prompt=PROMPT):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="np").images


def test_load_pipeline_picks_sdxl_and_encoding_matches_the_pipeline(tiny_xl):
    pipe = load_pipeline(str(tiny_xl))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    p = encode_template(pipe.tokenizer, "a photo of {0} and {1}", ["red ball", "blue cube"])
    cond = encode_ids([pipe.text_encoder, pipe.text_encoder_2], p.input_ids[None],
                      pad_2=pipe.tokenizer_2.pad_token_id, eos=pipe.tokenizer.eos_token_id,
                      resolution=64)
    hidden, _, pooled, _ = pipe.encode_prompt("a photo of red ball and blue cube", device="cpu",
                                              do_classifier_free_guidance=False)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    assert cond.hidden.shape == (1, 77, 64)  # both encoders' 32 features
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    # the second tokenizer's padding: "!" (id 0) after the first EOS, nothing else changed
    ids2 = second_ids(p.input_ids, 0, 49407)
    ref = pipe.tokenizer_2("a photo of red ball and blue cube", padding="max_length",
                           max_length=77, return_tensors="pt").input_ids[0]
    assert torch.equal(ids2, ref)


def test_attention_regularized_at_latent_over_4(tiny_xl):
    """SDXL has no cross-attention at full latent resolution; the losses use latent/4."""
    unet = load_pipeline(str(tiny_xl)).unet
    assert 1 not in set(cross_attention_layers(unet).values())
    assert resolve_downsample(unet, None) == 4
    with pytest.raises(ValueError, match="choose one of"):
        resolve_downsample(unet, 1)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sdxl_run_trains_both_encoders_and_reloads_with_stock_calls(tiny_xl, scene2, tmp_path,
                                                                     mode):
    base = load_pipeline(str(tiny_xl))
    kw = dict(lora_rank=4) if mode == "lora" else {}
    cfg = _cfg(tiny_xl, scene2, **kw)
    start = Trainer(cfg, tmp_path / "unused", progress=False).embeddings  # initial rows
    tr = train(cfg, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["architecture"] == "sdxl" and info["mode"] == mode
    # the placeholder rows moved in both tables; every other row is bit-identical
    for emb, init, te in zip(tr.embeddings, start, (base.text_encoder, base.text_encoder_2),
                             strict=True):
        assert torch.equal(emb[: tr.orig_vocab], te.get_input_embeddings().weight)
        assert not torch.equal(emb[tr.orig_vocab:], init[tr.orig_vocab:])
    e1 = load_file(tmp_path / "run" / "learned_embeds.safetensors")
    e2 = load_file(tmp_path / "run" / "learned_embeds_2.safetensors")
    assert set(e1) == set(e2) == {"<asset0>", "<asset1>"}
    assert e1["<asset0>"].shape == (32,) and not torch.equal(e1["<asset0>"], e2["<asset0>"])
    if mode == "lora":
        from safetensors import safe_open

        with safe_open(tmp_path / "run" / "pytorch_lora_weights.safetensors", "pt") as f:
            keys = list(f.keys())
        assert any(k.startswith("text_encoder_2.") for k in keys)
        assert any(k.startswith("text_encoder.") for k in keys)
        assert any(k.startswith("unet.") for k in keys)
    else:
        assert (tmp_path / "run" / "text_encoder_2" / "config.json").is_file()
        changed = [n for n, p in tr.text_encoder_2.named_parameters()
                   if "embedding" not in n
                   and not torch.equal(p, dict(base.text_encoder_2.named_parameters())[n])]
        assert changed  # the second encoder is fine-tuned too
    # stock diffusers loading (load_run) renders what the trainer's own pipeline renders
    ours = _images(tr.pipeline())
    loaded = load_run(tmp_path / "run", device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    assert torch.allclose(torch.from_numpy(_images(loaded)), torch.from_numpy(ours), atol=1e-5)


def test_sdxl_embeddings_only_and_resume_is_bit_identical(tiny_xl, scene2, tmp_path):
    """Checkpoints hold the second table's rows and LoRA: a resumed run ends identical."""
    cfg = _cfg(tiny_xl, scene2, lora_rank=4, checkpoint_every=1, keep_checkpoints=10)
    train(cfg, tmp_path / "a", progress=False)
    b = tmp_path / "b"
    train(cfg, b, progress=False)
    for ck in sorted((b / "checkpoints").iterdir())[1:]:  # keep step 1 only
        shutil.rmtree(ck)
    (b / "run.json").unlink()
    train(cfg, b, resume=True, progress=False)
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors",
                 "pytorch_lora_weights.safetensors"):
        sa, sb = load_file(tmp_path / "a" / name), load_file(b / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_embeddings_only_sdxl_run(tiny_xl, scene2, tmp_path):
    tr = Trainer(_cfg(tiny_xl, scene2, phase2_steps=0), tmp_path / "e", progress=False)
    assert tr.mode == "embeddings" and tr.xl
    tr.out.mkdir()
    tr.run()
    pipe = load_run(tmp_path / "e", device="cpu")
    assert "<asset1>" in pipe.tokenizer_2.get_vocab()


def test_sdxl_run_with_an_sd_model_is_refused(tiny_xl, tiny_model, scene2, tmp_path):
    train(_cfg(tiny_xl, scene2, phase1_steps=1, phase2_steps=0), tmp_path / "r", progress=False)
    with pytest.raises(InputError, match="trained on an SDXL model"):
        load_run(tmp_path / "r", model=str(tiny_model), device="cpu")


def test_personalize_augment_generate_evaluate_masks_on_sdxl(tiny_xl, scene2, tmp_path):
    """The whole command path on an SDXL model: augmentation (drafts, inpainting, GSA,
    re-segmented final masks), training with L_AUG, generation, evaluation, masks from
    class names."""
    from dynasyn.cli import main

    run = tmp_path / "run"
    assert main(["personalize", str(scene2), "--model", str(tiny_xl), "--out", str(run),
                 "--phase1-steps", "1", "--phase2-steps", "1", "--lora-rank", "4",
                 "--num-prompts", "2", "--draft-steps", "2", "--gsa-steps", "4",
                 "--final-masks", "resegment", "--no-progress"]) == 0
    assert len((run / "augmented" / "prompts.jsonl").read_text().splitlines()) == 2
    assert (run / "augmented" / "0000.png").is_file()
    log = [json.loads(x) for x in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    assert all(r["aug"] > 0 for r in log)  # L_AUG trained on the SDXL augmented items
    assert main(["generate", str(run), "<asset0> is jumping", "-n", "1", "--steps", "2",
                 "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("*_0.png"))) == 1
    assert main(["evaluate", str(run), "-n", "1", "--steps", "2", "--limit", "1",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert "clip_t" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert main(["masks", str(scene2 / "img.png"), "--classes", "panda", "bowl",
                 "--out", str(tmp_path / "masks"), "--model", str(tiny_xl)]) == 0
    assert (tmp_path / "masks" / "mask1.png").is_file()


def test_low_vram_profile_on_sdxl(tiny_xl, scene2, tmp_path):
    """low_vram on SDXL under bf16 autocast (CPU): LoRA, both encoders checkpointed, the frozen
    UNet stored in bf16 during training and its fp32 weights restored for the saved run."""
    cfg = _cfg(tiny_xl, scene2, low_vram=True, device="cpu", mixed_precision="bf16",
               log_every=1)
    assert cfg.lora_rank > 0 and cfg.gradient_checkpointing
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state
    try:
        tr = Trainer(cfg, tmp_path / "lv", progress=False)
        assert tr.unet_half and tr.text_encoder_2.is_gradient_checkpointing
        tr.out.mkdir()
        tr.run()
    finally:  # the other tests run in fp32
        AcceleratorState._reset_state(reset_partial_state=True)
    log = [json.loads(x) for x in (tmp_path / "lv" / "logs" / "losses.jsonl").read_text()
           .splitlines()]
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    base = load_pipeline(str(tiny_xl)).unet.state_dict()
    unet = tr.unet.state_dict()
    key = next(k for k in base if k.endswith("to_q.weight") and "attn2" in k)
    lkey = next(k for k in unet if k.startswith(key.rsplit(".", 1)[0]) and "base_layer" in k
                and k.endswith("weight"))
    assert unet[lkey].dtype == torch.float32 and torch.equal(unet[lkey], base[key])


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
@pytest.mark.parametrize("lora", [0, 4])
def test_phase_2_trains_the_placeholder_rows_of_every_table(tiny_xl, tiny_model, scene2,
                                                            tmp_path, layout, lora):
    """Phase 2 (LoRA or full) keeps training the placeholder rows: each table requires grad
    (after peft's add_adapter froze the base weights) and gets a gradient on those rows only."""
    model = tiny_xl if layout == "sdxl" else tiny_model
    tr = Trainer(_cfg(model, scene2, lora_rank=lora), tmp_path / "p2", progress=False)
    tr.keep_original_rows()
    tr._setup_phase(2)
    tr.compute_gradients(0)
    assert len(tr.embeddings) == (2 if layout == "sdxl" else 1)
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    for emb in tr.embeddings:
        assert emb.requires_grad and id(emb) in in_opt
        assert emb.grad[tr.orig_vocab:].abs().sum() > 0


def test_four_subject_lora_sdxl_run_trains_generates_exports(tiny_xl, scene4, tmp_path):
    """The issue's acceptance: a tiny SDXL run with four subjects and LoRA phase 2 trains,
    generates and exports; the LoRA loads from its single path into the stock base pipeline,
    the embeddings by diffusers' per-encoder calls, and the images equal the run's."""
    from dynasyn.cli import main

    run, exp = tmp_path / "run", tmp_path / "export"
    assert main(["train", str(scene4), "--model", str(tiny_xl), "--out", str(run),
                 "--phase1-steps", "1", "--phase2-steps", "2", "--lora-rank", "4",
                 "--no-progress"]) == 0
    prompt = "<asset0> is next to <asset3>, <asset1> is on top of <asset2>"
    assert main(["generate", str(run), prompt, "-n", "1", "--steps", "2",
                 "--out", str(tmp_path / "gen")]) == 0
    assert main(["export", str(run), "--format", "a1111", "--out", str(exp)]) == 0
    files = sorted(p.relative_to(exp).as_posix() for p in exp.rglob("*.safetensors"))
    assert files == [f"embeddings/asset{i}.safetensors" for i in range(4)] + [
        "models/Lora/run_lora.safetensors"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    pipe.load_lora_weights(str(exp / "models/Lora/run_lora.safetensors"))
    for i in range(4):
        sd = load_file(exp / f"embeddings/asset{i}.safetensors")
        assert set(sd) == {"clip_l", "clip_g"}
        pipe.load_textual_inversion(sd["clip_l"], token=f"<asset{i}>",
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token=f"<asset{i}>",
                                    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ours = _images(load_run(run, device="cpu"), prompt)
    assert torch.allclose(torch.from_numpy(_images(pipe, prompt)), torch.from_numpy(ours),
                          atol=1e-4)


def test_break_a_scene_prior_preservation_on_sdxl(tiny_xl, scene2, tmp_path):
    """The break-a-scene preset's class images are rendered by the SDXL base pipeline and its
    prior loss runs through both encoders in phase 2 (not in phase 1)."""
    cfg = build_config("break-a-scene", overrides=dict(
        model=str(tiny_xl), scene=str(scene2), phase1_steps=1, phase2_steps=2,
        num_class_images=2, log_every=1))
    train(cfg, tmp_path / "bas", progress=False)
    log = [json.loads(x) for x in (tmp_path / "bas" / "logs" / "losses.jsonl").read_text()
           .splitlines()]
    assert ["prior" in r for r in log] == [False, True, True]
    assert all(r["prior"] > 0 for r in log[1:])
