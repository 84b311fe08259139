"""Step 2 of the paper's augmentation: action and interaction prompts, in template form.

Every prompt is a :class:`PromptItem`: a template with slots (``"{0} is throwing the {1}."``)
and the subject index of each slot, so its three renderings are exact::

    placeholder  "<asset0> is throwing the <asset1>."
    class        "panda is throwing the bowl."
    phrase       "toy panda with a white belly is throwing the green bowl."

The style follows the paper's evaluation prompts (``paper.json`` ``eval_prompts``): an action
reads ``"The {0} is running."`` and an interaction ``"{0} is throwing the {1}."``.

Providers (:func:`generate_prompts`):

``template`` (offline default)
    A class-aware generator. Each class noun is put in a category by a small built-in lexicon
    (:data:`LEXICON`; :func:`category`): ``animal`` (animals and creatures), ``person`` (people,
    figurines, dolls, robots), ``toy`` (plush and toy figures), ``ball``, ``container`` (bowls,
    cups, vases, boxes …) or ``object`` (everything else). Actions come from the subject's
    category, interactions from the pair's categories (an animal or person throws, carries,
    drinks from a bowl or sits in it; objects are inside / leaning against each other, or are
    "being carried by" an animate subject); the category-specific interactions come before the
    purely spatial ones ("next to", "behind", …), which are used once the specific ones are.

    Balance: half of the prompts (rounded down) are interactions when the scene has two or more
    subjects (none with one subject); actions are split evenly over the subjects and
    interactions evenly over the *ordered* pairs (counts differ by at most one; who gets the
    remainder is drawn with the seed and given where it keeps each subject's total count,
    actions plus interactions, most even). Deterministic for a
    seed; no (template, subjects) item repeats, and a template string is reused for another
    subject only when the category's pool is exhausted. Pools are extended by a time of day
    ("… at sunset.") before anything repeats.
``openai``
    The paper's two-step generate-then-filter conversation with an LM (``paper.json``
    ``prompt_templates.lm_generate`` and ``lm_filter``; ``{P0}``/``{P1}`` become the subjects'
    noun phrases): one conversation per ordered pair (P0 = the first slot) and, with the same
    wording adapted to one subject, one per subject for actions. Each sentence is turned back
    into a template by locating each subject's phrase (case-insensitive, with an optional
    "a"/"an"/"the" before it, which becomes "the"; the class noun is accepted when the phrase
    is absent). Sentences that lose a requested subject, name another subject, or name one
    ambiguously are dropped. The same balanced selection as ``template`` picks the items; a
    group the LM left short is filled from the template pools. When the endpoint fails (after
    the client's retries) or answers nothing usable, the run stops asking, logs ONE warning
    (``logging.getLogger("dynasyn")``) and fills the rest from the template provider, keeping
    every item already produced.
``local``
    The same conversation with a local transformers text-generation model given by path
    (:class:`~dynasyn.augment.chat.LocalChat`); the same parsing and fallback.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dynasyn.augment.chat import ChatClient, ChatError, Completer, LocalChat, parse_list
from dynasyn.errors import InputError
from dynasyn.tokens import placeholder, render

__all__ = [
    "CATEGORIES",
    "LEXICON",
    "LM_FILTER",
    "LM_GENERATE",
    "LM_GENERATE_ACTION",
    "PromptItem",
    "category",
    "generate_prompts",
    "sentence_to_item",
    "template_prompts",
]

log = logging.getLogger("dynasyn")

Kind = Literal["action", "interaction"]

# The paper's prompts (paper.json prompt_templates), verbatim.
LM_GENERATE = (
    "Generate more than 100 diverse sentences describing the interaction between {P0} and {P1}."
)
LM_FILTER = (
    "Keep only 50 natural sentences and ensure that the occurrences of objects, excluding the "
    "subject, are balanced."
)
# The paper gives no action prompt; this is LM_GENERATE's wording for one subject.
LM_GENERATE_ACTION = (
    "Generate more than 100 diverse sentences describing {P0} doing an action on its own."
)
_FORMAT_PAIR = (
    ' Name the two subjects exactly as "{P0}" and "{P1}", each once per sentence, and mention '
    "no other subject. Answer with a JSON array of strings only."
)
_FORMAT_ONE = (
    ' Name the subject exactly as "{P0}", once per sentence, and mention no other subject. '
    "Answer with a JSON array of strings only."
)
_FORMAT_FILTER = " Answer with a JSON array of strings only."


@dataclass
class PromptItem:
    """One augmentation prompt in template form.

    Attributes:
        template: text with slots ``{0}``, ``{1}``, … (e.g. ``"{0} is throwing the {1}."``).
        subjects: the subject index of each slot (slot ``j`` is subject ``subjects[j]``).
        kind: ``"action"`` (one subject) or ``"interaction"`` (two or more).
    """

    template: str
    subjects: list[int]
    kind: Kind = "action"

    def _fills(self, names: Sequence[str]) -> list[str]:
        return [names[s] for s in self.subjects]

    def phrase_prompt(self, phrases: Sequence[str]) -> str:
        """The template with each slot filled by its subject's noun phrase (indexed by subject)."""
        return render(self.template, self._fills(phrases))

    def class_prompt(self, classes: Sequence[str]) -> str:
        """The template with each slot filled by its subject's class noun (indexed by subject)."""
        return render(self.template, self._fills(classes))

    def placeholder_prompt(self) -> str:
        """The template with each slot filled by its subject's placeholder ``<asset{i}>``."""
        return render(self.template, [placeholder(s) for s in self.subjects])

    def record(self, classes: Sequence[str], phrases: Sequence[str]) -> dict[str, Any]:
        """The ``prompts.jsonl`` fields of this item (``template``, ``subjects``, ``kind`` and
        the three renderings); the caller adds ``seed`` and file names."""
        return {
            "template": self.template,
            "subjects": list(self.subjects),
            "kind": self.kind,
            "phrase_prompt": self.phrase_prompt(phrases),
            "class_prompt": self.class_prompt(classes),
            "placeholder_prompt": self.placeholder_prompt(),
        }

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        """Identity of the item: (template, subjects)."""
        return self.template, tuple(self.subjects)


# --------------------------------------------------------------------------------------------
# categories

CATEGORIES = ("animal", "person", "toy", "ball", "container", "object")
"""The categories of :func:`category`; ``object`` is the default."""

_ANIMATE = frozenset({"animal", "person", "toy"})
_THINGS = frozenset({"ball", "object", "toy", "container"})
_ALL = frozenset(CATEGORIES)

LEXICON: dict[str, str] = {}
"""Class noun (lower case, singular) → category. Multi-word nouns are looked up whole first,
then by their last word ("toy panda" → "panda" → animal)."""

for _cat, _words in {
    "animal": (
        "animal creature monster panda bear cat kitten dog puppy duck duckling bird chicken "
        "chick hen owl penguin parrot rabbit bunny fox wolf lion tiger elephant giraffe horse "
        "pony cow pig piglet sheep lamb goat monkey gorilla frog toad turtle tortoise fish "
        "mouse hamster squirrel koala deer zebra dinosaur dragon unicorn snake lizard hedgehog "
        "raccoon otter seal dolphin whale shark crab octopus bee butterfly sloth kangaroo "
        "camel llama alpaca hippo rhino cheetah leopard panther"
    ),
    "person": (
        "person man woman boy girl child kid baby people figurine figure doll robot astronaut "
        "knight soldier superhero wizard princess prince king queen character statue minifigure "
        "clown pirate ninja cowboy chef firefighter nurse sculpture"
    ),
    "toy": (
        "toy teddy plush plushie plushy puppet teddy_bear stuffed_animal stuffed_toy rubber_duck "
        "action_figure soft_toy cuddly_toy"
    ),
    "ball": (
        "ball football soccer_ball basketball baseball softball tennis_ball volleyball "
        "beach_ball golf_ball marble"
    ),
    "container": (
        "bowl cup mug vase basket box bucket pot jar bottle glass teapot kettle bag backpack "
        "plate pan tray can barrel crate chest pitcher jug teacup saucer dish planter "
        "flowerpot"
    ),
}.items():
    for _w in _words.split():
        LEXICON[_w.replace("_", " ")] = _cat


def category(class_noun: str) -> str:
    """The category of a class noun (see :data:`LEXICON`); ``"object"`` when unknown.

    Case and a plural ``s`` are ignored; a multi-word noun is looked up whole, then by its
    last word, then by any word ("dragon toy" → "toy" only if neither whole nor last matched).
    """
    words = re.findall(r"[a-z]+", class_noun.lower())
    if not words:
        return "object"

    def look(w: str) -> str | None:
        if w in LEXICON:
            return LEXICON[w]
        if w.endswith("es") and w[:-2] in LEXICON:
            return LEXICON[w[:-2]]
        if w.endswith("s") and w[:-1] in LEXICON:
            return LEXICON[w[:-1]]
        return None

    for cand in (" ".join(words), words[-1], *reversed(words[:-1])):
        found = look(cand)
        if found:
            return found
    return "object"


# --------------------------------------------------------------------------------------------
# template pools

_ACTIONS: dict[str, tuple[str, ...]] = {
    "animal": (
        "is running", "is jumping", "is sitting", "is sleeping", "is dancing",
        "is swimming in a lake", "is climbing a tree", "is eating an apple",
        "is rolling in the grass", "is yawning", "is walking on the beach",
        "is standing on its hind legs", "is playing in the snow", "is drinking from a puddle",
    ),
    "person": (
        "is running", "is jumping", "is dancing", "is sitting on a chair", "is waving",
        "is reading a book", "is playing a guitar", "is riding a bicycle", "is cooking dinner",
        "is climbing a ladder", "is skateboarding", "is painting a picture",
        "is sleeping in a bed", "is walking in the rain",
    ),
    "toy": (
        "is sitting on a shelf", "is lying on a bed", "is floating in a bathtub",
        "is sitting in the grass", "is dancing", "is jumping", "is sleeping on a pillow",
        "is riding a toy car", "is sitting on a windowsill", "is lying in the snow",
        "is standing on a table", "is waving",
    ),
    "ball": (
        "is rolling on the grass", "is bouncing on the floor", "is flying through the air",
        "is floating in a pool", "is lying on a soccer field", "is resting in the sand",
        "is rolling down a hill", "is sitting on a shelf", "is lying in the snow",
        "is spinning on a table",
    ),
    "container": (
        "is filled with water", "is filled with fruit", "is full of flowers",
        "is sitting on a kitchen table", "is floating in a pond", "is lying in the snow",
        "is placed on a shelf", "is filled with soup", "is standing on a windowsill",
        "is lying in the grass", "is filled with sand", "is filled with candy",
    ),
    "object": (
        "is lying on the beach", "is sitting on a table", "is resting on a rock",
        "is floating in water", "is lying in the grass", "is placed on a windowsill",
        "is half buried in the snow", "is glowing in the sunlight", "is lying on a wooden floor",
        "is sitting on a stack of books", "is resting in the sand", "is lying on a pillow",
    ),
}

# (agent categories, patient categories, templates); every rule that matches contributes.
_INTERACTIONS: tuple[tuple[frozenset[str], frozenset[str], tuple[str, ...]], ...] = (
    (_ALL, _ALL, (
        "is next to the {1}", "is in front of the {1}", "is behind the {1}",
        "is on top of the {1}",
    )),
    (_ANIMATE, _ALL, (
        "is carrying the {1}", "is looking at the {1}", "is pushing the {1}",
        "is painting the {1}", "is washing the {1}", "is hugging the {1}",
        "is pointing at the {1}",
    )),
    (_ANIMATE, _THINGS, (
        "is throwing the {1}", "is holding the {1}", "is placing the {1} on a table",
        "is balancing the {1} on its head", "is catching the {1}", "is lifting the {1}",
    )),
    (_ANIMATE, frozenset({"ball"}), (
        "is kicking the {1}", "is bouncing the {1}", "is chasing the {1}", "is rolling the {1}",
    )),
    (_ANIMATE, frozenset({"container"}), (
        "is drinking water from the {1}", "is eating from the {1}", "is sitting in the {1}",
        "is looking into the {1}", "is filling the {1} with water", "is wearing the {1} as a hat",
        "is hiding behind the {1}",
    )),
    (_ANIMATE, frozenset({"object", "toy"}), (
        "is playing with the {1}", "is sitting on the {1}",
    )),
    (_ANIMATE, _ANIMATE, (
        "is playing with the {1}", "is dancing with the {1}", "is chasing the {1}",
        "is talking to the {1}", "is feeding the {1}", "is waving at the {1}",
    )),
    (_ANIMATE, frozenset({"animal"}), ("is riding the {1}", "is petting the {1}")),
    (frozenset({"ball", "object"}), frozenset({"container"}), (
        "is inside the {1}", "is floating in the {1}", "is lying in the {1}",
    )),
    (_THINGS - {"toy"}, _ANIMATE, (
        "is lying at the feet of the {1}", "is being carried by the {1}",
        "is being held by the {1}",
    )),
    (frozenset({"ball", "object"}), _ANIMATE, ("is being thrown by the {1}",)),
    (frozenset({"ball"}), _ALL, ("is rolling toward the {1}", "is bouncing off the {1}")),
    (frozenset({"ball", "object"}), frozenset({"ball", "object", "toy"}), (
        "is leaning against the {1}",
    )),
    (frozenset({"container"}), frozenset({"ball", "object", "toy"}), (
        "is covering the {1}", "is standing beside the {1}",
    )),
    (frozenset({"container"}), _ANIMATE, ("is sitting on the head of the {1}",)),
    (frozenset({"container"}), frozenset({"container"}), ("is stacked on the {1}",)),
)

_TIMES = (
    "at sunset", "at night", "in the morning", "on a sunny day", "in the rain", "in winter",
    "in autumn", "on a cloudy day",
)


def _action_templates(cat: str) -> list[str]:
    return [f"The {{0}} {a}." for a in _ACTIONS.get(cat, _ACTIONS["object"])]


def _interaction_templates(agent: str, patient: str) -> tuple[list[str], list[str]]:
    """(specific, spatial) interaction templates for an (agent, patient) category pair."""
    specific: list[str] = []
    spatial: list[str] = []
    for agents, patients, verbs in _INTERACTIONS:
        if agent in agents and patient in patients:
            dest = spatial if agents == _ALL and patients == _ALL else specific
            for v in verbs:
                t = f"{{0}} {v}."
                if t not in specific and t not in spatial:
                    dest.append(t)
    return specific, spatial


def _with_times(rng: random.Random, *tiers: list[str]) -> list[str]:
    """Each tier shuffled, in order; then every template with a time of day, shuffled."""
    out: list[str] = []
    for tier in tiers:
        base = list(tier)
        rng.shuffle(base)
        out += base
    extra = [t[:-1] + f" {tm}." for tier in tiers for t in tier for tm in _TIMES]
    rng.shuffle(extra)
    return out + extra


# --------------------------------------------------------------------------------------------
# balanced selection

Group = tuple[Kind, tuple[int, ...]]


def _targets(n: int, num_prompts: int, rng: random.Random) -> dict[Group, int]:
    """How many items each group gets: the balance rule of the module docstring.

    Actions are split evenly over the subjects and interactions over the ordered pairs; the
    remainders go to seeded-random subjects, then to the pairs whose subjects appear least so
    far, so that every subject's total count (actions + interactions) differs by at most 2.
    """
    n_inter = num_prompts // 2 if n >= 2 else 0
    n_act = num_prompts - n_inter
    out: dict[Group, int] = {}
    load = [0] * n  # how often each subject appears so far
    subjects = list(range(n))
    rng.shuffle(subjects)
    for k, i in enumerate(subjects):
        out[("action", (i,))] = n_act // n + (1 if k < n_act % n else 0)
        load[i] += out[("action", (i,))]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if not pairs:
        return out
    rng.shuffle(pairs)
    for i, j in pairs:
        out[("interaction", (i, j))] = n_inter // len(pairs)
        load[i] += n_inter // len(pairs)
        load[j] += n_inter // len(pairs)
    left = list(pairs)
    for _ in range(n_inter % len(pairs)):
        best = min(left, key=lambda p: (load[p[0]] + load[p[1]], max(load[p[0]], load[p[1]])))
        left.remove(best)
        out[("interaction", best)] += 1
        load[best[0]] += 1
        load[best[1]] += 1
    return out


def _template_pools(classes: Sequence[str], rng: random.Random) -> dict[Group, list[str]]:
    cats = [category(c) for c in classes]
    n = len(cats)
    pools: dict[Group, list[str]] = {}
    for i in range(n):
        pools[("action", (i,))] = _with_times(rng, _action_templates(cats[i]))
    for i in range(n):
        for j in range(n):
            if i != j:
                pools[("interaction", (i, j))] = _with_times(
                    rng, *_interaction_templates(cats[i], cats[j])
                )
    return pools


def _select(
    targets: Mapping[Group, int],
    pools: Mapping[Group, Sequence[str]],
    taken: Iterable[PromptItem] = (),
) -> list[PromptItem]:
    """Pick ``targets[g]`` items per group from its pool (in pool order), interleaved.

    Items in ``taken`` count toward their group's target and are never repeated. A template
    string already used by another group is skipped while the pool has unused ones.
    """
    chosen: dict[Group, list[PromptItem]] = {g: [] for g in targets}
    used_keys: set[tuple[str, tuple[int, ...]]] = set()
    used_text: set[str] = set()
    for it in taken:
        g: Group = (it.kind, tuple(it.subjects))
        if g in chosen and len(chosen[g]) < targets[g]:
            chosen[g].append(it)
            used_keys.add(it.key)
            used_text.add(it.template)
    # round-robin over groups so that globally unique strings are shared out fairly
    rounds = max(targets.values(), default=0)
    for r in range(rounds):
        for g, want in targets.items():
            if len(chosen[g]) > r or len(chosen[g]) >= want:
                continue
            kind, subjects = g
            pool = pools.get(g, ())
            pick = None
            for strict in (True, False):
                for t in pool:
                    if (t, subjects) in used_keys or (strict and t in used_text):
                        continue
                    pick = t
                    break
                if pick is not None:
                    break
            if pick is None and pool:  # exhausted: repeat rather than come up short
                pick = pool[len(chosen[g]) % len(pool)]
            if pick is None:
                continue
            chosen[g].append(PromptItem(pick, list(subjects), kind))
            used_keys.add((pick, subjects))
            used_text.add(pick)
    # interleave: actions and interactions alternate, groups take turns
    acts = _round_robin([v for (k, _), v in chosen.items() if k == "action"])
    inters = _round_robin([v for (k, _), v in chosen.items() if k == "interaction"])
    out: list[PromptItem] = []
    for k in range(max(len(acts), len(inters))):
        out.extend(x[k] for x in (acts, inters) if k < len(x))
    return out


def _round_robin(lists: list[list[PromptItem]]) -> list[PromptItem]:
    out: list[PromptItem] = []
    for k in range(max((len(x) for x in lists), default=0)):
        out.extend(x[k] for x in lists if k < len(x))
    return out


def template_prompts(
    classes: Sequence[str], num_prompts: int = 30, seed: int = 0
) -> list[PromptItem]:
    """Step 2 (paper), offline provider: class-aware, balanced action/interaction templates.

    Args:
        classes: the class noun of each subject, in subject order.
        num_prompts: how many items to return.
        seed: the same seed gives the same items in the same order.

    Returns:
        ``num_prompts`` items (see the module docstring for the balance rule).
    """
    _check(classes, num_prompts)
    rng = random.Random(f"dynasyn-prompts-{seed}")
    targets = _targets(len(classes), num_prompts, rng)
    return _select(targets, _template_pools(classes, rng))


# --------------------------------------------------------------------------------------------
# sentences → templates

_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def _strip_article(text: str) -> str:
    return _ARTICLE_RE.sub("", " ".join(text.split())).strip()


def _name_re(name: str) -> re.Pattern[str]:
    words = _strip_article(name).split()
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(
        r"(?<![\w<>-])(?:(?P<art>a|an|the)\s+)?(?P<name>" + body + r")(?![\w<>-])",
        re.IGNORECASE,
    )


_STOP = frozenset({"a", "an", "the", "and", "or", "with", "in", "on", "of", "at", "to", "by",
                   "for", "from"})


def _names(phrase: str, class_noun: str) -> list[str]:
    """How a subject may be named: its phrase, the phrase's word runs that end with a word of
    the class noun ("toy panda" from "toy panda with a white belly"), and the class noun."""
    out = [phrase] if _strip_article(phrase) else []
    words = _strip_article(phrase).split()[:12]
    head = {w.lower() for w in class_noun.split()}
    for length in range(len(words) - 1, 0, -1):
        for start in range(len(words) - length + 1):
            run = words[start : start + length]
            if run[-1].lower() in head and run[0].lower() not in _STOP:
                out.append(" ".join(run))
    if _strip_article(class_noun):
        out.append(class_noun)
    return list(dict.fromkeys(out))


def sentence_to_item(
    sentence: str,
    phrases: Sequence[str],
    classes: Sequence[str],
    required: Sequence[int],
) -> PromptItem | None:
    """Turn an LM sentence into a :class:`PromptItem`, or ``None`` when it must be dropped.

    Each subject is located by its noun phrase (case-insensitive; an "a"/"an"/"the" before it is
    absorbed and written "the", "The" at the start of the sentence), else by the longest run of
    the phrase's words that ends with its class noun ("toy panda"), else by its class noun; the
    longest name of any subject is placed first. Slots are numbered in order of appearance.

    The sentence is dropped when a subject of ``required`` is missing, when any other subject
    is named, when a subject's name occurs more than once (also as its bare class noun
    elsewhere), or when the text contains ``{``/``}`` or a placeholder already.
    """
    text = " ".join(sentence.split())
    if not text or "{" in text or "}" in text or "<asset" in text.lower():
        return None
    claimed: list[tuple[int, int]] = []
    spans: dict[int, re.Match[str]] = {}
    # every name of every subject, longest first: "green bowl" wins over "bowl"
    names = sorted(
        ((s, n) for s in range(len(phrases)) for n in _names(phrases[s], classes[s])),
        key=lambda sn: -len(sn[1]),
    )
    for s, name in names:
        if s in spans:
            continue
        hits = [
            m for m in _name_re(name).finditer(text)
            if not any(m.start() < e and b < m.end() for b, e in claimed)
        ]
        if len(hits) > 1:
            return None
        if hits:
            spans[s] = hits[0]
            claimed.append((hits[0].start(), hits[0].end()))
    # a subject named a second time (e.g. by its class noun) would leak into the renderings
    for s in range(len(classes)):
        for m in _name_re(classes[s]).finditer(text) if _strip_article(classes[s]) else ():
            if not any(b <= m.start("name") and m.end() <= e for b, e in claimed):
                return None
    if set(spans) != set(required):
        return None
    ordered = sorted(spans.items(), key=lambda kv: kv[1].start())
    pieces: list[str] = []
    last = 0
    for k, (_, m) in enumerate(ordered):
        pieces.append(text[last : m.start()])
        if m.group("art"):
            pieces.append(("The " if not text[: m.start()].strip() else "the ") + f"{{{k}}}")
        else:
            pieces.append(f"{{{k}}}")
        last = m.end()
    pieces.append(text[last:])
    template = "".join(pieces).strip()
    if template[-1] not in ".!?":
        template += "."
    subjects = [s for s, _ in ordered]
    return PromptItem(template, subjects, "action" if len(subjects) == 1 else "interaction")


# --------------------------------------------------------------------------------------------
# LM providers


def _lm_groups(n: int, targets: Mapping[Group, int]) -> list[Group]:
    """The groups worth a conversation: those with a positive target, interactions first."""
    inter = [g for g in targets if g[0] == "interaction" and targets[g] > 0]
    acts = [g for g in targets if g[0] == "action" and targets[g] > 0]
    return sorted(inter, key=lambda g: g[1]) + sorted(acts, key=lambda g: g[1])


def _conversation(
    client: Completer,
    group: Group,
    phrases: Sequence[str],
    convert: Callable[[list[str]], list[PromptItem]],
) -> tuple[list[PromptItem], ChatError | None]:
    """Step 2's generate-then-filter conversation for one group (the paper's prompts).

    Returns the usable items of the filter answer (or of the generate answer when the filter
    step fails or leaves nothing usable) and the error that stopped it, if any.
    """
    kind, subjects = group
    fills = {f"{{P{k}}}": phrases[s] for k, s in enumerate(subjects)}

    def fill(text: str) -> str:
        for key, value in fills.items():
            text = text.replace(key, value)
        return text

    if kind == "interaction":
        ask = fill(LM_GENERATE + _FORMAT_PAIR)
    else:
        ask = fill(LM_GENERATE_ACTION + _FORMAT_ONE)
    messages: list[dict[str, Any]] = [{"role": "user", "content": ask}]
    items: list[PromptItem] = []
    try:
        draft = client.complete(messages, temperature=0.9, max_tokens=4096)
        items = convert(parse_list(draft))
        messages += [
            {"role": "assistant", "content": draft},
            {"role": "user", "content": LM_FILTER + _FORMAT_FILTER},
        ]
        kept = convert(parse_list(client.complete(messages, temperature=0.2, max_tokens=2048)))
    except ChatError as e:
        return items, e
    return (kept or items), None


def lm_prompts(
    client: Completer,
    classes: Sequence[str],
    phrases: Sequence[str],
    num_prompts: int = 30,
    seed: int = 0,
    provider: str = "openai",
) -> list[PromptItem]:
    """Step 2 (paper) with an LM: generate-then-filter, parsed into balanced templates.

    One conversation per group that needs items (ordered pair for interactions, subject for
    actions). Failures (``ChatError`` after the client's retries, or a conversation with no
    usable sentence) stop the LM work with ONE warning; items already parsed are kept and the
    rest comes from the template provider.
    """
    _check(classes, num_prompts)
    rng = random.Random(f"dynasyn-prompts-{seed}")
    targets = _targets(len(classes), num_prompts, rng)
    template_pools = _template_pools(classes, rng)
    lm_pools: dict[Group, list[str]] = {g: [] for g in targets}
    failure: str | None = None

    for group in _lm_groups(len(classes), targets):

        def convert(sentences: list[str], group: Group = group) -> list[PromptItem]:
            out = [sentence_to_item(s, phrases, classes, group[1]) for s in sentences]
            return [it for it in out if it is not None]

        items, error = _conversation(client, group, phrases, convert)
        for it in items:
            pool = lm_pools.setdefault((it.kind, tuple(it.subjects)), [])
            if it.template not in pool:
                pool.append(it.template)
        if error is not None:
            failure = str(error)
        elif not items:
            failure = (
                f"its answer for {group[0]} {list(group[1])} had no usable sentence naming "
                + " and ".join(repr(phrases[s]) for s in group[1])
            )
        if failure is not None:
            break

    if failure is not None:
        log.warning(
            "prompt provider %r failed (%s); the template provider makes the remaining prompts",
            provider,
            failure,
        )
    for pool in lm_pools.values():
        rng.shuffle(pool)
    pools = {g: lm_pools.get(g, []) + template_pools.get(g, []) for g in targets}
    return _select(targets, pools)


def _check(classes: Sequence[str], num_prompts: int) -> None:
    if not classes:
        raise InputError("no subjects: give at least one class noun")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise InputError(f"--num-prompts must be a positive integer, got {num_prompts!r}")


def generate_prompts(
    classes: Sequence[str],
    phrases: Sequence[str] | None = None,
    num_prompts: int = 30,
    provider: str = "template",
    seed: int = 0,
    client: Completer | None = None,
    local_model: str | None = None,
) -> list[PromptItem]:
    """Step 2 of the paper (prompt generation): ``num_prompts`` action/interaction templates.

    Args:
        classes: class noun per subject (subject order).
        phrases: noun phrase per subject (Step 1's output); the class nouns when ``None``.
        num_prompts: how many items (the paper: 30 per scene).
        provider: ``"template"`` (offline), ``"openai"`` (an OpenAI-compatible endpoint) or
            ``"local"`` (a transformers text-generation model directory).
        seed: makes the template provider, the balance draw and the LM item order reproducible.
        client: for ``"openai"`` only (ignored otherwise): a
            :class:`~dynasyn.augment.chat.ChatClient` (or anything with its ``complete``);
            built from the ``DYNASYN_CHAT_*`` environment when ``None``.
        local_model: for ``"local"``: the model directory.

    Returns:
        The items, actions and interactions interleaved.

    Raises:
        InputError: unknown provider, no subjects, a bad count, a missing local model, or an
            unusable chat configuration (no model name).
    """
    classes = list(classes)
    phrases = list(phrases) if phrases is not None else list(classes)
    if len(phrases) != len(classes):
        raise InputError(f"{len(phrases)} phrases for {len(classes)} subjects; give one each")
    phrases = [_strip_article(p) or c for p, c in zip(phrases, classes, strict=True)]
    if provider == "template":
        return template_prompts(classes, num_prompts, seed)
    if provider == "micro":
        from dynasyn.micro.prompts import micro_prompts

        return [PromptItem(t, list(subj), kind) for t, subj, kind in
                micro_prompts(classes, num_prompts, seed)]
    if provider == "openai":
        _check(classes, num_prompts)
        return lm_prompts(client or ChatClient(), classes, phrases, num_prompts, seed, "openai")
    if provider == "local":
        _check(classes, num_prompts)
        if not local_model:
            raise InputError(
                "the local prompt provider needs a model directory (--local-model PATH)"
            )
        return lm_prompts(
            LocalChat(local_model, task="text-generation"), classes, phrases, num_prompts, seed,
            "local",
        )
    raise InputError(f"unknown prompt provider {provider!r}; use template, micro, openai or local")

