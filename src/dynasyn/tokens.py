"""Placeholder tokens and prompt templates with exact token positions.

Placeholders are ``<asset0>``, ``<asset1>``, … in mask order. Each is one new token whose
embedding row starts as the class noun's embedding (the mean of its tokens' rows for a noun of
several tokens), or — with ``vectors`` > 1 — several tokens ``<asset0>``, ``<asset0>_1``, …
(diffusers' multi-vector textual-inversion naming, so a stock pipeline expands ``<asset0>`` in a
prompt itself) whose rows start from the words of an initialization text (the subject's noun
phrase, e.g. "green checkered heart": one word per vector). Prompts are *templates* with slots — ``"{0} is throwing {1}"`` — rendered three
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


def placeholder_tokens(index: int, vectors: int = 1) -> list[str]:
    """The tokens of placeholder ``index`` with ``vectors`` vectors: ``<asset0>``,
    ``<asset0>_1``, … (diffusers' multi-vector naming)."""
    first = placeholder(index)
    return [first] + [f"{first}_{j}" for j in range(1, vectors)]


def init_words(text: str, vectors: int) -> list[str]:
    """Split an initialization text into ``vectors`` consecutive groups of words, one per vector.

    ``vectors`` 0 means one vector per word. With more vectors than words, the last word
    (the noun, in a noun phrase) fills the rest: ``("green checkered heart", 2)`` gives
    ``["green checkered", "heart"]``, ``("heart", 3)`` gives ``["heart"] * 3``.
    """
    words = [w for w in re.split(r"\s+", text.strip()) if w.lower() not in ("a", "an", "the")]
    if not words:
        raise InputError(f"initialization text {text!r} has no word; give a class noun or phrase")
    k = vectors or len(words)
    if k >= len(words):
        return words + [words[-1]] * (k - len(words))
    bounds = [round(j * len(words) / k) for j in range(k + 1)]
    return [" ".join(words[bounds[j] : bounds[j + 1]]) for j in range(k)]


def add_placeholders(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModel,
    class_nouns: Sequence[str],
    vectors: int = 1,
    init_texts: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Add ``<asset0>…<assetN-1>`` to the tokenizer and initialize their embedding rows.

    With ``vectors`` = 1 and no ``init_texts`` (the default), each placeholder is one token whose
    row is the mean of the rows of its class noun's tokens. Otherwise each placeholder has
    ``vectors`` tokens (:func:`placeholder_tokens`; 0 = one per word of its init text) and
    vector ``j`` starts as the mean row of the ``j``-th word group of its init text
    (:func:`init_words`); a subject's init text is ``init_texts[i]`` (its noun phrase) or, when
    that is ``None``, its class noun. Returns each placeholder's token ids, in subject order.
    """
    texts = list(init_texts) if init_texts is not None else [None] * len(class_nouns)
    if len(texts) != len(class_nouns):
        raise InputError(f"{len(texts)} init texts for {len(class_nouns)} subjects; give one each")
    groups = [init_words(t or noun, vectors) for t, noun in zip(texts, class_nouns, strict=True)]
    tokens = [placeholder_tokens(i, len(g)) for i, g in enumerate(groups)]
    flat = [t for ts in tokens for t in ts]
    present = [t for t in flat if t in tokenizer.get_vocab()]
    if present:
        raise InputError(
            f"the tokenizer already contains {present[0]}; use a base model without placeholders"
        )
    tokenizer.add_tokens(flat)
    ids = [list(tokenizer.convert_tokens_to_ids(ts)) for ts in tokens]
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tok_ids, words in zip(ids, groups, strict=True):
            for tok_id, word in zip(tok_ids, words, strict=True):
                word_ids = tokenizer(word, add_special_tokens=False).input_ids
                if not word_ids:
                    raise InputError(f"{word!r} tokenizes to nothing; give a real word")
                weight[tok_id] = weight[word_ids].mean(0)
    return ids


def expand_placeholders(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Write each multi-vector placeholder of ``text`` as all its tokens (``<asset0>`` ->
    ``<asset0> <asset0>_1 <asset0>_2``), as diffusers' ``maybe_convert_prompt`` does."""
    vocab = tokenizer.get_vocab()

    def _expand(m: re.Match) -> str:
        first, j, out = m.group(0), 1, [m.group(0)]
        while f"{first}_{j}" in vocab:
            out.append(f"{first}_{j}")
            j += 1
        return " ".join(out)

    return re.sub(r"<asset\d+>(?!_)", _expand, text)


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
            text = expand_placeholders(fills[slot], tokenizer)
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
