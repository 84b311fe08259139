"""Cross-attention capture and aggregation: A_{t,i}(γ(c), z_t) of the paper.

One :class:`AttentionStore` per UNet, fed by :class:`CaptureCrossAttnProcessor` instances that
are installed *only* on the cross-attention layers (``attn2``) of the down and up blocks at the
regularization resolution (not the mid block), as Break-a-Scene does. Every other layer keeps
diffusers' fused processor. The capture processor computes the attention probabilities once
(no in-place writes: autograd sees an ordinary graph), uses them for the layer's output, and
hands the store their head-average restricted to the token columns the losses need.

Token columns are chosen per pass with a weight matrix ``W`` of shape (B, T, K): the captured
map of "subject" k is ``Σ_t probs[..., t] · W[b, t, k]``. A placeholder has one token (weight 1);
a class noun of several tokens ("teddy bear") gets weight 1/n on each, i.e. the mean map of its
tokens (docs/decisions.md, "Attention and masks").
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

_LAYER_RE = re.compile(r"^(down|up)_blocks\.(\d+)\..*\.attn2\.processor$")


class EarlyStop(Exception):
    """Raised by the store to end an attention-only UNet pass after its last capture layer."""


class AttentionStore:
    """Collects head-averaged cross-attention maps of the capture layers for one pass."""

    def __init__(self, layer_names: list[str]):
        self.layer_names = layer_names
        self.weights: torch.Tensor | None = None
        self.maps: list[torch.Tensor] = []
        self.stop_early = False
        self._seen = 0

    @property
    def active(self) -> bool:
        return self.weights is not None

    def begin(self, weights: torch.Tensor, stop_early: bool = False) -> None:
        """Start capturing for a pass; ``weights`` is (B, T, K) over the text tokens."""
        self.weights = weights
        self.maps = []
        self.stop_early = stop_early
        self._seen = 0

    def end(self) -> torch.Tensor:
        """Stop capturing; return the mean over capture layers, shape (B, K, h, w)."""
        if not self.maps:
            raise RuntimeError("no cross-attention map was captured in this pass")
        maps = torch.stack(self.maps).mean(0)  # (B, N, K)
        self.weights = None
        self.maps = []
        b, n, k = maps.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise RuntimeError(f"captured attention of {n} pixels is not square")
        return maps.transpose(1, 2).reshape(b, k, side, side)

    def record(self, probs: torch.Tensor, heads: int) -> None:
        """Add one layer's probabilities, (B·heads, N, T), reduced to (B, N, K)."""
        assert self.weights is not None
        bh, n, t = probs.shape
        mean = probs.view(bh // heads, heads, n, t).mean(1)
        w = self.weights.to(mean.dtype)
        if w.shape[0] != mean.shape[0]:
            raise RuntimeError(
                f"attention weights are for batch {w.shape[0]} but the pass has {mean.shape[0]}"
            )
        self.maps.append(torch.bmm(mean, w[:, :t]))
        self._seen += 1
        if self.stop_early and self._seen == len(self.layer_names):
            raise EarlyStop


class CaptureCrossAttnProcessor:
    """Cross-attention with explicit probabilities that are reported to an :class:`AttentionStore`.

    Mirrors diffusers' ``AttnProcessor`` math (``head_to_batch_dim``, ``get_attention_scores``)
    so outputs match the default processor up to floating-point rounding. When the store is
    inactive the layer runs diffusers' fused ``AttnProcessor2_0`` unchanged.
    """

    def __init__(self, store: AttentionStore):
        self.store = store
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.store.active:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, seq_len, _ = ctx.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        key = attn.head_to_batch_dim(attn.to_k(ctx))
        value = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(query, key, attention_mask)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        self.store.record(probs, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, int]:
    """Map each down/up cross-attention processor name to its downsampling factor (1, 2, 4…)."""
    n_up = len(unet.config.block_out_channels)
    factors: dict[str, int] = {}
    for name in unet.attn_processors:
        m = _LAYER_RE.match(name)
        if not m:
            continue
        kind, idx = m.group(1), int(m.group(2))
        factors[name] = 2**idx if kind == "down" else 2 ** (n_up - 1 - idx)
    return factors


def resolve_downsample(unet: UNet2DConditionModel, downsample: int | None) -> int:
    """The regularization resolution as a downsampling factor of the latent.

    ``None`` means latent/4 (16×16 for SD at 512 px, as Break-a-Scene), or the coarsest
    down/up cross-attention resolution when the UNet has none at latent/4 (small models).
    """
    available = sorted(set(cross_attention_layers(unet).values()))
    if not available:
        raise ValueError("this UNet has no cross-attention layers in its down/up blocks")
    if downsample is None:
        return 4 if 4 in available else max(available)
    if downsample not in available:
        raise ValueError(
            f"attention_downsample={downsample} has no cross-attention layers; "
            f"choose one of {available}"
        )
    return downsample


def install_attention_capture(
    unet: UNet2DConditionModel, downsample: int | None = None
) -> AttentionStore:
    """Install capture processors on the cross-attention layers at latent/``downsample``.

    Only those layers get a new processor; all others keep theirs. Returns the store. The
    layers are ordered as the UNet runs them (down blocks, then up blocks), so the store knows
    when the last one has run (for early-stopped attention-only passes).
    """
    factor = resolve_downsample(unet, downsample)
    names = [n for n, f in cross_attention_layers(unet).items() if f == factor]
    store = AttentionStore(names)
    by_module = dict(unet.attn_processors)
    for name in names:
        by_module[name] = CaptureCrossAttnProcessor(store)
    unet.set_attn_processor(by_module)
    unet._dynasyn_store = store  # type: ignore[attr-defined]
    return store


def keep_capture_layers_unchecked(unet: torch.nn.Module) -> list[str]:
    """Turn gradient checkpointing off for the transformer models that hold capture layers.

    A checkpointed block is run again in the backward pass, where the store is no longer
    capturing: the capture processor would take its fused path and compute other tensors than
    in the forward pass (torch refuses that), or record its maps twice. So the capture blocks
    (at the regularization resolution only, a small share of the activations) keep their
    activations and every other block stays checkpointed. Returns the blocks left unchecked.
    """
    unchecked = []
    for name in get_store(unet).layer_names:
        parent = name.split(".transformer_blocks.")[0]
        block = unet.get_submodule(parent)
        if getattr(block, "gradient_checkpointing", False):
            block.gradient_checkpointing = False
            unchecked.append(parent)
    return unchecked


def get_store(unet: torch.nn.Module) -> AttentionStore:
    """The store installed on ``unet`` (unwrapping peft / DDP wrappers)."""
    for m in (unet, getattr(unet, "module", None), getattr(unet, "base_model", None)):
        if m is not None and hasattr(m, "_dynasyn_store"):
            return m._dynasyn_store
    raise RuntimeError("no attention capture installed on this UNet")


class _Dropped(torch.nn.Module):
    """Stands in for a UNet block that an early-stopped attention pass never reaches."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def _refuse(self) -> RuntimeError:
        return RuntimeError(
            f"{self.name} was left out of this attention-only UNet copy; it can only run "
            "early-stopped passes (capturing(..., stop_early=True))"
        )

    @property
    def resnets(self) -> None:  # the UNet reads this before calling the block
        raise self._refuse()

    def forward(self, *args: object, **kwargs: object) -> None:
        raise self._refuse()


def attention_only_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A frozen deep copy of ``unet`` without the up blocks after its last capture layer.

    An early-stopped attention pass (:class:`EarlyStop`) ends inside the up block of the last
    capture layer, so the blocks after it (the higher-resolution up blocks) are never run: the
    copy omits their weights (they are never even copied), which is what a frozen prior model
    for attention-only passes costs in memory. Running it without ``stop_early`` raises.
    """
    last = max(
        (int(n.split(".")[1]) for n in get_store(unet).layer_names if n.startswith("up_blocks.")),
        default=-1,
    )
    dropped = {i: unet.up_blocks[i] for i in range(last + 1, len(unet.up_blocks))}
    for i in dropped:
        unet.up_blocks[i] = _Dropped(f"up_blocks.{i}")
    try:
        prior = copy.deepcopy(unet)
    finally:
        for i, block in dropped.items():
            unet.up_blocks[i] = block
    return prior.requires_grad_(False)


HALF_STORED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
"""The layers :func:`store_weights_as` keeps in half precision (autocast casts their weights)."""


def store_weights_as(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Keep the weights of ``module``'s linear and convolution layers in ``dtype``, in place.

    Autocast to ``dtype`` casts the weights of these layers to ``dtype`` at every call, so a
    frozen model stored this way computes bit-identical outputs under that autocast with about
    half the memory (the standard "frozen models in ``weight_dtype``" of diffusers' training
    scripts, made exact). Normalization layers, which autocast leaves in float32, keep float32
    weights. Outside autocast the stored layers need inputs of ``dtype``.
    """
    for m in module.modules():
        if isinstance(m, HALF_STORED):
            m.to(dtype)
    return module


@contextmanager
def capturing(store: AttentionStore, weights: torch.Tensor, stop_early: bool = False) -> Iterator[list]:
    """Context: capture maps during the body; the result list receives (B, K, h, w)."""
    result: list[torch.Tensor] = []
    store.begin(weights, stop_early=stop_early)
    try:
        yield result
    except EarlyStop:
        pass
    finally:
        if store.maps:
            result.append(store.end())
        store.weights = None
        store.maps = []
