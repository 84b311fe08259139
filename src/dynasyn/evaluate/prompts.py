"""Evaluation prompt sets: the paper's Plain / Action / Interaction lists, generalized by slots.

The paper evaluates one scene (a toy panda and a bowl) with 10 prompts per category
(``../shared/data/paper.json``, ``eval_prompts``). They are kept here verbatim as *templates*:
``<asset0>`` (the panda) became slot ``{0}`` and ``<asset1>`` (the bowl) slot ``{1}``, so for any
scene a template is instantiated for each subject (Plain, Action) or each ordered pair of
subjects (Interaction). Each instantiation is an :class:`EvalPrompt` (template + the subject of
each slot) with two renderings:

- :meth:`EvalPrompt.placeholder_prompt` — what the personalized model renders
  (``"<asset0> is throwing the <asset1>."``; for panda/bowl exactly the paper's strings);
- :meth:`EvalPrompt.class_prompt` — what CLIP-T and ImageReward compare against
  (``"panda is throwing the bowl."``).

A scene of micro-world subjects (every class in :data:`dynasyn.micro.world.SHAPES`) gets prompts
from the micro world's grammar instead, since the micro model knows nothing else: Plain = a
background or style (``"a {0} at night"``), Action = the actions its class can show
(``"a {0} is jumping"``), Interaction = the relations the pair can show
(``"a {0} is on top of a {1}"``). Their class renderings are captions of the world's grammar
(:func:`dynasyn.micro.world.parse_caption` reads them back), the captions micro CLIP was trained
on.

Sets are capped (:data:`DEFAULT_LIMIT` per category) and spread round-robin over subjects /
pairs, preferring templates used least so far: with one subject (or one pair) the first ten are
exactly the paper's list, with more subjects every template still appears once before any
repeats. ``--prompt-file`` adds free prompts with ``<assetN>`` placeholders
(:func:`read_prompt_file`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from dynasyn.errors import InputError
from dynasyn.tokens import PLACEHOLDER_RE, placeholder, render

__all__ = [
    "CATEGORIES",
    "DEFAULT_LIMIT",
    "MICRO_BACKGROUNDS",
    "PAPER_PROMPTS",
    "PAPER_SLOTS",
    "EvalPrompt",
    "is_micro_scene",
    "parse_prompt",
    "prompt_sets",
    "read_prompt_file",
]

CATEGORIES: tuple[str, ...] = ("plain", "action", "interaction")
"""The paper's prompt categories (its Tables 1 and 3)."""

DEFAULT_LIMIT = 10
"""Prompts per category by default (the paper's lists have 10 each)."""

PAPER_SLOTS: dict[str, str] = {"{0}": "panda", "{1}": "bowl"}
"""What the slots stood for in the paper's lists (``<asset0>`` = panda, ``<asset1>`` = bowl)."""

PAPER_PROMPTS: dict[str, tuple[str, ...]] = {
    "plain": (
        "{0} in a nurse suit.",
        "{0} in an Iron Man suit.",
        "{0} in a firefighter uniform.",
        "{0} in a pencil sketch.",
        "{0} in an oil painting.",
        "{0} in a comic.",
        "{0} in watercolor.",
        "{0} at the Acropolis.",
        "{0} at the Eiffel Tower.",
        "{0} in a jungle.",
    ),
    "action": (
        "The {0} is running.",
        "The {0} is jumping.",
        "The {0} is sitting.",
        "The {0} is dancing.",
        "The {0} is sleeping.",
        "The {0} is reading a book.",
        "The {0} is playing a guitar.",
        "The {0} is eating a carrot.",
        "The {0} is riding a bicycle.",
        "The {0} is flying a kite.",
    ),
    "interaction": (
        "{0} is throwing the {1}.",
        "{0} is washing the {1}.",
        "{0} is filling the {1} with bamboo leaves.",
        "{0} is drinking water from the {1}.",
        "{0} is placing the {1} on a table.",
        "{0} is looking into the {1}.",
        "{0} is carrying the {1}.",
        "{0} is stacking the {1}s.",
        "{0} is painting the {1}.",
        "{0} is balancing the {1} on its head.",
    ),
}
"""The paper's evaluation prompts as templates (``paper.json`` ``eval_prompts``, slots for
``<assetN>``)."""

MICRO_BACKGROUNDS: tuple[str, ...] = (
    "at night",
    "on the beach",
    "on the grass",
    "in grayscale",
    "as a sketch",
)
"""Plain prompts of the micro world: its backgrounds and styles (caption suffixes)."""

_SLOTS = {"plain": 1, "action": 1, "interaction": 2}


class EvalPrompt(NamedTuple):
    """One evaluation prompt: a template and the subject index of each of its slots.

    ``EvalPrompt("{0} is throwing the {1}.", (1, 0))`` is "<asset1> is throwing the <asset0>.".
    Unpacks as ``(template, subjects)``.
    """

    template: str
    subjects: tuple[int, ...]

    def placeholder_prompt(self) -> str:
        """The rendering for the personalized model: slots become ``<assetN>``."""
        return render(self.template, [placeholder(s) for s in self.subjects])

    def class_prompt(self, classes: Sequence[str]) -> str:
        """The rendering for CLIP-T / ImageReward: slots become the subjects' class nouns."""
        return render(self.template, [classes[s] for s in self.subjects])


def is_micro_scene(classes: Sequence[str] | None) -> bool:
    """Are all ``classes`` micro-world classes (so the micro grammar applies)?"""
    from dynasyn.micro.world import SHAPES

    return bool(classes) and all(c in SHAPES for c in classes)  # type: ignore[union-attr]


def _spread(options: Sequence[tuple[tuple[int, ...], Sequence[str]]],
            limit: int | None) -> list[EvalPrompt]:
    """Round-robin over subject tuples; each takes its least-used template not yet taken.

    ``options``: (subjects, templates available to them). Stops at ``limit`` or when every
    (subjects, template) combination is taken; never repeats a combination.
    """
    used: dict[str, int] = {}
    taken: set[tuple[tuple[int, ...], str]] = set()
    out: list[EvalPrompt] = []
    total = sum(len(set(t)) for _, t in options)
    cap = total if limit is None else min(limit, total)
    k = 0
    while len(out) < cap:
        subjects, templates = options[k % len(options)]
        k += 1
        free = [t for t in templates if (subjects, t) not in taken]
        if not free:
            continue
        order = {t: i for i, t in enumerate(templates)}
        best = min(free, key=lambda t: (used.get(t, 0), order[t]))
        taken.add((subjects, best))
        used[best] = used.get(best, 0) + 1
        out.append(EvalPrompt(best, subjects))
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _micro_options(category: str, classes: Sequence[str]) -> list[tuple[tuple[int, ...], list[str]]]:
    from dynasyn.micro.world import valid_actions, valid_relations

    n = len(classes)
    if category == "plain":
        return [((i,), [f"{_article(classes[i])} {{0}} {bg}" for bg in MICRO_BACKGROUNDS])
                for i in range(n)]
    if category == "action":
        return [((i,), [f"{_article(classes[i])} {{0}} is {a}"
                        for a in valid_actions(classes[i]) if a != "standing"])
                for i in range(n)]
    return [((i, j), [f"{_article(classes[i])} {{0}} is {r} {_article(classes[j])} {{1}}"
                      for r in valid_relations(classes[i], classes[j])])
            for i, j in itertools.permutations(range(n), 2)]


def prompt_sets(
    num_subjects: int,
    categories: Sequence[str] = CATEGORIES,
    classes: Sequence[str] | None = None,
    grammar: str = "auto",
    limit: int | None = DEFAULT_LIMIT,
) -> dict[str, list[EvalPrompt]]:
    """The evaluation prompts of a scene with ``num_subjects`` subjects, by category.

    Args:
        num_subjects: subjects of the scene (placeholders ``<asset0>`` … ``<assetN-1>``).
        categories: any of :data:`CATEGORIES`.
        classes: the subjects' class nouns (needed for the micro grammar).
        grammar: ``"paper"`` (the paper's lists generalized), ``"micro"`` (the micro world's
            grammar) or ``"auto"`` (micro when every class is a micro-world class).
        limit: prompts per category (None: every template for every subject / ordered pair).

    Returns:
        ``{category: [EvalPrompt, …]}`` in the order of ``categories``; Interaction is empty
        for a one-subject scene.

    Raises:
        InputError: an unknown category or grammar, no subjects, a bad limit.
    """
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise InputError(
            f"unknown prompt category {unknown[0]!r}; choose from {', '.join(CATEGORIES)} "
            "or pass --prompt-file"
        )
    if num_subjects < 1:
        raise InputError("the run has no subjects to evaluate")
    if limit is not None and limit < 1:
        raise InputError(f"the prompt limit must be >= 1 (got {limit})")
    if grammar == "auto":
        grammar = "micro" if is_micro_scene(classes) else "paper"
    if grammar not in ("paper", "micro"):
        raise InputError(f"unknown prompt grammar {grammar!r}; use paper, micro or auto")
    if grammar == "micro" and (classes is None or len(classes) != num_subjects
                               or not is_micro_scene(classes)):
        raise InputError("the micro prompt grammar needs micro-world classes "
                         "(ball, cube, star, …) for every subject")
    out: dict[str, list[EvalPrompt]] = {}
    for cat in dict.fromkeys(categories):
        if grammar == "micro":
            options = _micro_options(cat, classes)  # type: ignore[arg-type]
        else:
            tuples = itertools.permutations(range(num_subjects), _SLOTS[cat])
            options = [(t, list(PAPER_PROMPTS[cat])) for t in tuples]
        out[cat] = _spread(options, limit) if options else []
    return out


def parse_prompt(text: str, num_subjects: int | None = None) -> EvalPrompt:
    """A free prompt with ``<assetN>`` placeholders as an :class:`EvalPrompt`.

    The k-th distinct placeholder becomes slot ``{k}``: ``"<asset1> hugs <asset0>"`` →
    ``EvalPrompt("{0} hugs {1}", (1, 0))``.

    Raises:
        InputError: no placeholder, one the scene does not have, or a ``{N}`` in the text.
    """
    order: list[int] = []
    for m in PLACEHOLDER_RE.finditer(text):
        i = int(m.group(1))
        if i not in order:
            order.append(i)
    if not order:
        raise InputError(f"prompt {text!r} has no <assetN> placeholder; name a subject")
    if num_subjects is not None and max(order) >= num_subjects:
        raise InputError(
            f"prompt {text!r} names <asset{max(order)}> but the run has {num_subjects} "
            f"subject(s) (<asset0>…<asset{num_subjects - 1}>)"
        )
    if re.search(r"\{\d+\}", text):
        raise InputError(f"prompt {text!r} contains a {{N}} slot; write subjects as <assetN>")
    template = PLACEHOLDER_RE.sub(lambda m: f"{{{order.index(int(m.group(1)))}}}", text)
    return EvalPrompt(template, tuple(order))


def read_prompt_file(path: str | Path, num_subjects: int,
                     default_category: str = "custom") -> dict[str, list[EvalPrompt]]:
    """Prompts from a text file, one per line, with ``<assetN>`` placeholders.

    Blank lines and lines starting with ``#`` are skipped. A line ``category<TAB>prompt`` puts
    the prompt in that category (e.g. ``action``); other lines go to ``default_category``.

    Raises:
        InputError: the file is unreadable or empty, or a line names no / an unknown subject
            (the message names the file and line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompt file {path} ({e}); check the path") from None
    out: dict[str, list[EvalPrompt]] = {}
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cat, text = default_category, line
        if "\t" in line:
            cat, text = (x.strip() for x in line.split("\t", 1))
            if not re.fullmatch(r"[\w.+-]+", cat):
                raise InputError(f"{path}:{no}: category {cat!r} must be one word "
                                 "(letters, digits, _ . + -)")
        try:
            prompt = parse_prompt(text.strip(), num_subjects)
        except InputError as e:
            raise InputError(f"{path}:{no}: {e}") from None
        out.setdefault(cat, []).append(prompt)
    if not out:
        raise InputError(f"prompt file {path} has no prompts; write one per line with <assetN>")
    return out
