"""The chat clients of the augmentation's LM steps: an OpenAI-compatible endpoint or a local model.

:class:`ChatClient` speaks ``POST {base_url}/chat/completions`` through the ``openai`` package
(the optional extra: ``pip install "dynasyn[chat]"``), as OpenAI, vLLM, Ollama (``/v1``),
llama.cpp's server, LM Studio and others answer it. Options fall back to environment variables:

============  =================================================  ==============================
option        environment (first set wins)                       default
============  =================================================  ==============================
base_url      ``DYNASYN_CHAT_BASE_URL``, ``OPENAI_BASE_URL``     ``https://api.openai.com/v1``
model         ``DYNASYN_CHAT_MODEL``                             (required)
api_key       ``DYNASYN_CHAT_API_KEY``, ``OPENAI_API_KEY``       none (local servers)
============  =================================================  ==============================

The key is sent as ``Authorization: Bearer <key>`` (no such header without a key) and is never
printed, logged, or put in an exception message or ``repr``. The ``openai`` package retries
timeouts, connection errors, HTTP 408/409/429 and 5xx ``max_retries`` times with exponential
backoff (honouring the server's ``Retry-After``); after the last try, on another HTTP error
(401, 404, …) or on an answer that is not a chat completion, :class:`ChatError` is raised, and
the callers fall back to their offline providers. :class:`LocalChat` runs a local transformers
model behind the same :meth:`~ChatClient.complete`. Images travel as data URLs
(:func:`image_part`).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from PIL import Image

from dynasyn.errors import InputError

__all__ = [
    "DEFAULT_BASE_URL",
    "ChatClient",
    "ChatError",
    "Completer",
    "LocalChat",
    "image_part",
    "parse_list",
    "text_part",
]

log = logging.getLogger("dynasyn.chat")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
"""Used when neither the option nor an environment variable gives a base URL."""


class ChatError(RuntimeError):
    """The chat endpoint could not give an answer (after the retries, where retried)."""


Messages = Sequence[Mapping[str, Any]]
"""Chat messages in the OpenAI format: ``[{"role": "user", "content": "…" or parts}]``."""


class Completer(Protocol):
    """Anything with :meth:`ChatClient.complete`'s signature (ChatClient, LocalChat, fakes)."""

    def complete(self, messages: Messages, temperature: float = ..., max_tokens: int = ...) -> str:
        """The answer's text to ``messages``; :class:`ChatError` when there is none."""
        ...


def text_part(text: str) -> dict[str, Any]:
    """An OpenAI content part holding ``text``."""
    return {"type": "text", "text": text}


def image_part(image: Image.Image, max_side: int = 768) -> dict[str, Any]:
    """An OpenAI content part holding ``image`` as a PNG data URL.

    The image is converted to RGB and downscaled (aspect kept) so its longer side is at most
    ``max_side`` pixels, which keeps requests small.
    """
    img = image.convert("RGB")
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.LANCZOS,
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class ChatClient:
    """Client for an OpenAI-compatible ``/chat/completions`` endpoint (the ``openai`` package).

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1``, ``http://localhost:8000/v1``
            (vLLM), ``http://localhost:11434/v1`` (Ollama), ``http://localhost:8080/v1``
            (llama.cpp). A trailing ``/chat/completions`` is accepted and stripped.
        model: the model name the server expects.
        api_key: sent as a bearer token; optional for local servers.
        timeout: seconds per request (connect, and each read or write).
        max_retries: how many times a failed request is retried (so ``1 + max_retries`` tries).

    Raises:
        InputError: the ``openai`` package is not installed, no model is given (option or
            ``DYNASYN_CHAT_MODEL``), the base URL is not http(s), or a numeric option is out of
            range.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 30,
        max_retries: int = 3,
    ) -> None:
        url = (base_url or _env("DYNASYN_CHAT_BASE_URL", "OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        url = url.strip().rstrip("/")
        if url.endswith("/chat/completions"):
            url = url[: -len("/chat/completions")]
        if not url.startswith(("http://", "https://")):
            raise InputError(
                f"chat base URL {url!r} is not http(s); give e.g. http://localhost:8000/v1"
            )
        model = model or _env("DYNASYN_CHAT_MODEL")
        if not model:
            raise InputError(
                "no chat model given; pass the model name (e.g. --chat-model gpt-4o-mini) "
                "or set DYNASYN_CHAT_MODEL"
            )
        if timeout <= 0 or max_retries < 0:
            raise InputError("chat timeout must be > 0 and max_retries >= 0")
        try:
            import openai
        except ImportError:
            raise InputError(
                'the openai chat provider needs the openai package: pip install "dynasyn[chat]" '
                "(or use --provider template / --describer scene)"
            ) from None
        self.base_url = url
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.__key = api_key or _env("DYNASYN_CHAT_API_KEY", "OPENAI_API_KEY") or ""
        self._openai = openai
        self._client = openai.OpenAI(
            base_url=url,
            # without a key the package still wants one: a stand-in, whose Authorization header
            # each request leaves out (``_headers``), so local servers see no credentials at all
            api_key=self.__key or "no-key",
            timeout=self.timeout,
            max_retries=self.max_retries,
        )
        self._headers = None if self.__key else {"Authorization": openai.Omit()}

    def __repr__(self) -> str:
        key = "set" if self.__key else "none"
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key=<{key}>)"

    @property
    def has_key(self) -> bool:
        """Whether an API key will be sent (the key itself is not exposed)."""
        return bool(self.__key)

    @property
    def endpoint(self) -> str:
        """The full chat-completions URL."""
        return self.base_url + "/chat/completions"

    def _redact(self, text: str) -> str:
        """``text`` with the key (if it appears at all) replaced by ``***``, on one line."""
        if self.__key:
            text = text.replace(self.__key, "***")
        return " ".join(text.split())

    def complete(self, messages: Messages, temperature: float = 0.7, max_tokens: int = 1024) -> str:
        """Send ``messages`` (OpenAI chat format) and return the answer's text.

        Args:
            messages: ``[{"role": "user", "content": "…" or [text_part(…), image_part(…)]}]``.
            temperature: sampling temperature.
            max_tokens: the most tokens the answer may have.

        Raises:
            ChatError: every try failed (timeouts, connection errors, 429, 5xx), the server
                refused the request (other 4xx), or the answer is not a chat completion. The
                message never contains the API key.
        """
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=list(messages),  # type: ignore[arg-type]
                temperature=temperature,
                max_tokens=max_tokens,
                extra_headers=self._headers,
            )
            content = _content(response)
        except Exception as e:  # noqa: BLE001 - every failure becomes one ChatError
            raise ChatError(self._redact(self._explain(e))) from None
        return content

    def _explain(self, e: Exception) -> str:
        """What went wrong, in one sentence naming the endpoint and how often it was tried."""
        oa = self._openai
        tries = 1 + self.max_retries
        after = f"after {tries} tr{'y' if tries == 1 else 'ies'}"
        where = f"chat endpoint {self.endpoint}"
        if isinstance(e, oa.APITimeoutError):
            return f"{where} failed {after}: timed out after {self.timeout:g}s"
        if isinstance(e, oa.APIConnectionError):
            cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
            return f"{where} failed {after}: connection failed: {_excerpt(cause)}"
        if isinstance(e, oa.APIStatusError):
            code = e.status_code
            body = e.response.text[:300] if e.response is not None else ""
            detail = f"HTTP {code} ({' '.join(body.split()) or e.message})"
            if code in (408, 409, 429) or code >= 500:
                return f"{where} failed {after}: {detail}"
            return f"{where} refused the request: {detail}"
        if isinstance(e, ValueError | oa.APIResponseValidationError):  # bad JSON, no content
            return f"{where} gave a malformed chat-completion response: {_excerpt(e)}"
        return f"{where} failed: {_excerpt(e)}"


def _content(response: Any) -> str:
    """The answer text of a chat completion; ValueError when it has none."""
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError(f"no choices[0].message.content in {str(response)[:200]!r}") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError(f"content is {content!r}")
    return content


# --------------------------------------------------------------------------------------------
# local transformers models behind the same ``complete`` interface


class LocalChat:
    """A local transformers chat model with :meth:`ChatClient.complete`'s interface.

    The model is loaded lazily (``transformers.pipeline``) on the first :meth:`complete` call;
    ``task`` is ``"text-generation"`` for a text model (Step 2) or ``"image-text-to-text"`` for a
    vision-language model (Step 1). Image parts given as data URLs (:func:`image_part`) are
    decoded back to PIL images for the pipeline. Any failure while loading or generating becomes
    :class:`ChatError`, so callers fall back exactly as they do for an endpoint.

    Args:
        model_path: a local directory holding a transformers model (with its tokenizer /
            processor and chat template).
        task: the pipeline task.
        device: passed to ``transformers.pipeline`` (``None`` = its default).

    Raises:
        InputError: ``model_path`` is not an existing directory.
    """

    def __init__(
        self, model_path: str | os.PathLike[str], task: str = "text-generation",
        device: str | int | None = None,
    ) -> None:
        path = os.fspath(model_path) if model_path is not None else ""
        if not path or not os.path.isdir(path):
            raise InputError(
                f"local model {path!r} is not a directory; give the path of a downloaded "
                f"transformers model for the {task} task (e.g. --local-model ./Qwen2.5-VL-3B)"
            )
        self.model_path = path
        self.task = task
        self.device = device
        self._pipe: Any = None

    def __repr__(self) -> str:
        return f"LocalChat({self.model_path!r}, task={self.task!r})"

    def _pipeline(self) -> Any:
        if self._pipe is None:
            try:
                from transformers import pipeline
            except ImportError as e:  # pragma: no cover - transformers is a dependency
                raise ChatError(f"transformers is not importable: {e}") from None
            try:
                self._pipe = pipeline(self.task, model=self.model_path, device=self.device)
            except Exception as e:  # noqa: BLE001 - any loading problem → fall back
                raise ChatError(
                    f"could not load local model {self.model_path} for {self.task}: {_excerpt(e)}"
                ) from None
        return self._pipe

    def complete(self, messages: Messages, temperature: float = 0.7, max_tokens: int = 1024) -> str:
        """Generate the answer to ``messages`` with the local model; see ChatClient.complete."""
        pipe = self._pipeline()
        chat = [_local_message(m) for m in messages]
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "return_full_text": False}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        try:
            out = pipe(text=chat, **kwargs) if self.task == "image-text-to-text" else pipe(
                chat, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - any generation problem → fall back
            raise ChatError(f"local model {self.model_path} failed: {_excerpt(e)}") from None
        return _generated_text(out)


def _excerpt(e: Exception) -> str:
    """``"Type: message"`` of an exception, on one line, the message cut at 300 characters."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _local_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI message → the transformers chat format (images as PIL)."""
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return {"role": message.get("role", "user"), "content": content or ""}
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            data = base64.b64decode(url.split(",", 1)[1]) if url.startswith("data:") else None
            image = Image.open(io.BytesIO(data)).convert("RGB") if data else url
            parts.append({"type": "image", "image": image})
        else:
            parts.append(dict(part))
    return {"role": message.get("role", "user"), "content": parts}


def _generated_text(out: Any) -> str:
    """The new text of a transformers pipeline output (string or chat-format)."""
    while isinstance(out, list) and out and not isinstance(out[0], str | dict):
        out = out[0]
    if isinstance(out, list) and out:
        out = out[0]
    text = out.get("generated_text", "") if isinstance(out, dict) else out
    if isinstance(text, list):  # chat format: the last message is the answer
        last = text[-1] if text else {}
        text = last.get("content", "") if isinstance(last, dict) else str(last)
    if not isinstance(text, str):
        raise ChatError(f"local model returned no text ({type(text).__name__})")
    return text


# --------------------------------------------------------------------------------------------
# parsing answers

_FENCE_RE = re.compile(r"^\s*```[\w-]*\s*$", re.MULTILINE)
_MARK_RE = re.compile(r"^\s*(?:[-*\u2022\u2013]+\s+|\(?\d{1,3}\s*[.):\]]\s*|#\d+[.:]?\s+)")


def _item_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for value in item.values():
            if isinstance(value, str):
                return value
    return ""


def _clean(line: str) -> str:
    line = line.strip().strip(",").strip()
    for _ in range(2):
        if len(line) >= 2 and line[0] in "\"'\u201c\u2018`" and line[-1] in "\"'\u201d\u2019`":
            line = line[1:-1].strip()
    line = line.strip("*_ ").strip()  # markdown emphasis
    return line


def parse_list(text: str) -> list[str]:
    """The items of a list an LM wrote, robustly.

    Accepted forms, tried in order: a JSON array anywhere in the text (of strings, or of
    objects whose first string value is taken); a JSON object holding such an array (or whose
    values are strings); else lines — when some lines are numbered (``1.``, ``2)``) or bulleted
    (``-``, ``*``, ``•``) only those are kept, so preambles and closing remarks are dropped;
    otherwise every non-empty line not ending in ``:``. Code fences, quotes, trailing commas and
    markdown emphasis are stripped.
    """
    text = _FENCE_RE.sub("", text or "")
    for open_, close in (("[", "]"), ("{", "}")):
        start, end = text.find(open_), text.rfind(close)
        if start == -1 or end <= start:
            continue
        try:
            data = json.loads(text[start : end + 1])
        except ValueError:
            continue
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if lists else [v for v in data.values() if isinstance(v, str)]
        if isinstance(data, list):
            items = [_clean(_item_text(x)) for x in data]
            items = [x for x in items if x]
            if items:
                return items
    lines = [ln for ln in text.splitlines() if ln.strip()]
    marked = [ln for ln in lines if _MARK_RE.match(ln)]
    if marked:
        lines = [_MARK_RE.sub("", ln, count=1) for ln in marked]
    else:
        lines = [ln for ln in lines if not ln.rstrip().endswith(":")]
    return [c for c in (_clean(ln) for ln in lines) if c and c not in ("[", "]")]
