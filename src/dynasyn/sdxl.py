"""What SDXL changes for training: two text encoders, pooled embeddings, ``add_time_ids``.

SDXL conditions its UNet on the penultimate hidden states of *both* CLIP text encoders,
concatenated on the feature axis (768 + 1280 = 2048 features for SDXL 1.0), plus
``added_cond_kwargs``: the pooled, projected output of the second encoder (``text_embeds``)
and six size/crop numbers (``time_ids``: original size, crop corner, target size). This
module encodes prompts exactly as ``StableDiffusionXLPipeline.encode_prompt`` does (no
clip skip), so the trainer's conditioning is the pipeline's at generation.

The placeholders get rows in both encoders' embedding tables (the two tokenizers share
CLIP's BPE vocabulary, so the placeholder tokens get the same ids in both); token
positions — and so the attention losses' token weights — are the same for both encoders.
Only the padding differs: SDXL's second tokenizer pads with "!" (id 0).

SD 1.x / 2.x pipelines take the plain path: one encoder, the last hidden state, no added
conditioning. :class:`Conditioning` carries either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Conditioning", "add_time_ids", "cat_conditioning", "encode_ids", "is_xl",
           "pipe_conditioning", "second_ids"]


def is_xl(pipe_or_modules: Any) -> bool:
    """True for an SDXL pipeline (it has a second text encoder)."""
    return getattr(pipe_or_modules, "text_encoder_2", None) is not None


@dataclass
class Conditioning:
    """The UNet's text conditioning: ``hidden`` (B, T, D); for SDXL also ``pooled`` (B, P)
    and ``time_ids`` (B, 6)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def detach(self) -> Conditioning:
        return self._map(lambda x: x.detach())

    def _map(self, fn) -> Conditioning:
        return Conditioning(*(None if x is None else fn(x)
                              for x in (self.hidden, self.pooled, self.time_ids)))

    def repeat(self, n: int) -> Conditioning:
        """The batch tiled ``n`` times (as ``Tensor.repeat`` on the batch axis)."""
        return self._map(lambda x: x.repeat(n, *[1] * (x.dim() - 1)))

    def row(self, i: int) -> Conditioning:
        """Batch row ``i`` alone (batch size 1)."""
        return self._map(lambda x: x[i : i + 1])

    def to(self, dtype: torch.dtype) -> Conditioning:
        return self._map(lambda x: x.to(dtype))

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``unet(z, t, **kwargs)``."""
        kw: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw


def cat_conditioning(items: Sequence[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch axis."""
    def cat(xs):
        return None if xs[0] is None else torch.cat(xs)

    return Conditioning(cat([c.hidden for c in items]), cat([c.pooled for c in items]),
                        cat([c.time_ids for c in items]))


def add_time_ids(resolution: int, batch: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for a square image seen whole: (original size, crop corner
    (0, 0), target size), as the pipeline passes for ``height = width = resolution``."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return row[None].repeat(batch, 1).to(device)


def second_ids(input_ids: torch.Tensor, pad_id: int, eos_id: int) -> torch.Tensor:
    """The second tokenizer's ids for the same prompt: every position after the first EOS
    becomes its pad id (SDXL's ``tokenizer_2`` pads with "!", the first with EOS)."""
    out = input_ids.clone()
    for row in out.view(-1, out.shape[-1]):
        eos = (row == eos_id).nonzero()
        if len(eos):
            row[int(eos[0]) + 1:] = pad_id
    return out


def encode_ids(text_encoders: Sequence[Any], ids: torch.Tensor, pad_2: int | None = None,
               eos: int | None = None, resolution: int | None = None) -> Conditioning:
    """Encode token ids (B, T) with one encoder (SD: its last hidden state) or two (SDXL:
    both penultimate hidden states concatenated, the second encoder's pooled projection,
    ``add_time_ids`` for ``resolution``), as diffusers' pipelines do."""
    if len(text_encoders) == 1:
        return Conditioning(text_encoders[0](ids)[0])
    te1, te2 = text_encoders
    h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(second_ids(ids, pad_2, eos), output_hidden_states=True)
    hidden = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
    return Conditioning(hidden, out2[0], add_time_ids(resolution, ids.shape[0], ids.device))


def pipe_conditioning(pipe: Any, ids: torch.Tensor) -> Conditioning:
    """:func:`encode_ids` with a pipeline's own text encoder(s), at its default resolution
    (SDXL's time ids for ``unet.sample_size × vae_scale_factor``)."""
    device = pipe.unet.device
    if not is_xl(pipe):
        return encode_ids([pipe.text_encoder], ids.to(device))
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return encode_ids([pipe.text_encoder, pipe.text_encoder_2], ids.to(device),
                      pad_2=pipe.tokenizer_2.pad_token_id, eos=pipe.tokenizer.eos_token_id,
                      resolution=side)
