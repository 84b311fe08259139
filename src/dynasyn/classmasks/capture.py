"""What the diffusion model sees in a photo: class-word cross-attention and self-attention.

The photo is encoded by the pipeline's VAE, noised to a few timesteps (fixed noise draws) and
passed through the UNet with a prompt that names the classes ("a bear, a bowl and a
seashell"); no denoising step is taken. The order of the names in that prompt matters (the
micro model, for one, learnt that caption order is left-to-right order, and its class words
attend by position more than by shape), so the order is chosen first by the model itself:
:func:`order_losses` scores every order by the model's denoising error on the photo (the
diffusion-classifier idea: the caption that explains the image best predicts its noise
best), and the attention is captured with the best one.

Capture reuses :mod:`dynasyn.attention`: one :class:`~dynasyn.attention.AttentionStore` per
resolution, fed by :class:`~dynasyn.attention.CaptureCrossAttnProcessor` on the down / up
blocks' cross-attention layers (``attn2``; column weights pick each class word's tokens, the
mean map of a word of several tokens), and one more store on the self-attention layers
(``attn1``) of one resolution, whose "column weights" are the identity, so it records the
head-averaged self-attention matrix itself. The processors are removed afterwards (the UNet's
previous processors are restored).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dynasyn.attention import AttentionStore, CaptureCrossAttnProcessor, cross_attention_layers
from dynasyn.sdxl import pipe_conditioning
from dynasyn.tokens import encode_template, token_weights

__all__ = [
    "Attention",
    "all_orders",
    "class_prompt",
    "encode_photo",
    "model_resolution",
    "order_losses",
    "photo_attention",
]


@dataclass
class Attention:
    """The captured maps of one photo.

    Attributes:
        cross: ``(K, g, g)`` float32, each class word's cross-attention, every layer's map
            scaled to a maximum of 1, upsampled to the affinity grid and averaged over layers,
            timesteps and prompt orders (class order as given).
        affinity: ``(g*g, g*g)`` float32, the self-attention at the affinity grid averaged over
            heads, layers, timesteps and orders; row ``q`` is where pixel ``q`` looks (sums to 1).
        grid: ``g``.
        prompts: the prompts used.
    """

    cross: np.ndarray
    affinity: np.ndarray
    grid: int
    prompts: list[str]


def class_prompt(k: int) -> str:
    """The template naming ``k`` classes: ``"{0}"``, ``"{0} and {1}"``, ``"{0}, {1} and {2}"``."""
    if k == 1:
        return "{0}"
    return ", ".join(f"{{{i}}}" for i in range(k - 1)) + f" and {{{k - 1}}}"


def _with_article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def model_resolution(pipe) -> int:
    """The pipeline's native image side (UNet sample size × VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _encode_prompts(
    tokenizer, classes: Sequence[str], orders: Sequence[Sequence[int]]
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One prompt per order: texts, ids (O, T), weights (O, T, K) in class order."""
    k = len(classes)
    template = class_prompt(k)
    texts, ids, weights = [], [], []
    for order in orders:
        fills = [_with_article(classes[j]) for j in order]
        enc = encode_template(tokenizer, template, fills)
        # narrow each slot's span to the class noun's own tokens (drop the article)
        for slot, j in enumerate(order):
            n = len(tokenizer(classes[j], add_special_tokens=False).input_ids)
            enc.spans[slot] = enc.spans[slot][-n:]
        w = token_weights([enc], k)[0]  # (T, K) in slot order
        texts.append(enc.text)
        ids.append(enc.input_ids)
        weights.append(w[:, np.argsort(order)])  # columns back in class order
    return texts, torch.stack(ids), torch.stack(weights)


def _install(unet, names: list[str], store: AttentionStore, saved: dict) -> None:
    procs = dict(unet.attn_processors)
    for n in names:
        saved.setdefault(n, procs[n])
        procs[n] = CaptureCrossAttnProcessor(store)
    unet.set_attn_processor(procs)


def _affinity_factor(unet, max_side: int) -> int:
    """The finest down/up resolution whose side is at most ``max_side``."""
    side = int(unet.config.sample_size)
    factors = sorted(set(cross_attention_layers(unet).values()))
    ok = [f for f in factors if side // f <= max_side]
    return min(ok) if ok else max(factors)


def encode_photo(pipe, image: Image.Image) -> torch.Tensor:
    """The photo's VAE latent (1, C, h, w), scaled, after resizing (not cropping) to the
    model's square resolution."""
    vae = pipe.vae
    res = model_resolution(pipe)
    x = np.asarray(image.convert("RGB").resize((res, res), Image.Resampling.BICUBIC), np.float32)
    x = torch.from_numpy(x / 127.5 - 1.0).permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def _noisy(pipe, latent: torch.Tensor, timesteps: Sequence[int], seed: int, draws: int = 1):
    """(latents (D*T, ...), noise, timesteps): ``draws`` fixed noise draws at every timestep."""
    gen = torch.Generator("cpu").manual_seed(seed)
    n_t = len(timesteps)
    noise = torch.randn((draws, *latent.shape[1:]), generator=gen).to(latent.device, latent.dtype)
    noise = noise.repeat_interleave(n_t, 0)
    ts = torch.tensor(list(timesteps), dtype=torch.long, device=latent.device).repeat(draws)
    lat = latent.expand(len(ts), -1, -1, -1)
    return pipe.scheduler.add_noise(lat, noise, ts), noise, ts


def all_orders(k: int, limit: int = 24) -> list[tuple[int, ...]]:
    """Every order of ``k`` classes (``k!``), or the ``k`` cyclic ones when there are more than
    ``limit``."""
    orders = list(itertools.permutations(range(k)))
    if len(orders) > limit:
        orders = [tuple((s + i) % k for i in range(k)) for s in range(k)]
    return orders


@torch.no_grad()
def order_losses(
    pipe,
    latent: torch.Tensor,
    classes: Sequence[str],
    orders: Sequence[Sequence[int]],
    timesteps: Sequence[int] = (200, 400, 600),
    draws: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """How well each order of the class names explains the photo: the model's mean denoising
    error (the diffusion-classifier score; lower is better), one value per order.

    The same noise draws and timesteps are used for every order, so the differences come
    from the prompts alone.
    """
    unet = pipe.unet
    _, ids, _ = _encode_prompts(pipe.tokenizer, classes, orders)
    cond = pipe_conditioning(pipe, ids).to(unet.dtype)
    noisy, noise, ts = _noisy(pipe, latent, timesteps, seed, draws)
    target = noise
    if pipe.scheduler.config.prediction_type == "v_prediction":
        target = pipe.scheduler.get_velocity(latent.expand_as(noise), noise, ts)
    out = []
    for i in range(len(ids)):
        kw = cond.row(i).repeat(len(ts)).unet_kwargs()
        pred = unet(noisy.to(unet.dtype), ts, **kw).sample
        out.append(F.mse_loss(pred.float(), target.float()).item())
    return np.asarray(out)


@torch.no_grad()
def photo_attention(
    pipe,
    latent: torch.Tensor,
    classes: Sequence[str],
    orders: Sequence[Sequence[int]],
    timesteps: Sequence[int] = (500, 600, 700),
    seed: int = 0,
    max_affinity_side: int = 32,
) -> Attention:
    """Capture the class words' cross-attention and the self-attention of a photo's latent.

    One prompt per order of the classes (each a permutation of ``range(K)``); ``timesteps``
    are training timesteps (0-999) to noise the latent to; ``seed`` fixes the noise. The
    affinity grid is the finest down/up attention resolution with a side of at most
    ``max_affinity_side`` (16 for the micro model, 32 for SD at 512 px).
    """
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    texts, ids, weights = _encode_prompts(pipe.tokenizer, classes, orders)
    n_t, n_o = len(timesteps), len(texts)
    cond = pipe_conditioning(pipe, ids)
    noisy, _, ts = _noisy(pipe, latent, timesteps, seed)
    batch = noisy.repeat_interleave(n_o, 0).to(dtype)
    t_batch = ts.repeat_interleave(n_o, 0)
    cond_batch = cond.repeat(n_t).to(dtype)
    w_batch = weights.repeat(n_t, 1, 1).to(device)

    layers = cross_attention_layers(unet)
    fa = _affinity_factor(unet, max_affinity_side)
    g = int(unet.config.sample_size) // fa
    cross_stores = {f: AttentionStore([n for n, v in layers.items() if v == f])
                    for f in sorted(set(layers.values()))}
    self_names = [n.replace(".attn2.", ".attn1.") for n, v in layers.items() if v == fa]
    self_store = AttentionStore(self_names)
    saved: dict = {}
    try:
        for store in cross_stores.values():
            _install(unet, store.layer_names, store, saved)
        _install(unet, self_names, self_store, saved)
        for store in cross_stores.values():
            store.begin(w_batch)
        eye = torch.eye(g * g, device=device, dtype=dtype).expand(len(batch), -1, -1)
        self_store.begin(eye)
        unet(batch, t_batch, **cond_batch.unet_kwargs())
        cross = []
        for store in cross_stores.values():
            m = store.end().float()  # (B, K, h, w)
            m = m / m.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
            cross.append(F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False))
        aff = self_store.end().float()  # (B, N_keys, g, g): [b, key, query]
        aff = aff.flatten(2).transpose(1, 2).mean(0)  # (N_query, N_keys)
    finally:
        for store in (*cross_stores.values(), self_store):
            store.weights, store.maps = None, []
        procs = dict(unet.attn_processors)
        procs.update(saved)
        unet.set_attn_processor(procs)
    cross_map = torch.stack(cross).mean((0, 1))  # layers, batch -> (K, g, g)
    return Attention(cross_map.cpu().numpy(), aff.cpu().numpy(), g, texts)

