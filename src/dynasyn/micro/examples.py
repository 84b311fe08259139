"""The bundled example scenes of the micro world (rendered, not stored: deterministic)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dynasyn.micro.world import Identity, Render, SceneSpec, render

EXAMPLES: dict[str, tuple[SceneSpec, int]] = {
    "star_ball": (
        SceneSpec((Identity("star", "red", "striped"), Identity("ball", "blue", "dotted"))),
        1,
    ),
    "cat_fish": (
        SceneSpec(
            (Identity("cat", "orange", "checkered"), Identity("fish", "cyan", "striped")),
            background="grass",
        ),
        2,
    ),
    "three_toys": (
        SceneSpec(
            (
                Identity("cube", "green", "plain"),
                Identity("heart", "pink", "dotted"),
                Identity("pyramid", "yellow", "striped"),
            )
        ),
        3,
    ),
    "three_beach": (
        SceneSpec(
            (
                Identity("ring", "purple", "checkered"),
                Identity("cat", "red", "dotted"),
                Identity("star", "cyan", "plain"),
            ),
            background="beach",
        ),
        4,
    ),
    "fish_ring": (
        SceneSpec((Identity("fish", "yellow", "dotted"), Identity("ring", "blue", "striped"))),
        5,
    ),
}
"""name -> (spec, seed): two scenes of two subjects, two of three, and one more of two."""

BENCH_SCENES: dict[str, tuple[SceneSpec, int, str]] = {
    # tuning: the micro recipe was chosen on the first two; λ sweeps may use all five
    "tune_heart_cube": (
        SceneSpec((Identity("heart", "green", "checkered"), Identity("cube", "orange", "striped"))),
        11, "tuning",
    ),
    "tune_cat_ring": (
        SceneSpec((Identity("cat", "purple", "plain"), Identity("ring", "yellow", "dotted"))),
        12, "tuning",
    ),
    "cat_fish": (*EXAMPLES["cat_fish"], "tuning"),
    "three_toys": (*EXAMPLES["three_toys"], "tuning"),
    "three_beach": (*EXAMPLES["three_beach"], "tuning"),
    # held out: never used to choose anything
    "star_ball": (*EXAMPLES["star_ball"], "held-out"),
    "fish_ring": (*EXAMPLES["fish_ring"], "held-out"),
    "held_pyramid_fish": (
        SceneSpec((Identity("pyramid", "pink", "checkered"), Identity("fish", "green", "dotted")),
                  background="night"),
        21, "held-out",
    ),
    "held_cube_heart": (
        SceneSpec((Identity("cube", "cyan", "dotted"), Identity("heart", "red", "plain")),
                  background="grass"),
        22, "held-out",
    ),
    "held_star_cat": (
        SceneSpec((Identity("star", "orange", "plain"), Identity("cat", "blue", "checkered")),
                  background="beach"),
        23, "held-out",
    ),
}
"""The benchmark's ten scenes: name -> (spec, seed, role); role is ``tuning`` (recipes and
weights may be chosen on them) or ``held-out`` (only ever measured). Rendered by
``python scripts/make_examples.py --bench``."""

MIN_GAP = 2
"""Subjects of an example are at least this many pixels apart (no touching masks)."""


def _gap(a: np.ndarray, b: np.ndarray) -> int:
    """Smallest horizontal distance in pixels between two masks' column ranges."""
    xa, xb = np.nonzero(a.any(axis=0))[0], np.nonzero(b.any(axis=0))[0]
    return int(max(xb.min() - xa.max(), xa.min() - xb.max()))


def write_example(out: Path, name: str, r: Render) -> Path:
    """Write one scene directory ``out/name`` from a render."""
    for i in range(len(r.masks)):
        for j in range(i + 1, len(r.masks)):
            gap = _gap(r.masks[i], r.masks[j])
            if gap < MIN_GAP:
                raise ValueError(f"example {name}: subjects {i} and {j} are {gap}px apart")
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    Image.fromarray(r.image).save(d / "img.png")
    subjects = []
    for i, (m, ident) in enumerate(zip(r.masks, r.spec.subjects, strict=True)):
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(d / f"mask{i}.png")
        subjects.append({"mask": f"mask{i}.png", "class": ident.noun, "phrase": ident.phrase})
    meta = {
        "image": "img.png",
        "subjects": subjects,
        "world": {
            "generator": "dynasyn.micro.world",
            "seed": r.seed,
            "size": r.image.shape[0],
            "background": r.spec.background,
            "template": r.template,
            "caption": r.caption("phrase"),
        },
    }
    (d / "scene.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d



def render_example(name: str, out: Path, size: int = 64) -> Path:
    """Render example ``name`` into the scene directory ``out/name``."""
    spec, seed = EXAMPLES[name]
    return write_example(out, name, render(spec, size=size, seed=seed))
