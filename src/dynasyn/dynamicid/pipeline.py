"""Inference: ``pipe = dynamicid.load(base_pipe, weights)``; ``pipe(prompt, id_images=[...])``.

:class:`DynamicIDPipeline` wraps an ordinary diffusers ``StableDiffusionPipeline`` whose UNet
has SAA installed. A call:

1. reads the placeholders ``<asset0>``, ``<asset1>``, ... of the prompt; the identities it
   names (in order of first appearance) are the ones injected. Each placeholder is replaced by
   its identity's **class noun** with an article (``"<asset0> is sleeping"`` ->
   ``"a star is sleeping"``; ``"the <asset1>"`` -> ``"the ball"``): the text says *what* the
   subject is and *what it does*, the ID tokens say *which one* it is — the way DynamicID's
   prompts say "a man" / "a woman" and its ID tokens the person;
2. encodes each named identity's reference crop into 4 ID tokens
   (:class:`~dynasyn.dynamicid.encoder.IDEncoder`), reconfigures them to the prompt's motion
   with IMR when the weights have one (``use_imr``), and appends them to the prompt's text
   embeddings (the negative prompt gets the encoder's unconditional tokens);
3. runs the base pipeline with these embeddings while the SAA context holds the number of
   identities, their boxes (normalized ``x0, y0, x1, y1``; None = no confinement), the ID scale
   and the gate switch; the context is reset afterwards.

A prompt without placeholders, or ``id_scale=0``, gives exactly the base model's images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynasyn.dynamicid.encoder import IDEncoder, build_id_encoder, subject_crop
from dynasyn.dynamicid.imr import IMR
from dynasyn.dynamicid.saa import (
    Box,
    SAAContext,
    install_saa,
    load_saa_state_dict,
    remove_saa,
)
from dynasyn.dynamicid.weights import check_layout, read_weights
from dynasyn.errors import InputError

__all__ = [
    "DynamicIDPipeline",
    "layout_boxes",
    "load",
    "prompt_identities",
    "slice_boxes",
    "substitute_classes",
]

_PLACEHOLDER = re.compile(r"(?:\b(?P<art>[Aa]n?|[Tt]he)\s+)?<asset(?P<idx>\d+)>")


def prompt_identities(prompt: str) -> list[int]:
    """Asset indices named in ``prompt``, unique, in order of first appearance."""
    return list(dict.fromkeys(int(m.group("idx")) for m in _PLACEHOLDER.finditer(prompt)))


def substitute_classes(prompt: str, classes: Sequence[str] | dict[int, str]) -> str:
    """Replace ``<assetK>`` by ``classes[K]`` with an article: ``"a star"``, ``"an orange"``;
    an article already written before the placeholder is kept (``"the <asset1>"`` ->
    ``"the ball"``). Raises InputError for an index without a class."""
    lookup = dict(enumerate(classes)) if not isinstance(classes, dict) else classes

    def sub(m: re.Match[str]) -> str:
        k = int(m.group("idx"))
        if k not in lookup:
            raise InputError(f"prompt {prompt!r} names <asset{k}> but there are only "
                             f"{len(lookup)} identities (<asset0>..<asset{len(lookup) - 1}>)")
        noun = lookup[k]
        art = m.group("art")
        if art is None:
            art = "an" if noun[:1].lower() in "aeiou" else "a"
        elif art.lower() in ("a", "an"):
            art = ("An" if art[0] == "A" else "an") if noun[:1].lower() in "aeiou" else art[0]
        return f"{art} {noun}"

    return _PLACEHOLDER.sub(sub, prompt)


def slice_boxes(n: int) -> list[Box]:
    """``n`` vertical slices of the image, left to right (the official default layout)."""
    return [(i / n, 0.0, (i + 1) / n, 1.0) for i in range(n)]


def layout_boxes(text: str, n: int, margin: float = 0.06, seeds: int = 4) -> list[Box]:
    """Boxes for the ``n`` subjects of a class-noun prompt, from the micro world's layout.

    A prompt of the micro world's grammar (``"a star is on top of a ball on the grass"``) is
    parsed (:func:`dynasyn.micro.world.parse_caption`), rendered with stand-in identities for
    ``seeds`` seeds, and each subject's box is the union of its mask's bounding boxes, grown by
    ``margin``. Other prompts, or a layout that does not give ``n`` subjects, fall back to
    :func:`slice_boxes`.
    """
    from dynasyn.micro.world import COLOURS, Identity, SceneSpec, parse_caption, render

    try:
        parsed = parse_caption(text)
        if len(parsed.subjects) != n:
            return slice_boxes(n)
        colours = list(COLOURS)
        spec = SceneSpec(tuple(Identity(m.shape, colours[i]) for i, m in
                               enumerate(parsed.subjects)),
                         parsed.action, parsed.relation, parsed.background)
    except ValueError:
        return slice_boxes(n)
    boxes: list[list[float]] = [[1.0, 1.0, 0.0, 0.0] for _ in range(n)]
    for seed in range(seeds):
        r = render(spec, size=64, seed=seed)
        for i, m in enumerate(r.masks):
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            b = boxes[i]
            b[0], b[1] = min(b[0], xs.min() / 64), min(b[1], ys.min() / 64)
            b[2], b[3] = max(b[2], (xs.max() + 1) / 64), max(b[3], (ys.max() + 1) / 64)
    out: list[Box] = []
    for b in boxes:
        if b[0] >= b[2]:
            return slice_boxes(n)
        out.append((max(0.0, b[0] - margin), max(0.0, b[1] - margin),
                    min(1.0, b[2] + margin), min(1.0, b[3] + margin)))
    return out


def _pooled(out: Any) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out[1]


class DynamicIDPipeline:
    """A ``StableDiffusionPipeline`` with SAA, an ID encoder and (optionally) IMR.

    Attributes:
        base: the wrapped pipeline (its UNet carries the SAA processors).
        encoder: the ID encoder (None with official SAA-only weights: pass ``id_tokens``).
        imr: the IMR (None when the weights have none).
        context: the UNet's :class:`SAAContext`.
        classes: default class noun per asset index (used when a call gives none).
    """

    def __init__(self, base: Any, encoder: IDEncoder | None, imr: IMR | None,
                 context: SAAContext, classes: Sequence[str] | None = None) -> None:
        self.base = base
        self.encoder = encoder
        self.imr = imr
        self.context = context
        self.classes = list(classes) if classes else None

    @property
    def device(self) -> torch.device:
        """The UNet's device."""
        return self.base.unet.device

    def to(self, device: str | torch.device) -> DynamicIDPipeline:
        """Move every part to ``device``."""
        self.base.to(device)
        for m in (self.encoder, self.imr):
            if m is not None:
                m.to(device)
        return self

    @torch.no_grad()
    def encode_ids(self, id_images: Sequence[Image.Image | np.ndarray],
                   id_masks: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        """Reference images (with optional masks) -> ID tokens (n, num_tokens, dim)."""
        if self.encoder is None:
            raise InputError("these weights have no ID encoder (official SAA-only checkpoint); "
                             "pass id_tokens computed with your own encoder")
        size = self.encoder.image_size
        masks = list(id_masks) if id_masks is not None else [None] * len(id_images)
        crops = [subject_crop(img, m, size) for img, m in zip(id_images, masks, strict=True)]
        return self.encoder.encode(crops)

    @torch.no_grad()
    def motion_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled text embeddings (n, hidden) of the prompts (IMR's target motion)."""
        tok = self.base.tokenizer(list(texts), padding="max_length", truncation=True,
                                  max_length=self.base.tokenizer.model_max_length,
                                  return_tensors="pt")
        te = self.base.text_encoder
        return _pooled(te(tok.input_ids.to(te.device)))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        id_images: Sequence[Image.Image | np.ndarray | None] | None = None,
        id_boxes: Sequence[Box | None] | str | None = None,
        *,
        id_masks: Sequence[np.ndarray | None] | None = None,
        id_tokens: torch.Tensor | None = None,
        id_classes: Sequence[str] | None = None,
        id_scale: float = 1.0,
        gate: bool = True,
        use_imr: bool = True,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        **kwargs: Any,
    ) -> Any:
        """Render ``prompt`` with the identities it names.

        Args:
            prompt: text with ``<asset0>``, ``<asset1>``, ... naming identities.
            id_images: reference image of each asset index (a subject crop, or a whole image
                with ``id_masks``); entries of assets the prompt does not name may be None.
            id_boxes: one box per asset index (normalized ``x0, y0, x1, y1``, or None), or
                ``"auto"`` (:func:`layout_boxes` of the prompt), or None (no confinement).
            id_masks: per asset index, the mask of the subject in ``id_images`` (or None).
            id_tokens: precomputed tokens (assets, num_tokens, dim) instead of ``id_images``.
            id_classes: class noun per asset index (default: the pipeline's ``classes``).
            id_scale: weight of the ID branch (0 = the base model).
            gate: the activation gate (False: plain decoupled attention, an ablation).
            use_imr: reconfigure the tokens to the prompt's motion when there is an IMR.
            Other arguments go to the base ``StableDiffusionPipeline``.

        Returns:
            The base pipeline's output (``.images``).
        """
        named = prompt_identities(prompt)
        classes = list(id_classes) if id_classes is not None else self.classes
        if named and classes is None:
            raise InputError("the prompt names identities but no class nouns are known; pass "
                             "id_classes=[...] (one noun per asset index)")
        text = substitute_classes(prompt, classes) if named else prompt
        base = self.base
        device = base._execution_device
        do_cfg = guidance_scale > 1.0
        pos, neg = base.encode_prompt(text, device, 1, do_cfg, negative_prompt)
        n = len(named)
        boxes: list[Box | None] | None = None
        if n:
            if id_tokens is not None:
                if id_tokens.ndim != 3 or max(named) >= id_tokens.shape[0]:
                    raise InputError(f"id_tokens must be (assets, tokens, dim) covering "
                                     f"<asset{max(named)}>")
                tokens = id_tokens[named].to(device, pos.dtype)
            else:
                if id_images is None or max(named) >= len(id_images) or any(
                        id_images[k] is None for k in named):
                    raise InputError(f"prompt {prompt!r} names <asset{max(named)}> but no "
                                     "reference image was given for it (id_images)")
                masks = None
                if id_masks is not None:
                    masks = [id_masks[k] if k < len(id_masks) else None for k in named]
                tokens = self.encode_ids([id_images[k] for k in named], masks).to(pos.dtype)
            if use_imr and self.imr is not None:
                tokens = self.imr(tokens, self.motion_text([text] * n).to(tokens.dtype))
            uncond = None
            if self.encoder is not None:
                uncond = self.encoder.uncond_tokens(1).to(device, pos.dtype)
            pos = torch.cat([pos, tokens.reshape(1, -1, tokens.shape[-1])], dim=1)
            if do_cfg:
                neg_tok = (uncond.repeat(1, n, 1) if uncond is not None
                           else torch.zeros_like(pos[:, -n * self.context.num_tokens:]))
                neg = torch.cat([neg, neg_tok], dim=1)
            if isinstance(id_boxes, str):
                if id_boxes != "auto":
                    raise InputError(f"id_boxes must be a list of boxes, None or 'auto', got "
                                     f"{id_boxes!r}")
                boxes = list(layout_boxes(text, n)) if n > 1 else None
            elif id_boxes is not None:
                boxes = [id_boxes[k] if k < len(id_boxes) else None for k in named]
                for b in boxes:
                    if b is not None and not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
                        raise InputError(f"box {b} is not inside the image (normalized "
                                         "x0 < x1, y0 < y1 in [0, 1])")
        vae_f = base.vae_scale_factor
        h = height or base.unet.config.sample_size * vae_f
        w = width or base.unet.config.sample_size * vae_f
        with self.context.using(num_ids=n, boxes=boxes, scale=id_scale, gate=gate,
                                latent_hw=(h // vae_f, w // vae_f)):
            return base(prompt_embeds=pos, negative_prompt_embeds=neg if do_cfg else None,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        num_images_per_prompt=num_images_per_prompt, generator=generator,
                        height=h, width=w, output_type=output_type, **kwargs)


def load(base_pipe: Any, weights: str | Path, classes: Sequence[str] | None = None,
         num_tokens: int = 4) -> DynamicIDPipeline:
    """Install DynamicID on ``base_pipe`` (a ``StableDiffusionPipeline``, changed in place) and
    wrap it.

    ``weights`` is a weights directory (:mod:`dynasyn.dynamicid.weights`: SAA + encoder, and
    IMR when trained) or an official SAA checkpoint file (``.bin`` / ``.safetensors``, SD 1.5;
    no encoder: calls pass ``id_tokens``). Raises InputError when the weights do not fit the
    base model's UNet.
    """
    unet = base_pipe.unet
    p = Path(weights)
    ref = next(unet.parameters())
    if p.is_file():
        from dynasyn.dynamicid.official import load_official

        ctx, _ = load_official(unet, p, num_tokens=num_tokens)
        return DynamicIDPipeline(base_pipe, None, None, ctx, classes)
    w = read_weights(p)
    check_layout(w, unet)
    cfg = w.config
    ctx = install_saa(unet, rank=int(cfg["lora_rank"]), num_tokens=int(cfg["num_tokens"]),
                      network_alpha=cfg.get("network_alpha"),
                      self_attention_lora=any(".attn1." in n for n in cfg["processors"]))
    try:
        load_saa_state_dict(unet, {k: v.to(ref.dtype) for k, v in w.saa.items()})
        encoder = build_id_encoder(cfg["encoder"])
        encoder.load_state_dict({k: v.float() for k, v in w.encoder.items()})
        imr = None
        if w.imr is not None and cfg.get("imr"):
            imr = IMR(**cfg["imr"])
            imr.load_state_dict({k: v.float() for k, v in w.imr.items()})
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        remove_saa(unet)
        first = str(e).strip().splitlines()[0][:200]
        raise InputError(f"weights layout does not match the model: {p} ({first}); pass the "
                         "--model the weights were trained with") from None
    encoder = encoder.to(ref.device, ref.dtype).eval()
    if imr is not None:
        imr = imr.to(ref.device, ref.dtype).eval()
    return DynamicIDPipeline(base_pipe, encoder, imr, ctx, classes)
