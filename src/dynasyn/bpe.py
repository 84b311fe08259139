"""The real CLIP BPE tokenizer, built offline.

OpenAI's CLIP vocabulary (49,408 tokens) ships inside ``open_clip_torch`` as
``bpe_simple_vocab_16e6.txt.gz``. Install that package with ``--no-deps`` (its dependencies
pull a CUDA torch); we only read the vocabulary file and never import ``open_clip``. Once the
bundled micro model exists its ``tokenizer/`` folder is the same tokenizer, saved.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from dynasyn.errors import InputError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (as CLIP's BPE uses it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def find_bpe_vocab() -> Path:
    """Path of open_clip's BPE vocab file, without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / VOCAB_FILE
            if p.exists():
                return p
    raise InputError(
        f"the CLIP BPE vocab ({VOCAB_FILE}) was not found: "
        "install it with `pip install --no-deps open-clip-torch`"
    )


@lru_cache(maxsize=1)
def _vocab_and_merges(path: str) -> tuple[dict[str, int], tuple[str, ...]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(lines[1 : NUM_MERGES + 1])
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77, path: str | Path | None = None) -> CLIPTokenizer:
    """Build OpenAI CLIP's tokenizer (49,408 tokens) from open_clip's vocab file, offline."""
    vocab, merges = _vocab_and_merges(str(path or find_bpe_vocab()))
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges])
    tok.model_max_length = model_max_length
    return tok
