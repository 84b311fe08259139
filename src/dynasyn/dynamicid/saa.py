r"""Semantic-Activated Attention (SAA): DynamicID's attention adapter, as diffusers processors.

Every cross-attention layer (``attn2``) of the UNet gets a :class:`SAAProcessor`: beside the
text keys / values it projects the *ID tokens* (4 per identity, from
:class:`~dynasyn.dynamicid.encoder.IDEncoder`) with its own ``to_k_ip`` / ``to_v_ip`` and adds
the attention over them to the text attention's output, per query, weighted by the
*activation gate* (:func:`activation_gate`). Every attention layer (self- and cross-) carries a
rank-4 LoRA on ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` (:class:`LoRALinear`); self-attention
layers get a :class:`LoRASelfAttnProcessor`. The parameter names are the official checkpoint
layout's (``to_k_ip.weight``, ``to_q_lora.down.weight``, ...; :mod:`dynasyn.dynamicid.official`).

The processors are installed with ``unet.set_attn_processor`` (:func:`install_saa`); the UNet is
not forked. The ID tokens travel *appended to the text embeddings* (``encoder_hidden_states``
= text tokens, then ``num_ids x num_tokens`` ID tokens, as in the official code), and one
:class:`SAAContext` shared by all processors of a UNet says how many identities the current
call carries, their boxes, the ID scale and the ablation switches. While the context is
inactive — no identities, or ID scale 0 — every processor strips the ID tokens and calls the
processor that was installed before it, so the UNet's output is *bit-identical* to the base
model's (the LoRA is part of the adapter and is off then too).

With several identities, each may have a box (normalized ``x0, y0, x1, y1``): inside a box,
the ID-token scores of every other identity are set to -inf (:func:`box_token_mask`), so a
query there can only take features from its own subject.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

__all__ = [
    "GATE_THRESHOLD",
    "Box",
    "LoRALinear",
    "LoRASelfAttnProcessor",
    "SAAContext",
    "SAAProcessor",
    "activation_gate",
    "adapter_processors",
    "box_cells",
    "box_token_mask",
    "get_context",
    "install_saa",
    "load_saa_state_dict",
    "remove_saa",
    "saa_state_dict",
]

GATE_THRESHOLD = 0.3
"""Normalized activations below this are set to 0 (the paper's and the official code's cut)."""

Box = tuple[float, float, float, float]
"""A subject's box in normalized image coordinates: ``(x0, y0, x1, y1)``, 0..1, x to the right,
y down."""


class LoRALinear(nn.Module):
    """A low-rank update ``up(down(x))`` added beside a frozen linear layer.

    ``down`` (in -> rank) starts Gaussian with std ``1 / rank``, ``up`` (rank -> out) at zero,
    so a fresh adapter changes nothing. ``network_alpha`` scales the update by
    ``alpha / rank`` (kohya-style); None = no scaling, as the official checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 4,
                 network_alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.network_alpha = network_alpha
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update for input ``x`` (in ``x``'s dtype)."""
        out = self.up(self.down(x.to(self.down.weight.dtype)))
        if self.network_alpha is not None:
            out = out * (self.network_alpha / self.rank)
        return out.to(x.dtype)


@dataclass
class SAAContext:
    """What the SAA processors of one UNet do in the current call (shared by all of them).

    Attributes:
        num_tokens: ID tokens per identity (4).
        num_ids: identities whose tokens are appended to the text embeddings (0 = none).
        scale: weight of the ID branch (0 turns the whole adapter off: base model output).
        gate: apply the activation gate (False = plain decoupled attention, IP-Adapter style;
            an ablation).
        boxes: one box (or None) per identity, normalized ``(x0, y0, x1, y1)``; None = no
            confinement.
        latent_hw: (height, width) of the latent, for non-square images (None = square).
        lora_scale: weight of the LoRA updates while the adapter is active.
        record: when a list, each cross-attention layer appends its gate (B, h, w) to it.
    """

    num_tokens: int = 4
    num_ids: int = 0
    scale: float = 1.0
    gate: bool = True
    boxes: Sequence[Box | None] | None = None
    latent_hw: tuple[int, int] | None = None
    lora_scale: float = 1.0
    record: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """True when the ID branch (and the LoRA) run: identities given and scale != 0."""
        return self.num_ids > 0 and self.scale != 0

    @property
    def id_len(self) -> int:
        """Number of ID tokens appended to the text embeddings."""
        return self.num_ids * self.num_tokens

    @contextmanager
    def using(self, **changes: Any) -> Iterator[SAAContext]:
        """Set some fields for the body of a ``with`` block, then restore them."""
        old = replace(self)
        for k, v in changes.items():
            if not hasattr(self, k):
                raise AttributeError(f"SAAContext has no field {k!r}")
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k in changes:
                setattr(self, k, getattr(old, k))


def activation_gate(scores: torch.Tensor, threshold: float = GATE_THRESHOLD) -> torch.Tensor:
    r"""The activation gate of SAA (paper Sec. 3.2, "query-level activation gating").

    ``scores`` are the raw (pre-softmax, scaled) attention scores of the queries to the ID
    tokens, shape (B, heads, N, T). For each query :math:`q`,
    :math:`a_q = \sum_{h}\sum_{t} s_{h,q,t}` (summed over heads and ID tokens), normalized
    over the queries of each image, :math:`g_q = (a_q - \min_q a) / (\max_q a - \min_q a)`, and
    :math:`g_q = 0` where :math:`g_q < 0.3`. Returns ``g`` (B, N) in [0, 1]; an image whose
    activations are all equal gets 0 everywhere.
    """
    a = scores.sum(dim=(1, 3))
    lo = a.amin(dim=1, keepdim=True)
    hi = a.amax(dim=1, keepdim=True)
    g = (a - lo) / (hi - lo).clamp_min(torch.finfo(a.dtype).tiny)
    return torch.where(g < threshold, torch.zeros_like(g), g)


def box_cells(box: Box, h: int, w: int) -> tuple[slice, slice]:
    """The rows / columns of an ``h x w`` query grid that a normalized box covers.

    Start cells are floored and end cells ceiled, so a box always covers at least one cell
    and a box ending mid-cell covers that cell (coarse layers of small models need this).
    """
    x0, y0, x1, y1 = box
    r0 = min(max(int(math.floor(y0 * h)), 0), h - 1)
    c0 = min(max(int(math.floor(x0 * w)), 0), w - 1)
    r1 = max(min(int(math.ceil(y1 * h)), h), r0 + 1)
    c1 = max(min(int(math.ceil(x1 * w)), w), c0 + 1)
    return slice(r0, r1), slice(c0, c1)


def box_token_mask(
    boxes: Sequence[Box | None], num_tokens: int, h: int, w: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Which (query, ID token) scores SAA sets to -inf: bool (h * w, len(boxes) * num_tokens).

    Inside the box of identity ``i``, the tokens of every other identity ``j`` are masked —
    unless the query is inside ``j``'s box too (overlapping boxes keep both identities, so no
    query loses all its tokens). Outside every box nothing is masked; an identity without a
    box masks nothing.
    """
    n = len(boxes)
    inside = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):
        if b is not None:
            rows, cols = box_cells(b, h, w)
            inside[i, rows, cols] = True
    inside = inside.view(n, h * w).T  # (N, ids)
    masked = torch.zeros(h * w, n, dtype=torch.bool, device=device)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if others:
            masked[:, others] |= inside[:, i : i + 1] & ~inside[:, others]
    return masked.repeat_interleave(num_tokens, dim=1)


def _query_grid(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a layer's N queries: the latent's aspect, downsampled by the layer's factor."""
    if latent_hw is None:
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise RuntimeError(f"{n} queries are not a square grid; set SAAContext.latent_hw")
        return side, side
    lh, lw = latent_hw
    f = int(round(math.sqrt(lh * lw / n)))
    h, w = -(-lh // f), -(-lw // f)
    if h * w != n:
        raise RuntimeError(f"{n} queries do not fit a {lh}x{lw} latent downsampled {f}x")
    return h, w


class _AdapterBase(nn.Module):
    """Shared plumbing: the previous processor (used while the context is inactive)."""

    def __init__(self, context: SAAContext, base: Any) -> None:
        super().__init__()
        self.context = context
        # kept out of the module tree: the base processor is not part of the adapter's weights
        self.__dict__["base"] = base

    def _base_call(self, attn: Attention, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   temb: torch.Tensor | None) -> torch.Tensor:
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _add_lora(self, attn: Attention, rank: int, network_alpha: float | None) -> None:
        """LoRA on ``to_q/to_k/to_v/to_out`` under the official names (``to_q_lora``, …)."""
        inner, query_dim = attn.to_q.out_features, attn.to_q.in_features
        kv_in = attn.to_k.in_features
        self.to_q_lora = LoRALinear(query_dim, inner, rank, network_alpha)
        self.to_k_lora = LoRALinear(kv_in, inner, rank, network_alpha)
        self.to_v_lora = LoRALinear(kv_in, inner, rank, network_alpha)
        self.to_out_lora = LoRALinear(inner, attn.to_out[0].out_features, rank, network_alpha)


def _lora_linear(layer: nn.Module, lora: LoRALinear, x: torch.Tensor, scale: float) -> torch.Tensor:
    return layer(x) + scale * lora(x)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _prologue(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None
              ) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Spatial norm, (B, C, H, W) -> (B, HW, C), group norm: as diffusers' processors."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4 = None
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        shape4 = (b, c, h, w)
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, shape4


def _epilogue(attn: Attention, lora: LoRALinear, out: torch.Tensor, residual: torch.Tensor,
              shape4: tuple[int, ...] | None, lora_scale: float) -> torch.Tensor:
    out = _lora_linear(attn.to_out[0], lora, out, lora_scale)
    out = attn.to_out[1](out)
    if shape4 is not None:
        b, c, h, w = shape4
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _mask(attn: Attention, mask: torch.Tensor | None, length: int, batch: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, length, batch)
    mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    return mask[..., :length]


class LoRASelfAttnProcessor(_AdapterBase):
    """Self-attention with LoRA on ``to_q/to_k/to_v/to_out`` (the official ``SAProcessor``
    layout: ``to_q_lora.down.weight``, ``to_q_lora.up.weight``, ...)."""

    def __init__(self, attn: Attention, context: SAAContext, base: Any, rank: int = 4,
                 network_alpha: float | None = None) -> None:
        super().__init__(context, base)
        self._add_lora(attn, rank, network_alpha)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        ctx = self.context
        if not ctx.active:
            return self._base_call(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ls = ctx.lora_scale
        residual = hidden_states
        hidden_states, shape4 = _prologue(attn, hidden_states, temb)
        ctx_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx_states = attn.norm_encoder_hidden_states(ctx_states)
        b = hidden_states.shape[0]
        q = _heads(_lora_linear(attn.to_q, self.to_q_lora, hidden_states, ls), attn.heads)
        k = _heads(_lora_linear(attn.to_k, self.to_k_lora, ctx_states, ls), attn.heads)
        v = _heads(_lora_linear(attn.to_v, self.to_v_lora, ctx_states, ls), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = _mask(attn, attention_mask, ctx_states.shape[1], b)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        return _epilogue(attn, self.to_out_lora, out, residual, shape4, ls)


class SAAProcessor(_AdapterBase):
    """Cross-attention with the SAA ID branch (``to_k_ip`` / ``to_v_ip``), its activation gate,
    box confinement, and LoRA on ``to_q/to_k/to_v/to_out`` (the official ``SAAProcessor``
    parameter layout)."""

    def __init__(self, attn: Attention, context: SAAContext, base: Any, rank: int = 4,
                 network_alpha: float | None = None) -> None:
        super().__init__(context, base)
        self._add_lora(attn, rank, network_alpha)
        inner, cross = attn.to_q.out_features, attn.to_k.in_features
        self.to_k_ip = nn.Linear(cross, inner, bias=False)
        self.to_v_ip = nn.Linear(cross, inner, bias=False)
        with torch.no_grad():  # start from the text projections (IP-Adapter's initialization)
            self.to_k_ip.weight.copy_(attn.to_k.weight)
            self.to_v_ip.weight.copy_(attn.to_v.weight)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        ctx = self.context
        n_id = ctx.id_len
        if encoder_hidden_states is None:  # used as self-attention: no ID tokens here
            return self._base_call(attn, hidden_states, None, attention_mask, temb)
        if n_id and encoder_hidden_states.shape[1] <= n_id:
            raise RuntimeError(
                f"the context says {ctx.num_ids} identities ({n_id} ID tokens) but the "
                f"encoder states hold only {encoder_hidden_states.shape[1]} tokens"
            )
        if not ctx.active:
            text = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - n_id].contiguous()
            return self._base_call(attn, hidden_states, text, attention_mask, temb)
        text = encoder_hidden_states[:, :-n_id]
        ids = encoder_hidden_states[:, -n_id:]
        ls = ctx.lora_scale
        residual = hidden_states
        hidden_states, shape4 = _prologue(attn, hidden_states, temb)
        b, n = hidden_states.shape[:2]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        q = _heads(_lora_linear(attn.to_q, self.to_q_lora, hidden_states, ls), attn.heads)
        k = _heads(_lora_linear(attn.to_k, self.to_k_lora, text, ls), attn.heads)
        v = _heads(_lora_linear(attn.to_v, self.to_v_lora, text, ls), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = _mask(attn, attention_mask, text.shape[1], b)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        k_ip = _heads(self.to_k_ip(ids), attn.heads)
        v_ip = _heads(self.to_v_ip(ids), attn.heads)
        scores = (q @ k_ip.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, heads, N, T)
        if ctx.gate:
            gate = activation_gate(scores.float()).to(q.dtype)
        else:
            gate = torch.ones(b, n, dtype=q.dtype, device=q.device)
        hw = None
        if ctx.boxes is not None or ctx.record is not None:
            hw = _query_grid(n, ctx.latent_hw)
        if ctx.boxes is not None and any(x is not None for x in ctx.boxes):
            if len(ctx.boxes) != ctx.num_ids:
                raise ValueError(f"{len(ctx.boxes)} boxes for {ctx.num_ids} identities")
            assert hw is not None
            masked = box_token_mask(ctx.boxes, ctx.num_tokens, hw[0], hw[1], scores.device)
            scores = scores.masked_fill(masked, float("-inf"))
        if ctx.record is not None:
            assert hw is not None
            ctx.record.append(gate.detach().view(b, *hw).float().cpu())
        probs = torch.softmax(scores.float(), dim=-1).to(v_ip.dtype)
        ip = (probs @ v_ip).transpose(1, 2).reshape(b, n, -1)
        out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        out = out + ctx.scale * gate.unsqueeze(-1) * ip.to(q.dtype)
        return _epilogue(attn, self.to_out_lora, out, residual, shape4, ls)


def _attention_modules(unet: nn.Module) -> dict[str, Attention]:
    """Processor name (as in ``unet.attn_processors``) -> its Attention module."""
    return {f"{name}.processor": m for name, m in unet.named_modules() if isinstance(m, Attention)}


def install_saa(unet: nn.Module, rank: int = 4, num_tokens: int = 4,
                network_alpha: float | None = None, self_attention_lora: bool = True,
                context: SAAContext | None = None) -> SAAContext:
    """Install SAA on ``unet``: :class:`SAAProcessor` on every cross-attention layer,
    :class:`LoRASelfAttnProcessor` on every self-attention layer (unless
    ``self_attention_lora`` is False), with ``unet.set_attn_processor``. Returns the shared
    :class:`SAAContext` (also ``unet._saa_context``).

    The new parameters are created on the UNet's device and dtype, require grad, and start as
    an identity update (LoRA ``up`` = 0); ``to_k_ip`` / ``to_v_ip`` start as copies of the
    layer's ``to_k`` / ``to_v``. Installing twice replaces the adapter (the original
    processors are kept as the fallback).
    """
    ctx = context or SAAContext(num_tokens=num_tokens)
    modules = _attention_modules(unet)
    current = dict(unet.attn_processors)
    procs: dict[str, Any] = {}
    ref = next(unet.parameters())
    for name, proc in current.items():
        base = proc.base if isinstance(proc, _AdapterBase) else proc
        attn = modules[name]
        if attn.is_cross_attention:
            new: Any = SAAProcessor(attn, ctx, base, rank, network_alpha)
        elif self_attention_lora:
            new = LoRASelfAttnProcessor(attn, ctx, base, rank, network_alpha)
        else:
            procs[name] = base
            continue
        procs[name] = new.to(device=ref.device, dtype=ref.dtype)
    unet.set_attn_processor(procs)
    unet._saa_context = ctx  # type: ignore[attr-defined]
    return ctx


def remove_saa(unet: nn.Module) -> None:
    """Put back the processors that were installed before :func:`install_saa`."""
    procs = {k: (p.base if isinstance(p, _AdapterBase) else p)
             for k, p in unet.attn_processors.items()}
    unet.set_attn_processor(procs)
    if hasattr(unet, "_saa_context"):
        del unet._saa_context


def get_context(unet: nn.Module) -> SAAContext:
    """The :class:`SAAContext` of a UNet with SAA installed."""
    ctx = getattr(unet, "_saa_context", None)
    if ctx is None:
        raise RuntimeError("SAA is not installed on this UNet (dynasyn.dynamicid.install_saa)")
    return ctx


def adapter_processors(unet: nn.Module) -> dict[str, nn.Module]:
    """The adapter processors of ``unet`` by processor name, in ``attn_processors`` order."""
    return {k: p for k, p in unet.attn_processors.items() if isinstance(p, _AdapterBase)}


def saa_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed ``<processor name>.<parameter>`` (e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, proc in adapter_processors(unet).items():
        for k, v in proc.state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def load_saa_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`saa_state_dict` output into the installed adapter (exact key and shape
    match; raises ValueError naming the first difference)."""
    procs = adapter_processors(unet)
    grouped: dict[str, dict[str, torch.Tensor]] = {k: {} for k in procs}
    for key, v in state.items():
        name, sep, param = key.partition(".processor.")
        if not sep or f"{name}.processor" not in grouped:
            raise ValueError(f"weight {key!r} belongs to no adapter processor of this UNet")
        grouped[f"{name}.processor"][param] = v
    for name, proc in procs.items():
        own = proc.state_dict()
        got = grouped[name]
        missing = sorted(set(own) - set(got))
        if missing:
            raise ValueError(f"no weight for {name}.{missing[0]}")
        for k, v in got.items():
            if k not in own:
                raise ValueError(f"unexpected weight {name}.{k}")
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{name}.{k} has shape {tuple(v.shape)}, the model needs "
                                 f"{tuple(own[k].shape)}")
        proc.load_state_dict(got)
