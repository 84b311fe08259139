"""Tiny Stable-Diffusion-shaped pipelines built from configs (tests and step benchmarks).

The shapes follow diffusers' own test configs, with the *real* CLIP tokenizer (49,408 tokens,
built offline) so prompts tokenize exactly as they do for SD. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from dynasyn.bpe import clip_tokenizer


def _tiny_vae(sample_size: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A 3-level VAE (factor 4): ``sample_size`` latents ↔ ``4 × sample_size`` px images."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 4,
        scaling_factor=scaling_factor,
    )


def tiny_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 16,
    cross_attention_dim: int = 32,
    layout: str = "sd15",
) -> StableDiffusionPipeline:
    """A randomly initialized SD pipeline: 64 px images, 16×16×4 latents.

    UNet blocks at latent/1, /2, /4 all have cross-attention (so the default regularization
    resolution, latent/4, exists as in SD at 512 px). ``prediction_type`` may be ``epsilon``
    or ``v_prediction`` (SD 2.1's). ``layout="sd21"`` mirrors SD 2.x's differences: linear
    projections in the transformer blocks, per-block head dims, upcast attention, and the
    tokenizer's pad token "!" (id 0) instead of <|endoftext|>. Deterministic for a seed.
    """
    sd21 = layout == "sd21"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 4) if sd21 else 4,
        use_linear_projection=sd21,
        upcast_attention=sd21,
        norm_num_groups=8,
    )
    vae = _tiny_vae(sample_size)
    tokenizer = clip_tokenizer(model_max_length=77)
    if sd21:
        tokenizer.pad_token = "!"
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd21 else 49407,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    sched_kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    scheduler = DDIMScheduler(set_alpha_to_one=False, steps_offset=1, **sched_kwargs)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_xl_pipeline(seed: int = 0, sample_size: int = 16, hidden: int = 32):
    """A randomly initialized SDXL-shaped pipeline (64 px images, 16×16×4 latents).

    As SDXL: no cross-attention in the top (latent/1) blocks, cross-attention at latent/2
    and latent/4 (two transformer layers there), two text encoders (``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``) whose penultimate states concatenate to the
    cross-attention width, ``addition_embed_type="text_time"`` (pooled text + six time ids),
    the second tokenizer padding with "!". Deterministic for a seed.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=2 * hidden,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,
        norm_num_groups=8,
    )
    vae = _tiny_vae(sample_size, scaling_factor=0.13025)  # SDXL's VAE scaling
    tokenizer = clip_tokenizer(model_max_length=77)
    tokenizer_2 = clip_tokenizer(model_max_length=77)
    tokenizer_2.pad_token = "!"

    def config(pad: int) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=pad,
                              hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-05,
                              num_attention_heads=4, num_hidden_layers=3, projection_dim=hidden,
                              vocab_size=len(tokenizer), max_position_embeddings=77,
                              hidden_act="gelu")

    text_encoder = CLIPTextModel(config(49407))
    text_encoder_2 = CLIPTextModelWithProjection(config(0))
    scheduler = DDIMScheduler(set_alpha_to_one=False, steps_offset=1, beta_start=0.00085,
                              beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(path: str | Path, layout: str = "sd15", **kwargs) -> Path:
    """Build :func:`tiny_pipeline` (``layout="sdxl"``: :func:`tiny_xl_pipeline`) and save it
    in diffusers format (safetensors)."""
    path = Path(path)
    pipe = tiny_xl_pipeline(**kwargs) if layout == "sdxl" else tiny_pipeline(layout=layout,
                                                                              **kwargs)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def synthetic_scene(path: str | Path, n: int = 2, size: int = 64, classes=None,
                    margin: int = 2) -> Path:
    """A scene of ``n`` coloured squares on grey, one mask each (tests and benchmarks)."""
    import numpy as np
    from PIL import Image

    from dynasyn.scene import save_scene

    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 128, np.uint8)
    masks = []
    cols = int(np.ceil(np.sqrt(n)))
    cell = size // cols
    for i in range(n):
        r, c = divmod(i, cols)
        m = np.zeros((size, size), np.float32)
        m[r * cell + margin : (r + 1) * cell - margin, c * cell + margin : (c + 1) * cell - margin] = 1
        img[m > 0] = rng.integers(0, 255, 3)
        masks.append(m)
    classes = classes or ["panda", "bowl", "teddy bear", "ball", "cat", "dog"][:n]
    return save_scene(path, Image.fromarray(img), masks, classes, overwrite=True)
