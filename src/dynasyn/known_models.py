"""The component configs of a few public Stable Diffusion checkpoints (shapes only, no weights).

``dynasyn train --estimate-memory --model HUB_ID`` uses them when the hub id is one of these
and its configs are not on disk, so the estimate needs no download. Only the keys that differ
from diffusers' / transformers' defaults and decide the parameter shapes are given; the
parameter counts they build are checked in tests/test_memory.py against the published ones.
"""

from __future__ import annotations

from typing import Any

_SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)

_SD1_UNET: dict[str, Any] = dict(
    in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)

_CLIP_L: dict[str, Any] = dict(  # OpenAI CLIP ViT-L/14 text tower (SD 1.x, SDXL's first)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)

_OPENCLIP_H: dict[str, Any] = dict(  # OpenCLIP ViT-H/14 text tower, 23 of its 24 layers (SD 2.x)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)

_OPENCLIP_BIGG: dict[str, Any] = dict(  # OpenCLIP ViT-bigG/14 text tower (SDXL's second)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)

_SD2_UNET: dict[str, Any] = dict(
    _SD1_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
)

_SDXL_UNET: dict[str, Any] = dict(
    in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _sd(unet: dict[str, Any], te: dict[str, Any], size: int) -> dict[str, Any]:
    return {"kind": "sd", "unet": dict(unet, sample_size=size // 8), "text_encoder": te,
            "vae": _SD_VAE}


KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _sd(_SD1_UNET, _CLIP_L, 512),
    "runwayml/stable-diffusion-v1-5": _sd(_SD1_UNET, _CLIP_L, 512),
    "CompVis/stable-diffusion-v1-4": _sd(_SD1_UNET, _CLIP_L, 512),
    "stabilityai/stable-diffusion-2-1-base": _sd(_SD2_UNET, _OPENCLIP_H, 512),
    "stabilityai/stable-diffusion-2-1": _sd(_SD2_UNET, _OPENCLIP_H, 768),
    "stabilityai/stable-diffusion-2-base": _sd(_SD2_UNET, _OPENCLIP_H, 512),
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "kind": "sdxl", "unet": dict(_SDXL_UNET, sample_size=128), "text_encoder": _CLIP_L,
        "text_encoder_2": _OPENCLIP_BIGG, "vae": _SD_VAE,
    },
}
"""Hub id -> {"kind": "sd" | "sdxl", "unet", "text_encoder"[, "text_encoder_2"], "vae"}."""
