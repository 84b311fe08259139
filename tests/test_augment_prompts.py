"""Steps 1-2 of the augmentation: the chat client, describe and prompt providers (offline).

The OpenAI-compatible endpoint is a real ``http.server`` on 127.0.0.1 (port 0) started by the
tests; it answers scripted chat completions, errors, slow answers and malformed JSON to the
``openai`` package's client. Its error answers carry ``retry-after-ms: 10``, which the client
honours, so the retries take milliseconds.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from dynasyn.augment.chat import ChatClient, ChatError, image_part, parse_list, text_part
from dynasyn.augment.describe import clean_phrase, describe_subjects
from dynasyn.augment.prompts import (
    LM_FILTER,
    PromptItem,
    category,
    generate_prompts,
    sentence_to_item,
    template_prompts,
)
from dynasyn.errors import InputError
from dynasyn.scene import load_scene

KEY = "sk-test-SECRET-4f8a9c"

Reply = tuple[int, bytes, float]  # status, body, delay before answering


def ok(content: str, delay: float = 0.0) -> Reply:
    body = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]}
    return 200, json.dumps(body).encode(), delay


def status(code: int, text: str = "") -> Reply:
    return code, text.encode(), 0.0


class ChatServer:
    """A chat-completions server on 127.0.0.1 answering with ``responder(n, request)``."""

    def __init__(self, responder: Callable[[int, dict[str, Any]], Reply]) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                # the headers as received: names are case-insensitive
                req = {"path": self.path, "headers": self.headers, "body": body}
                outer.requests.append(req)
                code, payload, delay = outer.responder(len(outer.requests) - 1, req)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    if code >= 400:
                        self.send_header("retry-after-ms", "10")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def client(self, **kw: Any) -> ChatClient:
        opts = {"model": "test-model", "api_key": KEY, "timeout": 2.0, "max_retries": 2, **kw}
        return ChatClient(self.base_url, **opts)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[ChatServer] = []

    def start(responder: Callable[[int, dict[str, Any]], Reply]) -> ChatServer:
        servers.append(ChatServer(responder))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def last_user_text(req: dict[str, Any]) -> str:
    content = req["body"]["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p["type"] == "text")


CLASSES = ["panda", "bowl"]
PHRASES = ["toy panda", "green bowl"]

HAT = ["The green bowl is resting on the head of the toy panda."]
# scripted LM answers, keyed by what the request asks for
GENERATE = {
    "between toy panda and green bowl": "Here are the sentences:\n"
    + "\n".join([
        "1. The toy panda is drinking water from a green bowl.",
        "2. A toy panda sits alone on a rock.",  # loses the bowl: dropped
        "3. The toy panda is throwing the green bowl.",
    ]),
    "between green bowl and toy panda": json.dumps(HAT),
    "describing toy panda doing": '```json\n["The toy panda is climbing a bamboo stalk.", '
    '"The toy panda is eating next to the green bowl."]\n```',  # names the bowl: dropped
    "describing green bowl doing": "- The green bowl is filled with cherries.\n- A green bowl "
    "is spinning on a table.",
}
FILTERED = {
    "between toy panda and green bowl": '["The toy panda is drinking water from a green bowl.", '
    '"A toy panda sits alone on a rock."]',
    "between green bowl and toy panda": json.dumps(HAT),
    "describing toy panda doing": '["The toy panda is climbing a bamboo stalk."]',
    "describing green bowl doing": '["The green bowl is filled with cherries."]',
}


def lm_responder(n: int, req: dict[str, Any]) -> Reply:
    first = req["body"]["messages"][0]["content"]
    table = FILTERED if LM_FILTER in last_user_text(req) else GENERATE
    for key, answer in table.items():
        if key in first:
            return ok(answer)
    return status(400, "unexpected request")


# --------------------------------------------------------------------------------------------
# chat client


def test_chat_success_sends_key_model_and_image(serve):
    srv = serve(lambda n, r: ok("hello"))
    client = srv.client()
    img = Image.new("RGB", (1000, 500), (10, 200, 30))
    answer = client.complete(
        [{"role": "user", "content": [text_part("hi"), image_part(img)]}], temperature=0.1,
        max_tokens=7,
    )
    assert answer == "hello"
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "test-model" and body["max_tokens"] == 7
    url = body["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert KEY not in repr(client)


def test_chat_env_fallbacks(monkeypatch):
    for name in ("DYNASYN_CHAT_BASE_URL", "OPENAI_BASE_URL", "DYNASYN_CHAT_MODEL",
                 "DYNASYN_CHAT_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match="DYNASYN_CHAT_MODEL"):
        ChatClient()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("DYNASYN_CHAT_MODEL", "m")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = ChatClient()
    assert client.endpoint == "http://127.0.0.1:9/v1/chat/completions"
    assert client.model == "m" and client.has_key and KEY not in repr(client)
    monkeypatch.setenv("DYNASYN_CHAT_BASE_URL", "http://127.0.0.1:8/v1/chat/completions")
    assert ChatClient().endpoint == "http://127.0.0.1:8/v1/chat/completions"


def test_chat_timeout_then_error(serve):
    srv = serve(lambda n, r: ok("late", delay=0.6))
    client = srv.client(timeout=0.2, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(ChatError, match="timed out"):
        client.complete([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 2.0
    assert len(srv.requests) == 2


def test_chat_timeout_then_success(serve):
    srv = serve(lambda n, r: ok("late", delay=0.6) if n == 0 else ok("on time"))
    assert srv.client(timeout=0.2).complete([{"role": "user", "content": "hi"}]) == "on time"


def test_chat_500_then_success_and_429(serve):
    script = [status(500, "boom"), status(429, "slow down"), ok("fine")]
    srv = serve(lambda n, r: script[n])
    assert srv.client().complete([{"role": "user", "content": "hi"}]) == "fine"
    assert len(srv.requests) == 3


def test_chat_malformed_answer_is_an_error(serve):
    for body in (b"not json{", b'{"choices": []}', b'{"choices": [{"message": {}}]}'):
        srv = serve(lambda n, r, body=body: (200, body, 0.0))
        with pytest.raises(ChatError, match="malformed"):
            srv.client().complete([{"role": "user", "content": "hi"}])
        assert len(srv.requests) == 1  # a server that answers nonsense is not asked again
    parts = {"choices": [{"message": {"role": "assistant",
                                      "content": [{"type": "text", "text": "in "},
                                                  {"type": "text", "text": "parts"}]}}]}
    srv = serve(lambda n, r: (200, json.dumps(parts).encode(), 0.0))
    assert srv.client().complete([{"role": "user", "content": "hi"}]) == "in parts"


def test_chat_without_key_sends_no_authorization(serve, monkeypatch):
    for name in ("DYNASYN_CHAT_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    srv = serve(lambda n, r: ok("local"))
    client = srv.client(api_key=None)
    assert not client.has_key and "api_key=<none>" in repr(client)
    assert client.complete([{"role": "user", "content": "hi"}]) == "local"
    assert "Authorization" not in srv.requests[0]["headers"]


def test_chat_needs_the_openai_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)  # make `import openai` fail
    with pytest.raises(InputError, match=r'pip install "dynasyn\[chat\]"'):
        ChatClient("http://127.0.0.1:9/v1", model="m")


def test_chat_4xx_not_retried(serve):
    srv = serve(lambda n, r: status(404, "no such model"))
    with pytest.raises(ChatError, match="404"):
        srv.client().complete([{"role": "user", "content": "hi"}])
    assert len(srv.requests) == 1


def test_api_key_never_in_logs_or_errors(serve, caplog):
    # a hostile server echoes the Authorization header back in its error bodies
    def echo(n: int, req: dict[str, Any]) -> Reply:
        code = 503 if n < 2 else 401
        return status(code, "bad auth " + req["headers"].get("Authorization", ""))

    srv = serve(echo)
    client = srv.client()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ChatError) as info:
        client.complete([{"role": "user", "content": "hi"}])
    assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert KEY not in caplog.text and KEY not in repr(client)
    assert "***" in str(info.value)
    # the fallback path logs the error too: still no key
    srv2 = serve(lambda n, r: status(500, "key was " + KEY))
    generate_prompts(CLASSES, PHRASES, 4, provider="openai", client=srv2.client())
    assert KEY not in caplog.text


def test_local_chat_messages_decode_images(tmp_path):
    from dynasyn.augment.chat import LocalChat, _local_message

    with pytest.raises(InputError, match="not a directory"):
        LocalChat(tmp_path / "absent")
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    msg = _local_message({"role": "user", "content": [text_part("hi"), image_part(img)]})
    assert msg["content"][0] == {"type": "text", "text": "hi"}
    decoded = msg["content"][1]["image"]
    assert decoded.size == (40, 20) and decoded.getpixel((0, 0)) == (255, 0, 0)


def test_parse_list_forms():
    assert parse_list('Sure!\n```json\n["a b", "c d"]\n```\nEnjoy.') == ["a b", "c d"]
    assert parse_list("Here they are:\n1. One.\n2) Two.\n- Three\nThat's all!") == [
        "One.", "Two.", "Three"]
    assert parse_list('{"sentences": [{"text": "x y"}, "z"]}') == ["x y", "z"]
    assert parse_list('"first",\n"second"') == ["first", "second"]
    assert parse_list("") == []


# --------------------------------------------------------------------------------------------
# Step 1: describe


def test_describe_scene_provider(scene2):
    scene = load_scene(scene2, phrases=["toy panda with a white belly", None])
    assert describe_subjects(scene) == ["toy panda with a white belly", "bowl"]


def test_describe_openai_success(serve, scene2):
    srv = serve(lambda n, r: ok('```json\n["A black Toy Panda", "green bowl."]\n```'))
    scene = load_scene(scene2)
    assert describe_subjects(scene, "openai", client=srv.client()) == ["black toy panda",
                                                                      "green bowl"]
    (req,) = srv.requests
    parts = req["body"]["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert len(images) == 1 + len(scene.subjects)  # the photo + one cut-out per subject
    assert "Describe each subject in the photo in less than 5 words using a noun phrase." in (
        last_user_text(req))


def test_describe_openai_falls_back_once(serve, scene2, caplog):
    srv = serve(lambda n, r: status(502, "bad gateway"))
    scene = load_scene(scene2)
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        assert describe_subjects(scene, "openai", client=srv.client()) == ["panda", "bowl"]
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1
    # a wrong number of phrases is an unusable answer too
    srv2 = serve(lambda n, r: ok('["just one thing"]'))
    caplog.clear()
    assert describe_subjects(scene, "openai", client=srv2.client()) == ["panda", "bowl"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_describe_local_missing_path(scene2, tmp_path):
    scene = load_scene(scene2)
    with pytest.raises(InputError, match="not a directory"):
        describe_subjects(scene, "local", local_model=str(tmp_path / "missing"))
    with pytest.raises(InputError, match="unknown describe provider"):
        describe_subjects(scene, "gpt")


def test_clean_phrase_shortens():
    assert clean_phrase("Subject 2: A toy panda with a white belly.", "panda") == "toy panda"
    assert clean_phrase("small fluffy black and white panda", "panda") == "black and white panda"
    assert clean_phrase("  '' ", "bowl") == "bowl"


# --------------------------------------------------------------------------------------------
# Step 2: prompts from an LM


def test_prompts_openai_success(serve, caplog):
    srv = serve(lm_responder)
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        items = generate_prompts(CLASSES, PHRASES, 4, provider="openai", client=srv.client())
    assert not caplog.records
    assert len(srv.requests) == 8  # 4 groups x (generate, filter)
    filt = srv.requests[1]["body"]["messages"]
    assert [m["role"] for m in filt] == ["user", "assistant", "user"]
    by_group = {(it.kind, tuple(it.subjects)): it for it in items}
    assert set(by_group) == {("action", (0,)), ("action", (1,)),
                             ("interaction", (0, 1)), ("interaction", (1, 0))}
    drink = by_group[("interaction", (0, 1))]
    assert drink.template == "The {0} is drinking water from the {1}."
    assert drink.placeholder_prompt() == "The <asset0> is drinking water from the <asset1>."
    assert drink.class_prompt(CLASSES) == "The panda is drinking water from the bowl."
    assert drink.phrase_prompt(PHRASES) == "The toy panda is drinking water from the green bowl."
    hat = by_group[("interaction", (1, 0))]
    assert hat.placeholder_prompt() == "The <asset1> is resting on the head of the <asset0>."
    assert hat.phrase_prompt(PHRASES) == "The green bowl is resting on the head of the toy panda."
    assert by_group[("action", (0,))].template == "The {0} is climbing a bamboo stalk."
    assert by_group[("action", (1,))].class_prompt(CLASSES) == "The bowl is filled with cherries."
    rec = drink.record(CLASSES, PHRASES)
    assert rec["subjects"] == [0, 1] and rec["placeholder_prompt"] == drink.placeholder_prompt()


def test_sentences_that_lose_a_subject_are_dropped():
    def conv(s: str, req: list[int]) -> PromptItem | None:
        return sentence_to_item(s, PHRASES, CLASSES, req)

    assert conv("A toy panda sits alone on a rock.", [0, 1]) is None  # lost the bowl
    assert conv("The toy panda eats next to the green bowl.", [0]) is None  # names another
    assert conv("The toy panda hugs another toy panda.", [0]) is None  # ambiguous
    it = conv("Green Bowl falls on a toy panda", [0, 1])
    assert it is not None and it.template == "{0} falls on the {1}." and it.subjects == [1, 0]
    # the class noun stands in when the phrase is absent
    it = conv("The panda kicks the green bowl!", [0, 1])
    assert it is not None and it.template == "The {0} kicks the {1}!"
    # a shorter run of the phrase's words ending in the class noun names the subject too
    long = ["toy panda with a white belly", "green bowl"]
    it = sentence_to_item("The toy panda sips from a bowl.", long, CLASSES, [0, 1])
    assert it is not None and it.template == "The {0} sips from the {1}."
    assert it.phrase_prompt(long) == "The toy panda with a white belly sips from the green bowl."
    assert sentence_to_item("The toy panda hugs a bowl and a panda.", long, CLASSES, [0, 1]) is None


def test_prompts_persistent_5xx_falls_back_with_one_warning(serve, caplog):
    srv = serve(lambda n, r: status(503, "overloaded"))
    with caplog.at_level(logging.DEBUG):
        items = generate_prompts(CLASSES, PHRASES, 10, provider="openai", seed=3,
                                 client=srv.client())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "template" in warnings[0].getMessage()
    assert len(srv.requests) == 3  # 1 + 2 retries, then no further conversation
    assert [i.key for i in items] == [i.key for i in template_prompts(CLASSES, 10, seed=3)]


def test_prompts_malformed_json_falls_back(serve, caplog):
    srv = serve(lambda n, r: (200, b"<html>oops</html>", 0.0))
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        items = generate_prompts(CLASSES, PHRASES, 6, provider="openai", client=srv.client())
    assert len(items) == 6 and len(caplog.records) == 1
    assert "malformed" in caplog.records[0].getMessage()


def test_prompts_partial_failure_keeps_items(serve, caplog):
    # the first conversation (pair 0-1) succeeds, then the endpoint dies
    srv = serve(lambda n, r: lm_responder(n, r) if n < 2 else status(500, "down"))
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        items = generate_prompts(CLASSES, PHRASES, 8, provider="openai", client=srv.client())
    assert len(caplog.records) == 1
    assert len(items) == 8
    templates = {it.template for it in items}
    assert "The {0} is drinking water from the {1}." in templates  # kept from the LM
    assert len({it.key for it in items}) == 8


def test_prompts_unusable_answer_falls_back(serve, caplog):
    srv = serve(lambda n, r: ok("I cannot help with that."))
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        items = generate_prompts(CLASSES, PHRASES, 4, provider="openai", client=srv.client())
    assert len(items) == 4 and len(caplog.records) == 1
    assert len(srv.requests) == 2  # one conversation, then the templates take over


def test_prompts_bad_provider_and_local_path(tmp_path):
    with pytest.raises(InputError, match="unknown prompt provider"):
        generate_prompts(CLASSES, PHRASES, provider="gpt")
    with pytest.raises(InputError, match="not a directory"):
        generate_prompts(CLASSES, PHRASES, provider="local", local_model=str(tmp_path / "nope"))
    with pytest.raises(InputError):
        generate_prompts(CLASSES, PHRASES, num_prompts=0)


# --------------------------------------------------------------------------------------------
# Step 2: the offline template provider


def test_micro_provider_uses_the_world_grammar():
    from dynasyn.micro.world import valid_actions, valid_relations

    items = generate_prompts(["star", "cat"], num_prompts=10, provider="micro", seed=0)
    assert len(items) == 10 and all(isinstance(it, PromptItem) for it in items)
    assert Counter(it.kind for it in items) == {"action": 5, "interaction": 5}
    assert max(Counter(tuple(it.subjects) for it in items).values()) <= 3  # spread out
    classes = ["star", "cat"]
    for it in items:
        verb = it.template.removeprefix("a {0} is ").removesuffix(" a {1}")
        if it.kind == "action":
            assert verb in valid_actions(classes[it.subjects[0]]) and verb != "standing"
        else:
            assert verb in valid_relations(*(classes[s] for s in it.subjects))
        assert it.placeholder_prompt().startswith("a <asset")
    again = generate_prompts(["star", "cat"], num_prompts=10, provider="micro", seed=0)
    assert [it.key for it in again] == [it.key for it in items]
    with pytest.raises(InputError, match="--provider template"):
        generate_prompts(["panda"], provider="micro")


def test_template_deterministic_for_seed():
    a = generate_prompts(["panda", "bowl", "seashell"], num_prompts=30, seed=7)
    b = generate_prompts(["panda", "bowl", "seashell"], num_prompts=30, seed=7)
    c = generate_prompts(["panda", "bowl", "seashell"], num_prompts=30, seed=8)
    assert [x.key for x in a] == [x.key for x in b]
    assert [x.key for x in a] != [x.key for x in c]


def test_template_balance_and_no_duplicates():
    classes = ["panda", "bowl", "seashell"]
    items = template_prompts(classes, 30, seed=0)
    assert len(items) == 30
    kinds = Counter(it.kind for it in items)
    assert kinds == {"action": 15, "interaction": 15}
    acts = Counter(it.subjects[0] for it in items if it.kind == "action")
    assert sorted(acts.values()) == [5, 5, 5]
    pairs = Counter(tuple(it.subjects) for it in items if it.kind == "interaction")
    assert len(pairs) == 6 and max(pairs.values()) - min(pairs.values()) <= 1
    per_subject = Counter(s for it in items for s in it.subjects)
    assert max(per_subject.values()) - min(per_subject.values()) <= 1
    assert len({it.template for it in items}) == 30  # not even the same string twice
    # one subject: only actions; many prompts: still no repeated item
    solo = template_prompts(["cat"], 40, seed=1)
    assert {it.kind for it in solo} == {"action"} and len({it.key for it in solo}) == 40


def test_template_is_class_aware():
    assert [category(c) for c in ["panda", "Teddy Bear", "soccer ball", "bowls", "figurine",
                                  "stone"]] == ["animal", "toy", "ball", "container", "person",
                                                "object"]
    items = template_prompts(["panda", "bowl"], 200, seed=0)
    panda_bowl = {it.template for it in items if it.subjects == [0, 1]}
    assert "{0} is drinking water from the {1}." in panda_bowl
    assert "{0} is filling the {1} with water." in panda_bowl
    assert "{0} is throwing the {1}." in panda_bowl
    bowl_acts = {it.template for it in items if it.subjects == [1]}
    assert "The {0} is filled with water." in bowl_acts
    panda_acts = {it.template for it in items if it.subjects == [0]}
    assert "The {0} is running." in panda_acts and not panda_acts & bowl_acts
    # a stone does not dance or throw; a ball can be kicked
    stone = template_prompts(["stone", "ball"], 100, seed=0)
    assert not any(re.search(r"dancing|throwing|kicking", it.template) for it in stone
                   if it.subjects[0] == 0)
    cat_ball = {it.template for it in template_prompts(["cat", "ball"], 100, seed=0)
                if it.subjects == [0, 1]}
    assert "{0} is kicking the {1}." in cat_ball


def test_paper_style_renderings():
    throw = next(it for it in template_prompts(["panda", "bowl"], 200, seed=0)
                 if it.template == "{0} is throwing the {1}.")
    assert throw.placeholder_prompt() == "<asset0> is throwing the <asset1>."
    assert throw.class_prompt(CLASSES) == "panda is throwing the bowl."
    assert throw.phrase_prompt(PHRASES) == "toy panda is throwing the green bowl."
    for it in template_prompts(["panda", "bowl"], 30, seed=0):
        ph = it.placeholder_prompt()
        if it.kind == "action":
            assert re.fullmatch(r"The <asset[01]> is [\w ,'-]+\.", ph), ph
        else:
            assert re.fullmatch(r"<asset([01])> is [\w ,'-]+ the <asset(?!\1)[01]>[\w ,'-]*\.",
                                ph), ph


def test_local_provider_runs_a_tiny_local_model_end_to_end(tmp_path, caplog):
    """A tiny random causal LM saved on disk: loaded, prompted, parsed (or fallen back)."""
    import logging

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "panda", "bowl", "is", "throwing", "washing", ".",
             "1", "toy", "green", "jumping"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    with caplog.at_level(logging.WARNING, logger="dynasyn"):
        items = generate_prompts(["panda", "bowl"], ["toy panda", "green bowl"], num_prompts=4,
                                 provider="local", local_model=str(tmp_path / "lm"))
    assert len(items) == 4
    for it in items:
        assert "<asset" in it.placeholder_prompt() and "{" not in it.class_prompt(["panda", "bowl"])
    # random weights cannot write sentences naming both subjects: at most one fallback warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 1
    assert not any("could not load" in w for w in warnings), warnings  # the model did run
