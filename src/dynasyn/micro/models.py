"""Configs of the micro models and the bundle writer (micro Stable Diffusion + micro CLIP).

The micro Stable Diffusion is an ordinary diffusers ``StableDiffusionPipeline`` — an
``AutoencoderKL``, a ``UNet2DConditionModel``, a ``CLIPTextModel`` with the real CLIP BPE
tokenizer (49,408 tokens) and SD's scheduler settings — only small, for the 64x64 images of the
micro world (:mod:`dynasyn.micro.world`). The micro CLIP is an ordinary transformers
``CLIPModel`` whose text tower has exactly the micro text encoder's config, so the trained
tower initializes the micro SD text encoder (:mod:`dynasyn.micro.train`).

Sizes (parameters; bytes as stored in fp16):

==========================  ==============================================  ==========  =======
model                       shape                                           params      fp16
==========================  ==============================================  ==========  =======
:func:`micro_vae`           64x64x3 -> 16x16x4, blocks (32, 64, 64), 1 layer   954,567    1.9 MB
:func:`micro_unet`          16x16 latents, blocks (64, 128), cross-attn in  4,170,372    8.3 MB
                            both (4 heads), cross_attention_dim 48
:func:`micro_text_encoder`  hidden 48, 4 layers, 4 heads, 32 positions,     2,486,304    5.0 MB
                            49,408 tokens (95 % of it the token table)
:func:`micro_clip`          text tower = the text encoder's config; vision  2,968,033    5.9 MB
                            64x64, patch 8, hidden 96, 4 layers; proj 64
tokenizer (x2)              ``vocab.json`` + ``merges.txt``                                 1.4 MB
==========================  ==============================================  ==========  =======

Bundle total 24.0 MB (:func:`estimate_bundle_bytes`, and measured; issue 4 allows 25 MB).
The text width is 48, not the 64 of the first design: with 64, the two copies of the
49,408-row token table (SD's text encoder and CLIP's text tower; stock ``from_pretrained``
needs each directory to be complete) plus the UNet would pass 25 MB.

The bundle (:func:`save_bundle`) stores every floating tensor in fp16 while the configs say
float32, so stock ``StableDiffusionPipeline.from_pretrained(path)`` and
``CLIPModel.from_pretrained(path)`` build fp32 models (CPU inference) and upcast the weights.
The tokenizer is saved as ``vocab.json`` + ``merges.txt`` (1.4 MB) rather than the 3.6 MB
``tokenizer.json``; transformers rebuilds the fast tokenizer from them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from dynasyn.atomic import replace_dir
from dynasyn.config import umask_mode
from dynasyn.errors import InputError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "TEXT_HIDDEN",
    "assemble_pipeline",
    "count_params",
    "estimate_bundle_bytes",
    "micro_clip",
    "micro_clip_config",
    "micro_clip_path",
    "micro_image_processor",
    "micro_scheduler",
    "micro_scheduler_config",
    "micro_text_config",
    "micro_text_encoder",
    "micro_tokenizer",
    "micro_unet",
    "micro_vae",
    "micro_weights_path",
    "save_bundle",
    "save_tokenizer",
    "text_encoder_from_clip",
]

IMAGE_SIZE = 64
"""Side of the micro world's images (pixels)."""

LATENT_SIZE = 16
"""Side of the micro SD latents (the VAE downsamples 4x)."""

TEXT_HIDDEN = 48
"""Width of the text encoder / CLIP text tower = the UNet's ``cross_attention_dim``."""

MAX_TOKENS = 32
"""Token positions of the text encoders (and the tokenizer's ``model_max_length``)."""

VOCAB_SIZE = 49408
"""The real CLIP BPE vocabulary."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's image normalization mean (kept, so CLIPImageProcessor defaults apply)."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's image normalization std."""

TOKENIZER_BYTES = 862_328 + 524_619 + 300
"""``vocab.json`` + ``merges.txt`` + config of the saved tokenizer."""


def micro_weights_path() -> Path:
    """Directory of the bundled micro weights (``sd/`` and ``clip/`` inside)."""
    return Path(__file__).parent / "weights"


def micro_clip_path() -> Path:
    """Directory of the bundled micro CLIP (transformers ``CLIPModel`` + tokenizer)."""
    return micro_weights_path() / "clip"


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Configs


def micro_vae() -> AutoencoderKL:
    """AutoencoderKL 64x64x3 -> 16x16x4: blocks (32, 64, 64), one layer each (954,567 params)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1 / std of the trained VAE's latents
    )


def micro_unet() -> UNet2DConditionModel:
    """UNet2DConditionModel on 16x16x4 latents: blocks (64, 128) with cross-attention in both
    (and in the mid block), 4 heads, ``cross_attention_dim`` = :data:`TEXT_HIDDEN`
    (4,170,372 params)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=4,  # diffusers' name for the number of heads
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=32,
    )


def micro_text_config() -> CLIPTextConfig:
    """The text encoder's config (also micro CLIP's text tower): hidden 48, 4 layers, 4 heads,
    MLP 192, 32 positions, the 49,408-token CLIP vocabulary."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=64,
    )


def micro_text_encoder() -> CLIPTextModel:
    """CLIPTextModel of :func:`micro_text_config` (2,486,304 params)."""
    return CLIPTextModel(micro_text_config())


def micro_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer with ``model_max_length`` 32.

    Built offline from open_clip's vocabulary file (:func:`dynasyn.bpe.clip_tokenizer`); when
    that is not installed, taken from the bundled micro model's ``tokenizer/`` (the same one).
    """
    from dynasyn.bpe import clip_tokenizer

    try:
        return clip_tokenizer(model_max_length=MAX_TOKENS)
    except InputError:
        bundled = micro_weights_path() / "sd" / "tokenizer"
        if not (bundled / "vocab.json").exists():
            raise
        tok = CLIPTokenizer.from_pretrained(bundled)
        tok.model_max_length = MAX_TOKENS
        return tok


def micro_scheduler_config() -> dict[str, Any]:
    """SD's noise schedule: scaled_linear betas 0.00085-0.012, 1000 steps, epsilon prediction.

    Valid for ``DDPMScheduler`` (training) and ``DDIMScheduler`` (the bundled sampler).
    """
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def micro_scheduler() -> DDIMScheduler:
    """The bundled sampler: DDIM with :func:`micro_scheduler_config`."""
    return DDIMScheduler(**micro_scheduler_config())


def micro_clip_config() -> CLIPConfig:
    """Micro CLIP: text tower = :func:`micro_text_config`; vision tower on 64x64 images,
    patch 8 (64 patches + CLS), hidden 96, 4 layers, 4 heads; projection 64."""
    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 96,
        "intermediate_size": 384,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return CLIPConfig(
        text_config=micro_text_config().to_dict(),
        vision_config=vision,
        projection_dim=64,
        logit_scale_init_value=2.6592,
    )


def micro_clip() -> CLIPModel:
    """CLIPModel of :func:`micro_clip_config` (2,968,033 params)."""
    return CLIPModel(micro_clip_config())


def micro_image_processor() -> CLIPImageProcessor:
    """Image preprocessing of micro CLIP: resize + center-crop to 64, CLIP normalization."""
    import warnings

    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()  # the "requires torchvision, falling back to PIL" notice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CLIPImageProcessor(
                size={"shortest_edge": IMAGE_SIZE},
                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                image_mean=list(CLIP_MEAN),
                image_std=list(CLIP_STD),
            )
    finally:
        tlog.set_verbosity(level)


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """A micro text encoder initialized with ``clip``'s text tower (identical configs)."""
    te = micro_text_encoder()
    te.load_state_dict(clip.text_model.state_dict())
    return te


def assemble_pipeline(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from the parts (no safety checker, DDIM by default)."""
    return StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler or micro_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------------
# Saving


def save_tokenizer(tokenizer: CLIPTokenizer, path: str | Path) -> Path:
    """Save a CLIP tokenizer as ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``.

    1.4 MB instead of the 3.6 MB ``tokenizer.json`` that ``save_pretrained`` writes;
    ``CLIPTokenizer.from_pretrained`` / ``AutoTokenizer`` rebuild the same tokenizer.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        model = json.loads((Path(tmp) / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    (path / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    config["model_max_length"] = int(tokenizer.model_max_length)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def _to_fp16_files(root: Path) -> None:
    """Rewrite every ``*.safetensors`` under ``root`` with floating tensors in fp16."""
    for f in root.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            meta = s.metadata() or {"format": "pt"}
        tensors = load_file(str(f))
        half = {
            k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
            for k, v in tensors.items()
        }
        save_file(half, str(f), metadata=meta)


def _drop_local_paths(root: Path) -> None:
    """Remove ``_name_or_path`` (the directory a model was loaded from on the machine that
    trained it) from every ``config.json`` under ``root``: it is no part of the model."""
    for f in root.rglob("config.json"):
        cfg = json.loads(f.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, replacing any previous content.

    Two renames: a reader sees the old directory, none, or the new one — never half of one.
    """
    tmp.chmod(0o755)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    replace_dir(tmp, final)


def save_bundle(
    out: str | Path,
    *,
    vae: AutoencoderKL | None = None,
    unet: UNet2DConditionModel | None = None,
    text_encoder: CLIPTextModel | None = None,
    tokenizer: CLIPTokenizer | None = None,
    clip: CLIPModel | None = None,
) -> dict[str, Path]:
    """Write the bundle under ``out``: ``sd/`` (all four SD parts given) and/or ``clip/``.

    Each directory is written under a temporary name and renamed into place when complete
    (:func:`_replace_dir`), so a reader never sees half a bundle. Floating weights are stored
    in fp16, configs stay float32 (stock ``from_pretrained`` gives fp32 models). Returns the
    written directories by name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or micro_tokenizer()
    written: dict[str, Path] = {}
    sd_parts = (vae, unet, text_encoder)
    if any(p is not None for p in sd_parts):
        if not all(p is not None for p in sd_parts):
            raise ValueError("the SD bundle needs vae, unet and text_encoder together")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-sd-", dir=out))
        tmp.chmod(umask_mode(0o777))
        pipe = assemble_pipeline(vae, unet, text_encoder, tok)  # type: ignore[arg-type]
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "tokenizer")
        save_tokenizer(tok, tmp / "tokenizer")
        _to_fp16_files(tmp)
        _drop_local_paths(tmp)
        _replace_dir(tmp, out / "sd")
        written["sd"] = out / "sd"
    if clip is not None:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-clip-", dir=out))
        tmp.chmod(umask_mode(0o777))
        clip.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        proc = micro_image_processor().to_dict()
        proc.pop("processor_class", None)
        (tmp / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
        _to_fp16_files(tmp)
        _replace_dir(tmp, out / "clip")
        written["clip"] = out / "clip"
    return written


def bundle_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def estimate_bundle_bytes() -> dict[str, int]:
    """Bytes the bundle of the real configs takes: fp16 weights + tokenizers (+ 64 KB configs).

    Builds the models on the meta device (instant, no memory).
    """
    with torch.device("meta"):
        sizes = {
            "vae": 2 * count_params(micro_vae()),
            "unet": 2 * count_params(micro_unet()),
            "text_encoder": 2 * count_params(micro_text_encoder()),
            "clip": 2 * count_params(micro_clip()),
        }
    sizes["tokenizers"] = 2 * TOKENIZER_BYTES
    sizes["configs"] = 64 * 1024
    sizes["total"] = sum(sizes.values())
    return sizes
