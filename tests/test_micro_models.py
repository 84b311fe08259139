"""The micro models: config sizes, the training script (smoke run, resume), the bundle, check.

Parameter counts of the real configs (``dynasyn.micro.models``):

- micro VAE (AutoencoderKL, blocks 32/64/64, 64x64x3 -> 16x16x4): 954,567
- micro UNet (UNet2DConditionModel, blocks 64/128, cross-attention 48): 4,170,372
- micro text encoder (CLIPTextModel, hidden 48, 4 layers, 49,408 tokens): 2,486,304
- micro CLIP (CLIPModel, the same text tower + ViT 64/8, hidden 96, 4 layers): 2,968,033

The smoke run trains every stage for 1 step at batch 2 into ``tmp_path`` (the real configs,
so the smoke bundle has the real size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dynasyn.checkpoint import list_checkpoints, read_checkpoint
from dynasyn.micro import check as micro_check
from dynasyn.micro import train as micro_train
from dynasyn.micro.models import (
    MAX_TOKENS,
    TEXT_HIDDEN,
    bundle_bytes,
    count_params,
    estimate_bundle_bytes,
    micro_clip,
    micro_text_encoder,
    micro_unet,
    micro_vae,
)

MB = 1_000_000
SMOKE = ["--steps", "1", "--batch", "2", "--no-progress", "--eval-samples", "32",
         "--preview-steps", "0", "--device", "cpu"]


def test_factories_have_the_documented_sizes() -> None:
    with torch.device("meta"):
        vae, unet, te, clip = micro_vae(), micro_unet(), micro_text_encoder(), micro_clip()
    assert count_params(vae) == 954_567
    assert count_params(unet) == 4_170_372
    assert count_params(te) == 2_486_304
    assert count_params(clip) == 2_968_033
    assert vae.config.block_out_channels == (32, 64, 64)
    assert unet.config.sample_size == 16 and unet.config.block_out_channels == (64, 128)
    assert unet.config.cross_attention_dim == TEXT_HIDDEN == te.config.hidden_size
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == MAX_TOKENS
    # the text tower of micro CLIP is the text encoder's config, so it can initialize it
    t = clip.config.text_config.to_dict()
    e = te.config.to_dict()
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "eos_token_id"):
        assert t[k] == e[k], k


def test_bundle_estimate_fits_25_mb() -> None:
    sizes = estimate_bundle_bytes()
    assert sizes["total"] <= 25 * MB, sizes


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(work, out) of a 1-step-per-stage training run."""
    root = tmp_path_factory.mktemp("micro")
    work, out = root / "work", root / "out"
    assert micro_train.main([*SMOKE, "--work", str(work), "--out", str(out)]) == 0
    return work, out


def test_smoke_bundle_loads_and_samples(smoke: tuple[Path, Path]) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    work, out = smoke
    for stage in micro_train.STAGES:
        assert json.loads((work / stage / "final" / "done.json").read_text())["step"] == 1
    # stock loaders, no dtype given: fp16 files, fp32 models
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.tokenizer.model_max_length == MAX_TOKENS and len(pipe.tokenizer) == 49408
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the latents
    # no trace of the training machine's directories in the configs
    assert not [f for f in (out / "sd").rglob("config.json") if "_name_or_path" in f.read_text()]
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red striped star is jumping", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    with safe_open(str(out / "sd" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16

    clip = CLIPModel.from_pretrained(out / "clip")
    assert clip.dtype == torch.float32
    proc = CLIPProcessor.from_pretrained(out / "clip")
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:30, 20:40] = (220, 40, 40)
    batch = proc(images=[image], text=["a red cube"], return_tensors="pt")
    ours = micro_train.clip_pixels(micro_train.images_to_tensor([image]))
    assert torch.allclose(batch["pixel_values"], ours, atol=1e-5)
    with torch.no_grad():
        out_ = clip(**batch)
    assert out_.logits_per_image.shape == (1, 1)
    assert bundle_bytes(out) <= 25 * MB


def test_resume_continues_the_step_count(
    smoke: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    work, out = smoke
    args = [*SMOKE, "--stage", "vae", "--work", str(work), "--out", str(out)]
    with pytest.raises(SystemExit, match="--resume"):
        micro_train.main(args)  # refuses to overwrite an earlier run's checkpoints
    args[args.index("--steps") + 1] = "2"
    assert micro_train.main([*args, "--resume"]) == 0
    assert "(step 1," in capsys.readouterr().out
    assert list_checkpoints(work / "vae" / "checkpoints")[-1].name == "step-0000002"
    assert json.loads((work / "vae" / "final" / "done.json").read_text())["step"] == 2


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_continuation_from_bundle_and_decoder_fine_tuning(
    smoke: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    _, built = smoke
    out = tmp_path / "out"
    shutil.copytree(built, out)
    sd = out / "sd"
    before = {p: _tensors(sd / p) for p in ("unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors")}
    common = [*SMOKE, "--work", str(tmp_path / "work"), "--out", str(out)]
    # --from-bundle starts from the bundled UNet: with lr 0 it comes back bit-identical
    assert micro_train.main([*common, "--stage", "unet", "--from-bundle", "--lr", "0",
                             "--continuation", "3"]) == 0
    unet = _tensors(sd / "unet/diffusion_pytorch_model.safetensors")
    ref = before["unet/diffusion_pytorch_model.safetensors"]
    assert unet.keys() == ref.keys() and all(torch.equal(unet[k], ref[k]) for k in ref)
    # the third continuation's checkpoint says so; a resume draws the same shifted seeds
    state = read_checkpoint(list_checkpoints(tmp_path / "work" / "unet" / "checkpoints")[-1])[0]
    assert state["from_bundle"] and state["continuation"] == 3
    assert micro_train.batch_seeds("unet", 0, 2, 3 * micro_train.CONTINUATION_SEED_OFFSET) == [
        micro_train.PLAN["unet"].seed_base + 150_000_000 + i for i in range(2)]
    # the decoder stage changes the decoder and leaves the encoder (the UNet's latents) alone
    assert micro_train.main([*common, "--stage", "decoder", "--steps", "2"]) == 0
    vae = _tensors(sd / "vae/diffusion_pytorch_model.safetensors")
    ref = before["vae/diffusion_pytorch_model.safetensors"]
    enc = [k for k in ref if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in ref if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and all(torch.equal(vae[k], ref[k]) for k in enc)
    assert sum(not torch.equal(vae[k], ref[k]) for k in dec) > len(dec) // 2
    # a decoder tuned on another encoder is not bundled with this UNet
    from diffusers import AutoencoderKL

    tuned = tmp_path / "work" / "decoder" / "final"
    other = AutoencoderKL.from_pretrained(tuned)
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.5)
    other.save_pretrained(tuned)
    capsys.readouterr()
    micro_train.export_bundle(tmp_path / "work", out)
    assert "another encoder" in capsys.readouterr().err
    vae = _tensors(sd / "vae/diffusion_pytorch_model.safetensors")
    assert torch.equal(vae["encoder.conv_in.weight"], ref["encoder.conv_in.weight"])


def test_from_bundle_needs_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = micro_train.main([*SMOKE, "--stage", "unet", "--from-bundle",
                             "--work", str(tmp_path / "w"), "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no bundled model at" in err[0]
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as e:  # argparse: usage and one error line, exit 2
        micro_train.main([*SMOKE, "--stage", "unet", "--from-bundle", "--continuation", "9",
                          "--work", str(tmp_path / "w"), "--out", str(tmp_path / "none")])
    assert e.value.code == 2 and "--continuation must be 1 to 5" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_batches_are_deterministic_with_hard_negatives() -> None:
    tok = micro_train.micro_tokenizer()
    ds = micro_train.ClipBatches(4, tok)
    a, b = ds[7], ds[7]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixels"], b["pixels"])
    assert a["input_ids"].shape[0] > 4  # hard negatives after the 4 captions
    assert not a["i2t_mask"].diagonal().any()
    seeds = micro_train.batch_seeds("unet", 10**6, 32)
    assert max(seeds) < micro_train.TRAIN_SEED_LIMIT <= micro_check.HELDOUT_SEED


def test_hard_negatives_give_every_subject_a_pattern_negative_and_a_pattern_swap() -> None:
    from dynasyn.micro.world import Identity, SceneSpec, caption_for, parse_caption

    spec = SceneSpec((Identity("star", "red", "striped"), Identity("ball", "blue", "dotted")),
                     relation="next to")
    negs = micro_train.hard_negatives(spec, "phrase", np.random.default_rng(0))
    true = [(m.shape, m.colour, m.pattern) for m in parse_caption(caption_for(spec, "phrase")).subjects]
    diffs = []  # indices of the changed subjects, for every negative that differs in patterns only
    for c in negs:
        got = [(m.shape, m.colour, m.pattern) for m in parse_caption(c).subjects]
        if [g[:2] for g in got] == [t[:2] for t in true] and got != true:
            diffs.append(tuple(i for i, (g, t) in enumerate(zip(got, true, strict=True)) if g != t))
    assert (0,) in diffs and (1,) in diffs  # each subject's pattern changed on its own
    assert "a red dotted star is next to a blue striped ball" in negs  # the binding swap
    assert len(negs) == len(set(negs)) and caption_for(spec, "phrase") not in negs
    # patterns a caption or a render does not show get no pattern negatives
    for mode, bg in (("class", "plain"), ("phrase", "sketch"), ("phrase", "grayscale")):
        s = SceneSpec(spec.subjects, relation="next to", background=bg)
        negs = micro_train.hard_negatives(s, mode, np.random.default_rng(0))
        pats = {m.pattern for c in negs for m in parse_caption(c).subjects}
        assert pats <= {m.pattern for m in parse_caption(caption_for(s, mode)).subjects}


def test_check_runs_on_the_smoke_bundle(
    smoke: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = smoke
    png = out.parent / "samples.png"
    res = micro_check.run_check(n=4, weights=out, steps=2, progress=False, samples_png=png)
    fig = np.asarray(Image.open(png).convert("RGB"))
    assert fig.shape == (2 * (2 * 128 + 48), 8 * 128, 3)
    first = micro_check.heldout_captions(4)[0].image  # top-left: the world's render, 2x
    assert np.array_equal(fig[:128:2, :128:2], first)
    assert set(res.clip) == set(micro_check.ATTRIBUTES)
    assert 0.0 <= res.sd["clip_overall"] <= 1.0
    assert res.renders["parser_class_colour"] >= 0.75  # ground truth parses
    assert set(res.reconstructions) == set(res.renders)  # the VAE round trip, judged alike
    assert "VAE rec." in res.table()
    assert micro_check.main(["--n", "2", "--steps", "1", "--weights", str(out),
                             "--clip-only"]) == 0
    assert "micro CLIP" in capsys.readouterr().out


_BUNDLED = (Path(__file__).resolve().parents[1] / "src/dynasyn/micro/weights/sd/model_index.json")


@pytest.mark.skipif(not _BUNDLED.exists(), reason="the micro model is not bundled yet")
def test_bundled_micro_model_loads_offline_and_samples(monkeypatch) -> None:
    """`--model micro` resolves to the bundled weights; stock loaders give a working pipeline."""
    from transformers import CLIPModel

    from dynasyn.models import load_pipeline, micro_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline("micro")
    assert pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red striped star is jumping", num_inference_steps=5,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    clip = CLIPModel.from_pretrained(micro_model_path().parent / "clip")
    assert clip.config.text_config.vocab_size == 49408
    weights = micro_model_path().parent
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
             for d in weights.iterdir() if d.is_dir()}
    assert sizes["sd"] + sizes["clip"] <= 25 * 2**20, sizes  # the micro model: SD + CLIP
    assert sizes.get("dynamicid", 0) <= 10 * 10**6, sizes  # the zero-shot adapter, on its own


@pytest.mark.skipif(not _BUNDLED.exists(), reason="the micro model is not bundled yet")
def test_bundled_vae_reconstructs_renders() -> None:
    """The check's "VAE rec." column: the bundled VAE's round trip keeps a render's pixels."""
    renders = micro_check.heldout_captions(6)
    truth = np.stack([r.image for r in renders])
    rec = micro_check.vae_reconstructions(_BUNDLED.parent, truth, torch.device("cpu"))
    assert rec.shape == truth.shape and rec.dtype == np.uint8
    err = np.abs(rec.astype(np.int16) - truth.astype(np.int16)).mean()
    assert err < 8.0, err
    other = np.abs(rec.astype(np.int16) - truth[::-1].astype(np.int16)).mean()
    assert other > 2 * err  # each decoding follows its own render
