"""The micro world's own augmentation prompts (prompt provider ``micro``).

The micro model only knows the world's grammar, so for micro scenes Step 2 draws actions and
relations from it (:data:`~dynasyn.micro.world.ACTIONS`, :data:`~dynasyn.micro.world.RELATIONS`,
respecting which shape can do what). Templates carry the article, as the world's captions do:
``"a {0} is jumping"`` renders as ``"a red striped star is jumping"`` (phrase),
``"a star is jumping"`` (class) and ``"a <asset0> is jumping"`` (placeholder).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, NamedTuple

from dynasyn.errors import InputError
from dynasyn.micro.world import SHAPES, valid_actions, valid_relations


class MicroPrompt(NamedTuple):
    """One prompt of the world's grammar: a template with slots ``{0}``, ``{1}``, the subject
    index of each slot and its kind (``"action"`` or ``"interaction"``); the augmentation makes
    a :class:`~dynasyn.augment.prompts.PromptItem` of it."""

    template: str
    subjects: tuple[int, ...]
    kind: Literal["action", "interaction"]


def micro_prompts(classes: Sequence[str], num_prompts: int, seed: int = 0) -> list[MicroPrompt]:
    """Balanced single-subject actions and pairwise relations of the micro world."""
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise InputError(
            f"the micro prompt provider only knows the micro world's classes ({', '.join(SHAPES)}); "
            f"{unknown[0]!r} is not one: use --provider template"
        )
    rng = random.Random(f"micro:{seed}")
    actions = [MicroPrompt(f"a {{0}} is {a}", (i,), "action")
               for i, c in enumerate(classes) for a in valid_actions(c) if a != "standing"]
    pairs = [MicroPrompt(f"a {{0}} is {r} a {{1}}", (i, j), "interaction")
             for i, ci in enumerate(classes) for j, cj in enumerate(classes) if i != j
             for r in valid_relations(ci, cj)]
    rng.shuffle(actions)
    rng.shuffle(pairs)
    n_inter = num_prompts // 2 if pairs else 0
    out = _spread(pairs, n_inter) + _spread(actions, num_prompts - n_inter)
    rng.shuffle(out)
    return out


def _spread(items: list[MicroPrompt], n: int) -> list[MicroPrompt]:
    """Take ``n`` items round-robin over their subject tuples (balanced), cycling if needed."""
    groups: dict[tuple[int, ...], list[MicroPrompt]] = {}
    for it in items:
        groups.setdefault(it.subjects, []).append(it)
    order, taken, k = list(groups.values()), [], 0
    while len(taken) < n and order:
        g = order[k % len(order)]
        taken.append(g[(k // len(order)) % len(g)])
        k += 1
    return taken
