"""Placeholder tokens and prompt templates with exact token positions.

Placeholders are ``<asset0>``, ``<asset1>``, … in mask order. Each is one new token whose
embedding row starts as the class noun's embedding (the mean of its tokens' rows for a noun of
several tokens). Prompts are *templates* with slots — ``"{0} is throwing {1}"`` — rendered three
ways (placeholder / class noun / noun phrase); :func:`encode_template` tokenizes a rendering and
returns, for each slot, the positions of its tokens, so the attention losses know exactly which
columns belong to which subject.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from dynasyn.errors import InputError

_SLOT_RE = re.compile(r"\{(\d+)\}")
PLACEHOLDER_RE = re.compile(r"<asset(\d+)>")


def placeholder(index: int) -> str:
    """The placeholder token of subject ``index``: ``<asset{index}>``."""
    return f"<asset{index}>"


def union_template(k: int, prefix: str = "a photo of") -> str:
    """``"a photo of {0} and {1} and …"`` for ``k`` subjects (Break-a-Scene's prompt)."""
    return prefix + " " + " and ".join(f"{{{j}}}" for j in range(k))


def render(template: str, fills: Sequence[str]) -> str:
    """Fill a template's slots ``{0}``, ``{1}``, … with the given strings."""
    return _SLOT_RE.sub(lambda m: fills[int(m.group(1))], template)


def add_placeholders(
    tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, class_nouns: Sequence[str]
) -> list[int]:
    """Add ``<asset0>…<assetN-1>`` to the tokenizer and initialize their embedding rows.

    Each new row is the mean of the embedding rows of its class noun's tokens. Returns the new
    token ids in subject order.
    """
    tokens = [placeholder(i) for i in range(len(class_nouns))]
    present = [t for t in tokens if t in tokenizer.get_vocab()]
    if present:
        raise InputError(
            f"the tokenizer already contains {present[0]}; use a base model without placeholders"
        )
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tok_id, noun in zip(ids, class_nouns, strict=True):
            noun_ids = tokenizer(noun, add_special_tokens=False).input_ids
            if not noun_ids:
                raise InputError(f"class noun {noun!r} tokenizes to nothing; give a real word")
            weight[tok_id] = weight[noun_ids].mean(0)
    return list(ids)


@dataclass
class EncodedPrompt:
    """Token ids (padded to the tokenizer's max length) and each slot's token positions."""

    text: str
    input_ids: torch.Tensor  # (T,)
    spans: list[list[int]]


def encode_template(
    tokenizer: PreTrainedTokenizerBase, template: str, fills: Sequence[str]
) -> EncodedPrompt:
    """Tokenize ``template`` with its slots filled, recording each slot's token positions.

    The text between slots and each fill are tokenized separately and concatenated (CLIP's BPE
    works word by word, so this equals tokenizing the whole sentence when slots sit at word
    boundaries), then BOS/EOS are added and the ids padded as diffusers' pipelines do.
    """
    ids: list[int] = []
    spans: list[list[int]] = [[] for _ in fills]
    for text, slot in _iter_pieces(template):
        if slot is not None:
            text = fills[slot]
        piece = tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []
        if slot is not None:
            spans[slot].extend(range(1 + len(ids), 1 + len(ids) + len(piece)))
        ids.extend(piece)
    max_len = tokenizer.model_max_length
    if len(ids) + 2 > max_len:
        raise InputError(
            f"prompt {render(template, fills)!r} is longer than {max_len - 2} tokens; shorten it"
        )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    full = [bos, *ids, eos] + [pad] * (max_len - len(ids) - 2)
    for k, span in enumerate(spans):
        if not span:
            raise InputError(f"slot {{{k}}} of {template!r} renders to no token ({fills[k]!r})")
    return EncodedPrompt(render(template, fills), torch.tensor(full, dtype=torch.long), spans)


def _iter_pieces(template: str):
    """Yield (text, slot index or None) pieces of a template in order."""
    last = 0
    for m in _SLOT_RE.finditer(template):
        if m.start() > last:
            yield template[last : m.start()], None
        yield "", int(m.group(1))
        last = m.end()
    if last < len(template):
        yield template[last:], None


def token_weights(prompts: Sequence[EncodedPrompt], num_slots: int) -> torch.Tensor:
    """The (B, T, K) column weights for attention capture: 1/len(span) on each slot's tokens.

    A slot of several tokens (a class noun such as "teddy bear") thus yields the mean map of
    its tokens. Slots a prompt does not have stay all-zero (masked out by the losses).
    """
    t = prompts[0].input_ids.shape[0]
    w = torch.zeros(len(prompts), t, num_slots)
    for b, p in enumerate(prompts):
        for k, span in enumerate(p.spans):
            w[b, span, k] = 1.0 / len(span)
    return w


def placeholders_in(prompt: str) -> list[int]:
    """Indices of the ``<assetN>`` placeholders named in a prompt, in order of appearance."""
    return [int(m.group(1)) for m in PLACEHOLDER_RE.finditer(prompt)]
