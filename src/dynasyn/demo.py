"""`dynasyn demo`: the whole method on the bundled micro model, offline, in minutes on a CPU.

1. render an example scene of the micro world (two subjects with masks and scene.json);
2. augment it (Steps 1-4; prompts from the micro world's grammar);
3. train the ``dynasyn`` preset at demo scale (all four losses);
4. render plain / action / interaction prompts into one labelled grid.
"""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image, ImageDraw

DEMO_SCENE = "cat_fish"
"""An orange checkered cat and a cyan striped fish (a tuning scene): patterns the micro model
draws from words alone (checks 32 of 32, stripes 24 of 32; dots, as in the held-out
``star_ball``, 18 of 32), so the grid shows what personalization keeps, not the model's limits
(docs/recipe.md, "The demo scene")."""
DEMO_PROMPTS = {
    "plain": ["<asset0> at night", "<asset1> on the beach"],
    "action": ["a <asset0> is jumping", "a <asset0> is upside down", "a <asset1> is small"],
    "interaction": ["a <asset0> is on top of a <asset1>", "a <asset0> is inside a <asset1>",
                    "a <asset1> is next to a <asset0>"],
}
DEMO_SCALE = dict(phase1_steps=100, phase2_steps=100)
"""The demo's schedule (on the micro model it is the micro recipe's own: phrase-initialized
placeholders, no "a photo of", phase-1 lr 5e-5, 100 + 100 steps; dynasyn.presets.MICRO_RECIPE
and docs/recipe.md)."""


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], scale: int = 2) -> Image.Image:
    """One row per prompt: its text on the left, its images to the right (upscaled)."""
    label_w = 260
    w, h = rows[0][1][0].size
    w, h = w * scale, h * scale
    cols = max(len(ims) for _, ims in rows)
    grid = Image.new("RGB", (label_w + cols * (w + 4), len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (text, ims) in enumerate(rows):
        y = r * (h + 4)
        draw.text((4, y + h // 2 - 6), text, fill="black")
        for c, im in enumerate(ims):
            grid.paste(im.resize((w, h), Image.NEAREST), (label_w + c * (w + 4), y))
    return grid


def run_demo(out: str | Path, model: str = "micro", n: int = 2, steps: int | None = None,
             overwrite: bool = False, progress: bool = True) -> Path:
    """Run the demo into ``out``; returns the grid's path."""
    from dynasyn.augment.pipeline import AugmentConfig, augment
    from dynasyn.config import build_config
    from dynasyn.generate import generate_images, save_png
    from dynasyn.micro.examples import render_example
    from dynasyn.models import resolve_model
    from dynasyn.rundir import prepare_run_dir
    from dynasyn.train import train

    out = Path(out)
    resolve_model(model)  # fail early (exit 2) when the model is missing
    prepare_run_dir(out, overwrite, False)
    t0 = time.time()
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    from dynasyn.micro.examples import EXAMPLES

    scene = render_example(DEMO_SCENE, out)
    what = ", ".join(i.phrase for i in EXAMPLES[DEMO_SCENE][0].subjects)
    print(f"[demo] scene: {scene} ({what})")
    aug = augment(scene, out / "augmented",
                  AugmentConfig(model=model, num_prompts=8, provider="micro", draft_steps=20,
                                gsa_steps=30, guidance=5.0), progress=progress)
    print(f"[demo] augmented items: {aug} ({time.time() - t0:.0f} s)")
    scale = dict(DEMO_SCALE)
    if steps is not None:
        scale.update(phase1_steps=steps, phase2_steps=steps)
    cfg = build_config("dynasyn", overrides=dict(model=model, scene=str(scene),
                                                 augmented=str(aug), **scale))
    run = out / "run"
    trainer = train(cfg, run, progress=progress)
    print(f"[demo] trained: {run} ({time.time() - t0:.0f} s)")
    pipe = trainer.pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for kind, prompts in DEMO_PROMPTS.items():
        paths = generate_images(pipe, prompts, out / "images" / kind, n=n, seed=0, steps=25,
                                guidance=5.0, progress=False)
        for p in prompts:
            ims = [Image.open(x).convert("RGB") for x in paths
                   if x.name.startswith(_slug(p)) and not x.name.endswith("_grid.png")]
            rows.append((f"{kind}: {p}", ims))
    scene_img = Image.open(scene / "img.png").convert("RGB")
    rows.insert(0, ("reference scene", [scene_img]))
    grid_path = out / "demo_grid.png"
    save_png(labelled_grid(rows), grid_path)
    print(f"[demo] done in {time.time() - t0:.0f} s: images in {out / 'images'}, grid {grid_path}")
    print(f"[demo] the run {run} is self-contained (its scene copy in {run / 'scene'}); next: "
          f'dynasyn generate {run} "a <asset0> is inside a <asset1>"   or   '
          f"dynasyn evaluate {run}")
    return grid_path


def _slug(text: str) -> str:
    from dynasyn.generate import slug

    return slug(text)
