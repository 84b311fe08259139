"""Step 3 (drafts): render a phrase prompt while capturing its subjects' cross-attention.

The draft shows the subjects doing the prompted action with the model's own idea of their
appearance; the class-token attention maps (the class noun inside each subject's phrase, or
the whole phrase when it does not contain the noun — "pink pebble" for class "stone") locate
each subject in the draft and become its pseudo mask (`masks.attention_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dynasyn.attention import AttentionStore, get_store
from dynasyn.tokens import EncodedPrompt, encode_template


def class_token_spans(tokenizer, template: str, phrases: Sequence[str],
                      classes: Sequence[str]) -> EncodedPrompt:
    """Encode the phrase rendering; each slot's span narrowed to its class noun's tokens."""
    enc = encode_template(tokenizer, template, phrases)
    for k, (phrase, noun) in enumerate(zip(phrases, classes, strict=True)):
        ids = enc.input_ids.tolist()
        noun_ids = tokenizer(noun, add_special_tokens=False).input_ids
        span = enc.spans[k]
        for start in span:
            if ids[start : start + len(noun_ids)] == noun_ids and start + len(noun_ids) - 1 <= span[-1]:
                enc.spans[k] = list(range(start, start + len(noun_ids)))
                break
        del phrase
    return enc


def cfg_weights(enc: EncodedPrompt, num_slots: int, batch: int, guidance: bool) -> torch.Tensor:
    """Column weights for a pipeline call: zero rows for the unconditional half of CFG."""
    from dynasyn.tokens import token_weights

    w = token_weights([enc] * batch, num_slots)
    if guidance:
        w = torch.cat([torch.zeros_like(w), w])
    return w


def run_capturing(store: AttentionStore, weights: torch.Tensor, fn):
    """Run ``fn()`` (a pipeline call) with capture on; return (its result, maps (B, K, h, w)).

    Maps are averaged over every capture layer *and* every denoising step.
    """
    store.begin(weights)
    try:
        result = fn()
        maps = store.end()
    finally:
        store.weights = None
        store.maps = []
    return result, maps


@torch.no_grad()
def render_draft(
    pipe,
    template: str,
    phrases: Sequence[str],
    classes: Sequence[str],
    seed: int,
    steps: int = 25,
    guidance: float = 7.5,
) -> tuple[Image.Image, np.ndarray]:
    """Render ``template`` with the phrases; return the image and class maps (K, h, w)."""
    pipe.set_progress_bar_config(disable=True)
    enc = class_token_spans(pipe.tokenizer, template, phrases, classes)
    store = get_store(pipe.unet)
    k = len(phrases)
    w = cfg_weights(enc, k, 1, guidance > 1).to(pipe.unet.device)
    g = torch.Generator().manual_seed(seed)
    out, maps = run_capturing(
        store, w,
        lambda: pipe(enc.text, num_inference_steps=steps, guidance_scale=guidance, generator=g),
    )
    cond = maps[-1]  # the conditional half
    return out.images[0], cond.float().cpu().numpy()
