"""The micro world: a deterministic procedural renderer of small captioned scenes.

Every scene is a :class:`SceneSpec` — one to three subjects, an optional single-subject
*action* or two-subject *relation*, and a *background* (or style) — rendered by :func:`render`
into an RGB image (``size`` x ``size``, 64 by default) with exact per-subject masks (the
*visible* pixels of each subject, after occlusion) and a caption from a small grammar.

World rules (what the micro models learn and :mod:`dynasyn.micro.parse` reads back):

- **Subjects** have a class (:data:`SHAPES`: ball, cube, star, pyramid, heart, ring, fish, cat)
  and an :class:`Identity` inside the class: a colour (:data:`COLOURS`, 8 saturated colours far
  from every background) and a pattern (:data:`PATTERNS`: plain, striped, dotted, checkered).
  A pattern is drawn in the subject's own colour at half brightness, in the subject's own frame
  (it turns, flips and scales with the subject), so every subject pixel is either ``c`` or
  ``c // 2`` for its colour ``c`` (before the sketch / grayscale styles).
- **Actions** (:data:`ACTIONS`, one subject): standing on the ground line (the default pose),
  jumping (raised, with a shadow on the ground), sleeping (lying: turned 90 degrees and
  flattened), upside down (flipped vertically), tilted (turned 18-35 degrees), on the left /
  on the right, big / small. :func:`valid_actions` leaves out actions a class cannot show
  (a ball cannot be upside down or tilted).
- **Relations** (:data:`RELATIONS`, two subjects, ``{0} <relation> {1}``): on top of (touching),
  next to, inside (small subject at the centre of a big ring / ball / cube / heart), behind
  (partly hidden by ``{1}``), in front of (hiding part of ``{1}``), above / below (a gap
  between them). Two or three subjects without a relation stand in a row, in caption order.
- **Backgrounds** (:data:`BACKGROUNDS`): plain (uniform light grey), grass, night (with white
  stars), beach (sky, sea, sand), and two styles: sketch (outlines on paper) and grayscale.

Captions come from one grammar in template form — ``"{0} is on top of {1} on the grass"`` —
whose slots are filled with identity phrases (``"a red striped star"``), class nouns
(``"a star"``) or any placeholder text (``"<asset0>"``), so all renderings of one scene are
exactly consistent (the project's ``template`` / ``phrase_prompt`` / ``class_prompt`` /
``placeholder_prompt`` format). :func:`parse_caption` reads any caption back to its attributes.

All randomness (position / size / angle jitter, stars) comes from the ``seed``: the same spec
and seed give identical pixels. Rendering takes about 0.3 ms per 64x64 scene (1 ms at 256x256)
on one core of a shared 2-core CPU (numpy only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ACTIONS",
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "COLOURS",
    "CONTAINERS",
    "PATTERNS",
    "RELATIONS",
    "SHAPES",
    "Identity",
    "Mention",
    "ParsedCaption",
    "Render",
    "SceneSpec",
    "caption_for",
    "canonical_mask",
    "distractor",
    "fill_template",
    "parse_caption",
    "render",
    "sample_dataset_item",
    "sample_identity",
    "sample_render",
    "sample_spec",
    "slot_text",
    "template_for",
    "valid_actions",
    "valid_relations",
]

SHAPES: tuple[str, ...] = ("ball", "cube", "star", "pyramid", "heart", "ring", "fish", "cat")
"""Subject classes (the class noun of each subject)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 80, 220),
    "purple": (145, 60, 190),
    "pink": (245, 120, 185),
}
"""Identity colours (name -> RGB); a pattern uses the same colour at :data:`PATTERN_SHADE`."""

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
"""Identity patterns, drawn in the subject's frame."""

PATTERN_SHADE = 0.5
"""Brightness of a pattern's dark parts relative to the subject colour."""

ACTIONS: tuple[str, ...] = (
    "standing",
    "jumping",
    "sleeping",
    "upside down",
    "tilted",
    "on the left",
    "on the right",
    "big",
    "small",
)
"""Single-subject actions; the caption is ``"{0} is <action>"``."""

RELATIONS: tuple[str, ...] = (
    "on top of",
    "next to",
    "inside",
    "behind",
    "in front of",
    "above",
    "below",
)
"""Two-subject relations; the caption is ``"{0} is <relation> {1}"``."""

CONTAINERS: tuple[str, ...] = ("ring", "ball", "cube", "heart")
"""Classes that can hold a subject (``"{0} is inside {1}"`` needs ``{1}`` in this list)."""

BACKGROUNDS: tuple[str, ...] = ("plain", "grass", "night", "beach", "sketch", "grayscale")
"""Backgrounds and styles; ``plain`` is the default and adds nothing to the caption."""

BACKGROUND_PHRASES: dict[str, str] = {
    "plain": "",
    "grass": "on the grass",
    "night": "at night",
    "beach": "on the beach",
    "sketch": "as a sketch",
    "grayscale": "in grayscale",
}
"""Caption suffix of each background."""

PLAIN_BACKGROUND: tuple[int, int, int] = (232, 230, 222)
"""The plain background colour (uniform)."""

GROUND = 0.85
"""Ground line (fraction of the height): standing subjects rest on it."""

CANON = 64
"""Resolution of the canonical class masks (the subject frame [-1, 1]^2)."""

_NO_UPSIDE_DOWN = frozenset({"ball", "cube", "ring"})
_NO_TILT = frozenset({"ball", "ring"})
_SKY = (175, 212, 238)
_GRASS = (84, 150, 62)
_BEACH_SKY = (160, 205, 240)
_SEA = (70, 130, 200)
_SAND = (228, 208, 160)
_NIGHT_SKY = (20, 24, 58)
_NIGHT_GROUND = (38, 42, 54)
_PAPER = (248, 248, 244)


# --------------------------------------------------------------------------------------------
# Identities and specs


@dataclass(frozen=True)
class Identity:
    """One subject's class and identity: ``Identity("star", "red", "striped")``."""

    shape: str
    colour: str
    pattern: str = "plain"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose one of {', '.join(COLOURS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(
                f"unknown pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}"
            )

    @property
    def phrase(self) -> str:
        """The identity phrase without article, e.g. ``"red striped star"``."""
        return f"{self.colour} {self.pattern} {self.shape}"

    @property
    def noun(self) -> str:
        """The class noun, e.g. ``"star"``."""
        return self.shape

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The subject colour."""
        return COLOURS[self.colour]

    @property
    def shade_rgb(self) -> tuple[int, int, int]:
        """The colour of the pattern's dark parts."""
        return _shade(COLOURS[self.colour])


@dataclass(frozen=True)
class SceneSpec:
    """What a scene shows; :func:`render` turns it into pixels (jitter comes from the seed).

    ``action`` needs exactly one subject, ``relation`` exactly two; without either, the subjects
    stand in a row in caption order (left to right).
    """

    subjects: tuple[Identity, ...]
    action: str | None = None
    relation: str | None = None
    background: str = "plain"

    def __post_init__(self) -> None:
        object.__setattr__(self, "subjects", tuple(self.subjects))
        n = len(self.subjects)
        if not 1 <= n <= 3:
            raise ValueError(f"a scene has 1 to 3 subjects, got {n}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}"
            )
        if self.action is not None:
            if n != 1:
                raise ValueError("an action needs exactly one subject")
            if self.action not in valid_actions(self.subjects[0].shape):
                raise ValueError(
                    f"a {self.subjects[0].shape} cannot be {self.action!r}; choose one of "
                    f"{', '.join(valid_actions(self.subjects[0].shape))}"
                )
        if self.relation is not None:
            if n != 2:
                raise ValueError("a relation needs exactly two subjects")
            rels = valid_relations(self.subjects[0].shape, self.subjects[1].shape)
            if self.relation not in rels:
                raise ValueError(
                    f"{self.relation!r} is not possible between a {self.subjects[0].shape} and "
                    f"a {self.subjects[1].shape}; choose one of {', '.join(rels)}"
                )


def valid_actions(shape: str) -> tuple[str, ...]:
    """The actions a subject of class ``shape`` can visibly perform."""
    out = list(ACTIONS)
    if shape in _NO_UPSIDE_DOWN:
        out.remove("upside down")
    if shape in _NO_TILT:
        out.remove("tilted")
    return tuple(out)


def valid_relations(shape0: str, shape1: str) -> tuple[str, ...]:
    """The relations ``"{0} <relation> {1}"`` possible between classes ``shape0``, ``shape1``."""
    if shape1 in CONTAINERS:
        return RELATIONS
    return tuple(r for r in RELATIONS if r != "inside")


def sample_identity(rng: np.random.Generator, exclude_colours: Sequence[str] = ()) -> Identity:
    """A uniformly random identity whose colour is not in ``exclude_colours``."""
    colours = [c for c in COLOURS if c not in exclude_colours]
    return Identity(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colours[rng.integers(len(colours))],
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
    )


def sample_spec(
    rng: np.random.Generator,
    n_subjects: int | None = None,
    *,
    p_action: float = 0.8,
    p_relation: float = 0.85,
    p_plain_background: float = 0.5,
    subject_weights: Sequence[float] = (0.5, 0.4, 0.1),
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> SceneSpec:
    """A random scene spec.

    ``n_subjects`` (1-3) is drawn with ``subject_weights`` when None. Subjects of one scene have
    distinct colours (so a parser can tell them apart). A single subject gets an action with
    probability ``p_action`` (else a plain prompt), a pair a relation with ``p_relation`` (else
    ``"{0} and {1}"``). The background is ``plain`` with probability ``p_plain_background``
    (if offered in ``backgrounds``), else uniform over the other ``backgrounds``.
    """
    if n_subjects is None:
        w = np.asarray(subject_weights, dtype=float)
        n_subjects = int(rng.choice(len(w), p=w / w.sum())) + 1
    subjects: list[Identity] = []
    for _ in range(n_subjects):
        subjects.append(sample_identity(rng, [s.colour for s in subjects]))
    action = relation = None
    if n_subjects == 1 and rng.random() < p_action:
        acts = valid_actions(subjects[0].shape)
        action = acts[rng.integers(len(acts))]
    if n_subjects == 2 and rng.random() < p_relation:
        rels = valid_relations(subjects[0].shape, subjects[1].shape)
        relation = rels[rng.integers(len(rels))]
    others = [b for b in backgrounds if b != "plain"]
    if "plain" in backgrounds and (not others or rng.random() < p_plain_background):
        background = "plain"
    else:
        background = others[rng.integers(len(others))]
    return SceneSpec(tuple(subjects), action, relation, background)


def distractor(spec: SceneSpec, attribute: str, rng: np.random.Generator) -> SceneSpec | None:
    """``spec`` with exactly one attribute changed to another valid value (a hard negative).

    ``attribute`` is one of ``shape``, ``colour``, ``pattern`` (of a random subject),
    ``action``, ``relation`` or ``background``. Returns None when the attribute does not apply
    (an action of a two-subject scene) or has no other valid value.
    """
    subjects = list(spec.subjects)
    if attribute in ("shape", "colour", "pattern"):
        i = int(rng.integers(len(subjects)))
        s = subjects[i]
        if attribute == "shape":
            options = [x for x in SHAPES if x != s.shape and _still_valid(spec, i, x)]
        elif attribute == "colour":
            used = {t.colour for t in subjects}
            options = [x for x in COLOURS if x not in used]
        else:
            options = [x for x in PATTERNS if x != s.pattern]
        if not options:
            return None
        new = options[rng.integers(len(options))]
        subjects[i] = Identity(**{**_identity_dict(s), attribute: new})
        return SceneSpec(tuple(subjects), spec.action, spec.relation, spec.background)
    if attribute == "action":
        if len(subjects) != 1:
            return None
        options = [a for a in valid_actions(subjects[0].shape) if a != spec.action]
        if spec.action is None:
            options = [a for a in options if a != "standing"]
        new_action = options[rng.integers(len(options))]
        return SceneSpec(spec.subjects, new_action, None, spec.background)
    if attribute == "relation":
        if len(subjects) != 2:
            return None
        options = [
            r for r in valid_relations(subjects[0].shape, subjects[1].shape) if r != spec.relation
        ]
        new_relation = options[rng.integers(len(options))]
        return SceneSpec(spec.subjects, None, new_relation, spec.background)
    if attribute == "background":
        options = [b for b in BACKGROUNDS if b != spec.background]
        new_bg = options[rng.integers(len(options))]
        return SceneSpec(spec.subjects, spec.action, spec.relation, new_bg)
    raise ValueError(f"unknown attribute {attribute!r}")


def _identity_dict(s: Identity) -> dict[str, str]:
    return {"shape": s.shape, "colour": s.colour, "pattern": s.pattern}


def _still_valid(spec: SceneSpec, i: int, shape: str) -> bool:
    if spec.action is not None:
        return spec.action in valid_actions(shape)
    if spec.relation is not None:
        shapes = [s.shape for s in spec.subjects]
        shapes[i] = shape
        return spec.relation in valid_relations(shapes[0], shapes[1])
    return True


# --------------------------------------------------------------------------------------------
# Captions


def template_for(spec: SceneSpec) -> str:
    """The caption template with slots ``{0}``, ``{1}``, ... in subject order.

    E.g. ``"{0} is jumping"``, ``"{0} is on top of {1} at night"``, ``"{0}, {1} and {2}"``.
    """
    n = len(spec.subjects)
    if n == 1:
        core = "{0}" if spec.action is None else "{0} is " + spec.action
    elif spec.relation is not None:
        core = "{0} is " + spec.relation + " {1}"
    elif n == 2:
        core = "{0} and {1}"
    else:
        core = ", ".join(f"{{{i}}}" for i in range(n - 1)) + f" and {{{n - 1}}}"
    suffix = BACKGROUND_PHRASES[spec.background]
    return f"{core} {suffix}" if suffix else core


def slot_text(identity: Identity, mode: str = "phrase") -> str:
    """A slot rendering with its article.

    ``mode``: ``"phrase"`` -> ``"a red striped star"``, ``"colour"`` -> ``"a red star"``,
    ``"class"`` -> ``"a star"``.
    """
    if mode == "phrase":
        words = identity.phrase
    elif mode == "colour":
        words = f"{identity.colour} {identity.shape}"
    elif mode == "class":
        words = identity.noun
    else:
        raise ValueError(f"unknown caption mode {mode!r}; use 'phrase', 'colour' or 'class'")
    return ("an " if words[0] in "aeiou" else "a ") + words


def fill_template(template: str, fills: Sequence[str]) -> str:
    """Substitute ``fills[i]`` for ``{i}`` (the fills are inserted literally)."""
    return template.format(*fills)


def caption_for(spec: SceneSpec, mode: str = "phrase") -> str:
    """The caption of ``spec``; ``mode`` as in :func:`slot_text`."""
    return fill_template(template_for(spec), [slot_text(s, mode) for s in spec.subjects])


@dataclass(frozen=True)
class Mention:
    """A subject as a caption names it; ``colour`` / ``pattern`` are None when not said."""

    shape: str
    colour: str | None = None
    pattern: str | None = None

    def matches(self, identity: Identity) -> bool:
        """True when every attribute the caption names agrees with ``identity``."""
        return (
            self.shape == identity.shape
            and self.colour in (None, identity.colour)
            and self.pattern in (None, identity.pattern)
        )


@dataclass(frozen=True)
class ParsedCaption:
    """The attributes a caption states (see :func:`parse_caption`)."""

    subjects: tuple[Mention, ...]
    action: str | None = None
    relation: str | None = None
    background: str = "plain"

    def matches(self, spec: SceneSpec) -> bool:
        """True when the caption is a correct description of ``spec``."""
        return (
            len(self.subjects) == len(spec.subjects)
            and all(m.matches(s) for m, s in zip(self.subjects, spec.subjects, strict=True))
            and self.action == spec.action
            and self.relation == spec.relation
            and self.background == spec.background
        )


_SUBJECT_RE = re.compile(
    r"an? (?:(?P<colour>{c}) )?(?:(?P<pattern>{p}) )?(?P<shape>{s})".format(
        c="|".join(COLOURS), p="|".join(PATTERNS), s="|".join(SHAPES)
    )
)


def _parse_subject(text: str) -> Mention:
    m = _SUBJECT_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a subject of the micro world: {text!r}")
    return Mention(m["shape"], m["colour"], m["pattern"])


def parse_caption(text: str) -> ParsedCaption:
    """Read a caption of the grammar back into its attributes.

    The empty caption parses to no subjects. Raises ValueError for text outside the grammar.
    """
    text = text.strip()
    if not text:
        return ParsedCaption(())
    background = "plain"
    for bg, suffix in BACKGROUND_PHRASES.items():
        if suffix and text.endswith(" " + suffix):
            background = bg
            text = text[: -len(suffix) - 1]
            break
    for rel in RELATIONS:
        key = f" is {rel} "
        if key in text:
            a, b = text.split(key, 1)
            return ParsedCaption((_parse_subject(a), _parse_subject(b)), None, rel, background)
    for act in ACTIONS:
        key = f" is {act}"
        if text.endswith(key):
            return ParsedCaption((_parse_subject(text[: -len(key)]),), act, None, background)
    parts = re.split(r", | and ", text)
    return ParsedCaption(tuple(_parse_subject(p) for p in parts), None, None, background)


# --------------------------------------------------------------------------------------------
# Canonical class shapes (the subject frame is [-1, 1]^2, y down, facing the viewer)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, n: int) -> None:
    def p(u: float, v: float) -> tuple[float, float]:
        return ((u + 1) / 2 * n, (v + 1) / 2 * n)

    def ellipse(cu: float, cv: float, ru: float, rv: float, fill: int = 1) -> None:
        d.ellipse([p(cu - ru, cv - rv), p(cu + ru, cv + rv)], fill=fill)

    def poly(pts: Sequence[tuple[float, float]]) -> None:
        d.polygon([p(u, v) for u, v in pts], fill=1)

    if shape == "ball":
        ellipse(0, 0, 1, 1)
    elif shape == "cube":
        d.rectangle([p(-0.85, -0.85), p(0.85, 0.85)], fill=1)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = math.radians(36 * k)
            pts.append((r * math.sin(a), -r * math.cos(a) + 0.095))
        poly(pts)
    elif shape == "pyramid":
        poly([(0, -0.9), (0.95, 0.8), (-0.95, 0.8)])
    elif shape == "heart":
        ellipse(-0.45, -0.4, 0.52, 0.52)
        ellipse(0.45, -0.4, 0.52, 0.52)
        poly([(-0.95, -0.3), (0.95, -0.3), (0, 0.95)])
    elif shape == "ring":
        ellipse(0, 0, 1, 1)
        ellipse(0, 0, 0.5, 0.5, fill=0)
    elif shape == "fish":
        ellipse(-0.2, 0.05, 0.72, 0.45)
        poly([(0.35, 0.05), (1.0, -0.45), (1.0, 0.55)])
        poly([(-0.55, -0.3), (0.1, -0.3), (-0.35, -0.75)])
    elif shape == "cat":
        ellipse(0, 0.2, 0.85, 0.72)
        poly([(-0.85, 0.05), (-0.2, -0.4), (-0.75, -0.95)])
        poly([(0.85, 0.05), (0.2, -0.4), (0.75, -0.95)])
    else:  # pragma: no cover - guarded by Identity
        raise ValueError(shape)


@cache
def canonical_mask(shape: str) -> np.ndarray:
    """The class silhouette in its frame: bool ``(CANON, CANON)``, row 0 = top (v = -1)."""
    n = CANON * 4
    img = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(img), shape, n)
    a = np.asarray(img, dtype=np.float32).reshape(CANON, 4, CANON, 4).mean(axis=(1, 3))
    out = a >= 0.5
    out.setflags(write=False)
    return out


@cache
def _outline_points(shape: str) -> np.ndarray:
    """Frame coordinates (2, N) of the corners of the silhouette's boundary pixels."""
    m = canonical_mask(shape)
    pad = np.pad(m, 1)
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    ys, xs = np.nonzero(m & ~inner)
    corners = [(xs + dx, ys + dy) for dx in (0, 1) for dy in (0, 1)]
    u = np.concatenate([c[0] for c in corners]) / CANON * 2 - 1
    v = np.concatenate([c[1] for c in corners]) / CANON * 2 - 1
    return np.stack([u, v]).astype(np.float64)


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Dark parts of ``pattern`` at frame coordinates (None for plain)."""
    if pattern == "striped":
        return ((v + 1) * 2) % 1.0 < 0.4
    if pattern == "dotted":
        fu = ((u + 1) * 2) % 1.0 - 0.5
        fv = ((v + 1) * 2) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.09
    if pattern == "checkered":
        return (np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 1
    return None


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(round(c * PATTERN_SHADE)) for c in rgb)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Layout


@dataclass
class _Placement:
    """Subject frame -> image: ``p = c + A @ (u, v)`` (pixels, y down)."""

    shape: str
    matrix: np.ndarray
    cx: float = 0.0
    cy: float = 0.0
    ext: tuple[float, float, float, float] = field(default=(0.0, 0.0, 0.0, 0.0))

    def __post_init__(self) -> None:
        q = self.matrix @ _outline_points(self.shape)
        self.ext = (float(q[0].min()), float(q[0].max()), float(q[1].min()), float(q[1].max()))

    @property
    def width(self) -> float:
        return self.ext[1] - self.ext[0]

    @property
    def top(self) -> float:
        return self.cy + self.ext[2]

    @property
    def bottom(self) -> float:
        return self.cy + self.ext[3]

    def set_bottom(self, y: float) -> None:
        self.cy = y - self.ext[3]

    def set_left(self, x: float) -> None:
        self.cx = x - self.ext[0]

    def set_centre_x(self, x: float) -> None:
        self.cx = x - (self.ext[0] + self.ext[1]) / 2


def _matrix(
    half: float,
    angle: float = 0.0,
    vflip: bool = False,
    screen_scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """``half * diag(screen_scale) @ R(angle) @ flip`` (angle in degrees, clockwise on screen)."""
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    flip = np.diag([1.0, -1.0 if vflip else 1.0])
    return half * np.diag(screen_scale) @ rot @ flip


def _layout(
    spec: SceneSpec, rng: np.random.Generator, size: int
) -> tuple[list[_Placement], list[int], list[tuple[float, float, float]]]:
    """Placements in subject order, the drawing order, and shadows (cx, y, half width)."""
    S = float(size)
    ground = GROUND * S
    shapes = [s.shape for s in spec.subjects]
    n = len(shapes)
    shadows: list[tuple[float, float, float]] = []

    if n == 1:
        act = spec.action
        half = 0.17 * S * rng.uniform(0.92, 1.08)
        angle, vflip, scale = 0.0, False, (1.0, 1.0)
        cx = S * (0.5 + rng.uniform(-0.06, 0.06))
        lift = 0.0
        if act == "big":
            half = 0.27 * S * rng.uniform(0.95, 1.05)
        elif act == "small":
            half = 0.10 * S * rng.uniform(0.9, 1.1)
        elif act == "sleeping":
            angle, scale = float(rng.choice([-90.0, 90.0])), (1.15, 0.7)
        elif act == "upside down":
            vflip = True
        elif act == "tilted":
            angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(18.0, 35.0))
        elif act == "on the left":
            cx = S * (0.27 + rng.uniform(-0.03, 0.03))
        elif act == "on the right":
            cx = S * (0.73 + rng.uniform(-0.03, 0.03))
        elif act == "jumping":
            lift = S * rng.uniform(0.18, 0.26)
        p = _Placement(shapes[0], _matrix(half, angle, vflip, scale))
        p.set_centre_x(cx)
        p.set_bottom(ground - lift)
        if act == "jumping":
            shadows.append((p.cx + (p.ext[0] + p.ext[1]) / 2, ground, 0.4 * p.width))
        placements, order = [p], [0]
    elif spec.relation is None:
        half_base = (0.14 if n == 2 else 0.11) * S
        placements = [_Placement(s, _matrix(half_base * rng.uniform(0.92, 1.08))) for s in shapes]
        widths = sum(p.width for p in placements)
        gap = (0.88 * S - widths) / (n + 1)
        x = 0.06 * S + gap * rng.uniform(0.8, 1.2)
        for p in placements:
            p.set_left(x)
            p.set_bottom(ground)
            x += p.width + gap * rng.uniform(0.7, 1.1)
        order = list(range(n))
    else:
        placements, order = _relation_layout(spec.relation, shapes, rng, S, ground)

    # keep every subject inside the frame, off the border columns (the parser reads them)
    margin = 2.0
    for p in placements:
        left, right = p.cx + p.ext[0], p.cx + p.ext[1]
        if left < margin:
            p.cx += margin - left
        elif right > S - margin:
            p.cx -= right - (S - margin)
        if p.top < margin:
            p.cy += margin - p.top
    return placements, order, shadows


def _relation_layout(
    relation: str, shapes: list[str], rng: np.random.Generator, S: float, ground: float
) -> tuple[list[_Placement], list[int]]:
    j = rng.uniform
    if relation == "inside":
        outer = _Placement(shapes[1], _matrix(0.26 * S * j(0.95, 1.05)))
        outer.set_centre_x(S * (0.5 + j(-0.05, 0.05)))
        outer.set_bottom(ground)
        ratio = 0.38 if shapes[1] == "ring" else 0.42
        inner = _Placement(shapes[0], _matrix(ratio * outer.matrix[0, 0]))
        cy = outer.cy + (0.05 * outer.matrix[0, 0] if shapes[1] == "heart" else 0.0)
        inner.cx, inner.cy = outer.cx, cy
        return [inner, outer], [1, 0]
    p0 = _Placement(shapes[0], _matrix(0.14 * S * j(0.92, 1.08)))
    p1 = _Placement(shapes[1], _matrix(0.14 * S * j(0.92, 1.08)))
    centre = S * (0.5 + j(-0.06, 0.06))
    if relation in ("on top of", "above", "below"):
        low, high = (p1, p0) if relation in ("on top of", "above") else (p0, p1)
        low.set_centre_x(centre)
        low.set_bottom(ground)
        high.set_centre_x(centre + j(-0.02, 0.02) * S)
        gap = 0.5 if relation == "on top of" else S * j(0.1, 0.16)
        high.set_bottom(low.top - gap)
        return [p0, p1], [0, 1]
    if relation == "next to":
        gap = S * j(0.04, 0.1)
        left, right = (p0, p1) if rng.random() < 0.5 else (p1, p0)
        total = left.width + gap + right.width
        left.set_left(centre - total / 2)
        right.set_left(centre - total / 2 + left.width + gap)
        p0.set_bottom(ground)
        p1.set_bottom(ground)
        return [p0, p1], [0, 1]
    # behind / in front of: side by side, the front one hides about a third of the back one
    back, front = (p0, p1) if relation == "behind" else (p1, p0)
    offset = 0.45 * (back.width + front.width) / 2 * j(0.95, 1.1)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    front.set_centre_x(centre - sign * offset / 2)
    back.set_centre_x(centre + sign * offset / 2)
    back.set_bottom(ground - 0.03 * S)  # further back = a little higher
    front.set_bottom(ground)
    order = [0, 1] if relation == "behind" else [1, 0]
    return [p0, p1], order


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True, eq=False)
class Render:
    """A rendered scene: ``image`` (H, W, 3) uint8 and ``masks`` (bool H x W, visible pixels of
    each subject, in subject order), with its spec and seed."""

    image: np.ndarray
    masks: tuple[np.ndarray, ...]
    spec: SceneSpec
    seed: int

    @property
    def template(self) -> str:
        """The caption template, e.g. ``"{0} is on top of {1}"``."""
        return template_for(self.spec)

    def slots(self, mode: str = "phrase") -> tuple[str, ...]:
        """Slot renderings in subject order (see :func:`slot_text`)."""
        return tuple(slot_text(s, mode) for s in self.spec.subjects)

    def caption(self, mode: str = "phrase") -> str:
        """The caption: ``template`` filled with ``slots(mode)``."""
        return fill_template(self.template, self.slots(mode))


def _background(background: str, rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    if background in ("plain", "grayscale"):
        img[:] = PLAIN_BACKGROUND
    elif background == "sketch":
        img[:] = _PAPER
    elif background == "grass":
        h = int(round(0.7 * size))
        img[:h] = _SKY
        img[h:] = _GRASS
    elif background == "beach":
        h1, h2 = int(round(0.55 * size)), int(round(0.68 * size))
        img[:h1] = _BEACH_SKY
        img[h1:h2] = _SEA
        img[h2:] = _SAND
    elif background == "night":
        h = int(round(0.72 * size))
        img[:h] = _NIGHT_SKY
        img[h:] = _NIGHT_GROUND
        k = max(4, size // 6)
        ys = rng.integers(1, max(2, int(0.6 * size)), k)
        xs = rng.integers(3, size - 3, k)
        img[ys, xs] = (255, 255, 240)
    return img


def _draw_subject(
    img: np.ndarray, p: _Placement, ident: Identity
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Paint one subject; returns its window and silhouette inside the window."""
    H, W = img.shape[:2]
    A = p.matrix
    corners = A @ np.array([[-1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])
    x0 = max(int(math.floor(p.cx + corners[0].min())), 0)
    x1 = min(int(math.ceil(p.cx + corners[0].max())) + 1, W)
    y0 = max(int(math.floor(p.cy + corners[1].min())), 0)
    y1 = min(int(math.ceil(p.cy + corners[1].max())) + 1, H)
    if x0 >= x1 or y0 >= y1:
        return None
    inv = np.linalg.inv(A)
    dx = (np.arange(x0, x1) + 0.5 - p.cx)[None, :]
    dy = (np.arange(y0, y1) + 0.5 - p.cy)[:, None]
    u = inv[0, 0] * dx + inv[0, 1] * dy
    v = inv[1, 0] * dx + inv[1, 1] * dy
    iu = np.floor((u + 1) * (CANON / 2)).astype(np.intp)
    iv = np.floor((v + 1) * (CANON / 2)).astype(np.intp)
    ok = (iu >= 0) & (iu < CANON) & (iv >= 0) & (iv < CANON)
    inside = ok & canonical_mask(p.shape)[np.clip(iv, 0, CANON - 1), np.clip(iu, 0, CANON - 1)]
    win = (slice(y0, y1), slice(x0, x1))
    sub = img[win]
    sub[inside] = ident.rgb
    dark = _pattern(ident.pattern, u, v)
    if dark is not None:
        sub[inside & dark] = ident.shade_rgb
    return win, inside


def render(spec: SceneSpec, size: int = 64, seed: int = 0) -> Render:
    """Render ``spec`` at ``size`` x ``size``; the jitter comes from ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    placements, order, shadows = _layout(spec, rng, size)
    img = _background(spec.background, rng, size)
    for cx, y, hw in shadows:
        ry = max(1.5, 0.045 * size)
        ys = (np.arange(size) + 0.5)[:, None]
        xs = (np.arange(size) + 0.5)[None, :]
        sh = ((xs - cx) / hw) ** 2 + ((ys - y) / ry) ** 2 <= 1.0
        grey = img[sh].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        img[sh] = np.rint(grey * 0.6).astype(np.uint8)[:, None]  # a neutral grey shadow
    full = [np.zeros((size, size), dtype=bool) for _ in placements]
    for i in order:
        drawn = _draw_subject(img, placements[i], spec.subjects[i])
        if drawn is not None:
            win, inside = drawn
            full[i][win] = inside
    masks = []
    for k, i in enumerate(order):
        vis = full[i].copy()
        for j in order[k + 1 :]:
            vis &= ~full[j]
        masks.append((i, vis))
    masks_t = tuple(m for _, m in sorted(masks, key=lambda t: t[0]))
    if spec.background == "sketch":
        img = _background("sketch", rng, size)
        for m, ident in zip(masks_t, spec.subjects, strict=True):
            pad = np.pad(m, 1)
            inner = (
                pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
            )
            img[m & ~inner] = ident.rgb
    elif spec.background == "grayscale":
        g = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = np.repeat(np.clip(np.rint(g), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return Render(img, masks_t, spec, seed)


# --------------------------------------------------------------------------------------------
# Dataset


def sample_render(seed: int, size: int = 64, **spec_kwargs: object) -> Render:
    """Sample a spec from ``seed`` (see :func:`sample_spec`) and render it with the same seed."""
    rng = np.random.default_rng([seed, 1])
    spec = sample_spec(rng, **spec_kwargs)  # type: ignore[arg-type]
    return render(spec, size=size, seed=seed)


def sample_dataset_item(
    seed: int,
    size: int = 64,
    *,
    p_empty: float = 0.1,
    p_class: float = 0.3,
    p_colour: float = 0.0,
) -> tuple[np.ndarray, str]:
    """One training pair ``(image, caption)`` for the micro models, fully determined by ``seed``.

    The caption is empty with probability ``p_empty`` (classifier-free guidance), names class
    nouns only with ``p_class`` ("a star is jumping"), colour + noun with ``p_colour``, and the
    full identity phrase otherwise ("a red striped star is jumping").
    """
    r = sample_render(seed, size)
    x = np.random.default_rng([seed, 2]).random()
    if x < p_empty:
        caption = ""
    elif x < p_empty + p_class:
        caption = r.caption("class")
    elif x < p_empty + p_class + p_colour:
        caption = r.caption("colour")
    else:
        caption = r.caption("phrase")
    return r.image, caption
