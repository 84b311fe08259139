"""The ID encoder: a small ViT on the subject crop and a resampler to 4 ID tokens.

:class:`IDEncoder` = a transformers ``CLIPVisionModelWithProjection`` (for the micro model:
micro CLIP's vision tower, 64x64 input, patch 8, hidden 96 — :func:`micro_id_encoder` starts
from the bundled weights) + :class:`Resampler`. The resampler has the layout of the official
``proj_module`` (IP-Adapter-FaceID-Plus): a global identity embedding is projected to
``num_tokens`` initial tokens (``proj`` + ``norm``), which a perceiver resampler then refines
by attending to the tower's patch features (``perceiver_resampler``). The official model feeds
the projection a face-recognition embedding and the perceiver CLIP ViT-H's penultimate states;
ours feeds it the tower's own projected image embedding and penultimate states (there is no
face recognizer for the micro world's subjects, and one tower keeps the bundle small).

The input is a *subject crop* (:func:`subject_crop`): the mask's bounding square with a margin,
the background outside the mask replaced by a neutral grey (the CLIP mean colour, which
normalizes to about zero), resized to the tower's input size. The unconditional tokens (for
classifier-free guidance and the training's ID dropout) are the encoder's output for an
all-zero normalized image (:meth:`IDEncoder.uncond_tokens`), as in the official pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

__all__ = [
    "CROP_MARGIN",
    "IDEncoder",
    "Resampler",
    "build_id_encoder",
    "micro_id_encoder",
    "pixels_from_crops",
    "subject_crop",
]

CROP_MARGIN = 0.12
"""Margin around the mask's bounding square, as a fraction of its side (each side)."""

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FILL = tuple(int(round(255 * m)) for m in _CLIP_MEAN)
"""Colour put outside the subject's mask in a crop (normalizes to about 0)."""


def subject_crop(image: np.ndarray | Image.Image, mask: np.ndarray | None, size: int = 64,
                 margin: float = CROP_MARGIN) -> Image.Image:
    """The reference crop of one subject: bounding square of ``mask`` (>= 0.5) with ``margin``,
    pixels outside the mask set to :data:`FILL`, resized to ``size`` x ``size`` (bicubic).

    ``mask`` None (a separate reference image) takes the whole image, padded to a square with
    :data:`FILL`. Raises ValueError for an empty mask or a mask of another size.
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    h, w = img.shape[:2]
    if mask is None:
        m = np.ones((h, w), bool)
    else:
        m = np.asarray(mask)
        if m.shape != (h, w):
            raise ValueError(f"mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}")
        m = m >= (0.5 if m.dtype != np.uint8 else 128)
    if not m.any():
        raise ValueError("the mask is empty")
    ys, xs = np.nonzero(m)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + 2 * margin)
    side = max(int(np.ceil(side)), 1)
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = FILL
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + side, h), min(x0 + side, w)
    patch = np.where(m[sy0:sy1, sx0:sx1, None], img[sy0:sy1, sx0:sx1], np.array(FILL, np.uint8))
    canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = patch
    return Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC)


def pixels_from_crops(crops: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL crops -> CLIP-normalized pixel values (B, 3, size, size), float32."""
    arr = np.stack([np.asarray(c.convert("RGB").resize((size, size), Image.Resampling.BICUBIC),
                               dtype=np.float32) / 255.0 for c in crops])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (keys 0, 1, 3 as in the official resampler)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (Flamingo's perceiver attention)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, dim) image features, ``latents`` (B, L, dim) -> (B, L, dim)."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, n_lat, _ = latents.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q = split(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n_lat, -1))


class PerceiverResampler(nn.Module):
    """``proj_in`` -> ``depth`` x (perceiver attention + feed-forward, residual) -> ``proj_out``
    -> ``norm_out``."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Refine ``latents`` (B, L, dim) with image features ``x`` (B, N, embedding_dim)."""
        x = self.proj_in(x)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class Resampler(nn.Module):
    """Identity embedding + patch features -> ``num_tokens`` ID tokens of ``cross_attention_dim``.

    Parameter layout of the official ``proj_module`` (``proj.0``, ``proj.2``, ``norm``,
    ``perceiver_resampler.*``), so an official ``proj_module`` loads when the sizes agree.
    """

    def __init__(self, cross_attention_dim: int, id_embeddings_dim: int,
                 clip_embeddings_dim: int, num_tokens: int = 4, depth: int = 4,
                 dim_head: int = 64, heads: int | None = None, ff_mult: int = 4) -> None:
        super().__init__()
        self.config = dict(cross_attention_dim=cross_attention_dim,
                           id_embeddings_dim=id_embeddings_dim,
                           clip_embeddings_dim=clip_embeddings_dim, num_tokens=num_tokens,
                           depth=depth, dim_head=dim_head,
                           heads=heads or max(1, cross_attention_dim // dim_head),
                           ff_mult=ff_mult)
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, 2 * id_embeddings_dim), nn.GELU(),
            nn.Linear(2 * id_embeddings_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = PerceiverResampler(
            cross_attention_dim, depth, dim_head, self.config["heads"], clip_embeddings_dim,
            cross_attention_dim, ff_mult)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        """(B, id_dim), (B, N, clip_dim) -> ID tokens (B, num_tokens, cross_attention_dim)."""
        x = self.norm(self.proj(id_embeds).view(-1, self.num_tokens, self.cross_attention_dim))
        return self.perceiver_resampler(x, clip_embeds)


class IDEncoder(nn.Module):
    """Subject crop -> ID tokens: a CLIP vision tower (with projection) and a
    :class:`Resampler` over its projected embedding and penultimate hidden states."""

    def __init__(self, vision: CLIPVisionModelWithProjection, resampler: Resampler) -> None:
        super().__init__()
        self.vision = vision
        self.resampler = resampler

    @property
    def image_size(self) -> int:
        """Side of the tower's input images."""
        return int(self.vision.config.image_size)

    @property
    def num_tokens(self) -> int:
        """ID tokens per identity."""
        return self.resampler.num_tokens

    def config_dict(self) -> dict[str, Any]:
        """What :func:`build_id_encoder` needs to rebuild this encoder."""
        return {"vision": self.vision.config.to_dict(), "resampler": dict(self.resampler.config)}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized pixels (B, 3, S, S) -> ID tokens (B, num_tokens, cross_dim)."""
        dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        return self.resampler(out.image_embeds, out.hidden_states[-2])

    def encode(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        """PIL subject crops -> ID tokens (B, num_tokens, cross_dim) on the encoder's device."""
        device = next(self.parameters()).device
        return self(pixels_from_crops(crops, self.image_size).to(device))

    def uncond_tokens(self, batch: int = 1) -> torch.Tensor:
        """The tokens of an all-zero normalized image (classifier-free guidance, ID dropout)."""
        p = next(self.parameters())
        x = torch.zeros(1, 3, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
        return self(x).expand(batch, -1, -1)


def build_id_encoder(config: dict[str, Any]) -> IDEncoder:
    """An encoder with random weights from :meth:`IDEncoder.config_dict` output."""
    vcfg = dict(config["vision"])
    vcfg.pop("transformers_version", None)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg))
    return IDEncoder(vision, Resampler(**config["resampler"]))


def default_resampler_config(cross_attention_dim: int, vision: CLIPVisionConfig,
                             num_tokens: int = 4) -> dict[str, Any]:
    """Resampler sizes for a tower: depth 4, heads of 64 for wide models; for narrow ones
    (the micro model's 48) depth 2 with 4 heads."""
    if cross_attention_dim >= 256:
        depth, dim_head, heads = 4, 64, cross_attention_dim // 64
    else:
        depth, heads = 2, 4
        dim_head = max(8, cross_attention_dim // heads)
    return dict(cross_attention_dim=cross_attention_dim,
                id_embeddings_dim=int(vision.projection_dim),
                clip_embeddings_dim=int(vision.hidden_size), num_tokens=num_tokens,
                depth=depth, dim_head=dim_head, heads=heads, ff_mult=4)


def micro_id_encoder(cross_attention_dim: int, clip_path: Any = None,
                     num_tokens: int = 4) -> IDEncoder:
    """An ID encoder whose tower starts from micro CLIP's vision tower (the bundled one, or
    ``clip_path``); random tower weights, with a warning, when there is none."""
    import sys
    from pathlib import Path

    from transformers import CLIPModel

    from dynasyn.micro.models import micro_clip_config, micro_clip_path

    path = Path(clip_path) if clip_path is not None else micro_clip_path()
    clip = None
    if (path / "config.json").exists():
        clip = CLIPModel.from_pretrained(path, dtype=torch.float32)
        cfg = clip.config
    else:
        print(f"warning: no micro CLIP at {path}; the ID encoder's tower starts from scratch",
              file=sys.stderr)
        cfg = micro_clip_config()
    vcfg = cfg.vision_config
    vcfg.projection_dim = cfg.projection_dim
    vision = CLIPVisionModelWithProjection(vcfg)
    if clip is not None:
        vision.vision_model.load_state_dict(clip.vision_model.state_dict())
        vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    res = Resampler(**default_resampler_config(cross_attention_dim, vcfg, num_tokens))
    return IDEncoder(vision, res)


def tiny_id_encoder(cross_attention_dim: int, image_size: int = 64, seed: int = 0) -> IDEncoder:
    """A small random encoder (tests): tower hidden 32, 2 layers, patch 16."""
    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(image_size=image_size, patch_size=16, hidden_size=32,
                            intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                            projection_dim=32)
    vision = CLIPVisionModelWithProjection(vcfg)
    return IDEncoder(vision, Resampler(**default_resampler_config(cross_attention_dim, vcfg)))
