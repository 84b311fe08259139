"""Step 1 of the paper's augmentation: a short noun phrase per subject.

Providers (:func:`describe_subjects`):

``scene`` (default, offline)
    The ``phrase`` given in ``scene.json`` (or ``load_scene(phrases=…)``), else the class noun.
``openai``
    A vision-language model behind any OpenAI-compatible chat endpoint
    (:class:`~dynasyn.augment.chat.ChatClient`). One request carries the photo and, for each
    subject in mask order, the subject cut out by its mask on grey (cropped to its box) with its
    class noun, then the paper's question (``paper.json`` ``prompt_templates.vlm_describe``):
    "Describe each subject in the photo in less than 5 words using a noun phrase.", asking for
    a JSON array. The answer is parsed robustly (JSON, numbered or bulleted lines, quotes,
    "Subject 1:" labels); each phrase is lower-cased, loses a leading article and trailing
    punctuation, and one of 5 words or more is cut before its first "with"/"in"/"on"/… clause
    and then to its last 4 words (the head noun stays); an empty one becomes the class noun.
    On :class:`~dynasyn.augment.chat.ChatError` (after the client's retries), a wrong number of
    phrases, or two subjects with the same phrase, the ``scene`` provider is used with ONE
    warning (``logging.getLogger("dynasyn")``).
``local``
    The same request to a local transformers ``image-text-to-text`` model (a directory, e.g. a
    downloaded Qwen2-VL / LLaVA / SmolVLM checkpoint with its processor and chat template),
    loaded lazily on first use; a path that is not a directory is refused with
    :class:`~dynasyn.errors.InputError`; loading or generation failures fall back like
    ``openai``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
from PIL import Image

from dynasyn.augment.chat import (
    ChatClient,
    ChatError,
    Completer,
    LocalChat,
    image_part,
    parse_list,
    text_part,
)
from dynasyn.errors import InputError
from dynasyn.scene import MASK_THRESHOLD, Scene

__all__ = ["MAX_PHRASE_WORDS", "VLM_DESCRIBE", "clean_phrase", "describe_subjects", "subject_crop"]

log = logging.getLogger("dynasyn")

VLM_DESCRIBE = "Describe each subject in the photo in less than 5 words using a noun phrase."
"""The paper's question (paper.json ``prompt_templates.vlm_describe``), verbatim."""

MAX_PHRASE_WORDS = 4
""""Less than 5 words": longer phrases from a model are shortened (:func:`clean_phrase`)."""

_GREY = (128, 128, 128)
_CUT_WORDS = (
    "with", "in", "on", "wearing", "holding", "that", "which", "who", "sitting", "standing",
    "lying", "next", "near", "beside", "under", "from", "at",
)
_LABEL_RE = re.compile(
    r"^\s*(?:subject|object|item|image)\s*#?\d+\s*(?:\([^)]*\))?\s*[:.)\-\u2013]\s*", re.IGNORECASE
)
_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def subject_crop(
    image: Image.Image, mask: np.ndarray, margin: float = 0.1, max_side: int = 384
) -> Image.Image:
    """The subject cut out by its mask on grey, cropped to its box plus ``margin`` (Step 1).

    Args:
        image: the scene photo (RGB).
        mask: the subject's ``H x W`` mask in [0, 1] (binarized at ``MASK_THRESHOLD``).
        margin: padding around the box, as a fraction of the box's larger side.
        max_side: the result is downscaled so its longer side is at most this.
    """
    rgb = np.asarray(image.convert("RGB"))
    m = np.asarray(mask) >= MASK_THRESHOLD
    if m.shape != rgb.shape[:2] or not m.any():
        raise InputError("subject mask is empty or does not match the photo's size")
    out = np.empty_like(rgb)
    out[...] = _GREY
    out[m] = rgb[m]
    ys, xs = np.nonzero(m)
    pad = int(round(margin * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    top, bottom = max(0, ys.min() - pad), min(m.shape[0], ys.max() + 1 + pad)
    left, right = max(0, xs.min() - pad), min(m.shape[1], xs.max() + 1 + pad)
    crop = Image.fromarray(out[top:bottom, left:right])
    if max(crop.size) > max_side:
        s = max_side / max(crop.size)
        crop = crop.resize(
            (max(1, round(crop.width * s)), max(1, round(crop.height * s))),
            Image.Resampling.LANCZOS,
        )
    return crop


def clean_phrase(text: str, class_noun: str) -> str:
    """Normalize a model's noun phrase; shorten it to at most :data:`MAX_PHRASE_WORDS` words.

    Lower-cases, drops a "Subject 1:" label, quotes, a leading article and trailing
    punctuation. A phrase that is too long is cut before its first clause word ("with", "in",
    "on", "wearing", …) and then keeps its last words (the head noun of an English noun phrase
    comes last); an empty result is replaced by ``class_noun``.
    """
    t = _LABEL_RE.sub("", text or "").strip()
    t = t.strip(" \t\"'`*_\u201c\u201d\u2018\u2019").rstrip(".!?;:,").strip()
    t = " ".join(re.sub(r"[^\w\s'\-]", " ", t.lower()).split())
    t = _ARTICLE_RE.sub("", t)
    words = t.split()
    if len(words) > MAX_PHRASE_WORDS:
        for k, w in enumerate(words):
            if k > 0 and w in _CUT_WORDS:
                words = words[:k]
                break
        words = words[-MAX_PHRASE_WORDS:]
        words = words[1:] if words and words[0] in ("a", "an", "the", "and") else words
    phrase = " ".join(words)
    return phrase if re.search(r"[a-z]", phrase) else class_noun


def _describe_messages(scene: Scene) -> list[dict[str, Any]]:
    n = len(scene.subjects)
    content: list[dict[str, Any]] = [
        text_part("The photo:"),
        image_part(scene.image),
        text_part(
            f"It shows {n} subject{'s' if n != 1 else ''}; each is shown below cut out on a grey "
            "background, in order."
        ),
    ]
    for s, mask in zip(scene.subjects, scene.masks, strict=True):
        content.append(text_part(f"Subject {s.index + 1} (a {s.class_noun}):"))
        content.append(image_part(subject_crop(scene.image, mask)))
    content.append(
        text_part(
            f"{VLM_DESCRIBE} Answer with a JSON array of exactly {n} strings, one noun phrase "
            "per subject in the order above, and nothing else."
        )
    )
    return [{"role": "user", "content": content}]


def _parse_phrases(answer: str, scene: Scene) -> list[str]:
    """The ``len(scene)`` phrases of a VLM answer; raises ValueError when they do not fit."""
    items = parse_list(answer)
    n = len(scene.subjects)
    if len(items) == 1 and n > 1:  # "green bowl, orange seashell, toy panda"
        items = [p for p in re.split(r"\s*[;,]\s*", items[0]) if p.strip()]
    if len(items) != n:
        raise ValueError(f"expected {n} phrases, got {len(items)}")
    phrases = [clean_phrase(p, s.class_noun) for p, s in zip(items, scene.subjects, strict=True)]
    if len({p.lower() for p in phrases}) != n:
        raise ValueError(f"two subjects got the same phrase ({phrases})")
    return phrases


def _scene_phrases(scene: Scene) -> list[str]:
    return [s.phrase or s.class_noun for s in scene.subjects]


def describe_subjects(
    scene: Scene,
    provider: str = "scene",
    client: Completer | None = None,
    local_model: str | None = None,
) -> list[str]:
    """Step 1 of the paper (subject description): a noun phrase (< 5 words) per subject.

    Args:
        scene: the loaded scene.
        provider: ``"scene"`` (scene.json phrases, else class nouns), ``"openai"`` (a VLM behind
            an OpenAI-compatible endpoint) or ``"local"`` (a transformers image-text-to-text
            model directory). See the module docstring.
        client: for ``"openai"`` only (ignored otherwise): a :class:`ChatClient` or anything
            with its ``complete``; built from the ``DYNASYN_CHAT_*`` environment when ``None``.
        local_model: for ``"local"``: the model directory.

    Returns:
        One phrase per subject, in mask order. The ``scene`` provider returns the given phrases
        unchanged (whatever their length: they are the user's choice).

    Raises:
        InputError: unknown provider, missing local model directory, or an unusable chat
            configuration. Model failures do not raise: they fall back to ``scene``.
    """
    if provider == "scene":
        return _scene_phrases(scene)
    if provider == "openai":
        client = client or ChatClient()
    elif provider == "local":
        if not local_model:
            raise InputError(
                "the local describe provider needs a model directory (--local-model PATH)"
            )
        client = LocalChat(local_model, task="image-text-to-text")
    else:
        raise InputError(f"unknown describe provider {provider!r}; use scene, openai or local")
    try:
        answer = client.complete(_describe_messages(scene), temperature=0.0, max_tokens=200)
        return _parse_phrases(answer, scene)
    except (ChatError, ValueError) as e:
        log.warning(
            "describe provider %r failed (%s); using the scene's phrases / class nouns",
            provider,
            " ".join(str(e).split()),
        )
        return _scene_phrases(scene)
