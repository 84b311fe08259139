"""Measure DynamicID in the micro world: ``python -m dynasyn.dynamicid.measure --weights DIR``.

One command for the table of docs/dynamicid.md. It

1. renders ``--scenes`` two-subject scenes of **held-out identities**
   (:func:`~dynasyn.dynamicid.train.heldout_identities`: never seen in training), distinct
   classes and colours, standing side by side on the plain background, written as scene
   directories (photo, masks, ``scene.json`` with class nouns and identity phrases);
2. gives each scene prompts of the world's grammar: two actions per subject
   (``"<asset0> is sleeping"``, category *action*) and three relations of the pair
   (``"<asset1> is on top of <asset0>"``, category *interaction*);
3. renders ``-n`` images per prompt (seeds 0..n-1) with DynamicID and its ablations — no gate
   (plain decoupled attention), no boxes, no IMR — with the base model prompted with each
   subject's identity phrase (the *text ceiling*, "a green checkered heart is sleeping"), and,
   unless ``--no-dynasyn``, with the ``dynasyn`` preset personalized to each scene (augmented
   with the micro world's prompts and trained at demo scale, as ``dynasyn demo``);
4. scores every image exactly with the micro parser (:mod:`dynasyn.evaluate.exact`:
   identity kept per subject, action followed, identity mixing) and writes
   ``OUT/metrics.json`` and ``OUT/table.md`` (rates with 95 % Wilson intervals, seconds per
   image, identity kept as a share of the text ceiling's and of DynASyn's).

Each method's records of a scene are stored under ``OUT/records`` as they finish; running
the same command again skips them (resumable).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["METHODS", "main", "make_scenes", "measure", "scene_prompts", "table"]

METHODS: dict[str, dict[str, Any]] = {
    "dynamicid": {},
    "no gate": {"gate": False},
    "no boxes": {"boxes": None},
    "no IMR": {"use_imr": False},
}
"""DynamicID and its ablations: the call options each changes."""


def make_scenes(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` two-subject scenes of held-out identities (distinct classes and colours), 64 px,
    plain background, side by side; written (or kept, when present) under ``root``."""
    from PIL import Image

    from dynasyn.dynamicid.train import heldout_identities
    from dynasyn.micro.world import SceneSpec, render
    from dynasyn.scene import save_scene

    held = heldout_identities()
    rng = np.random.default_rng([seed, 31])
    out = []
    for i in range(n):
        path = root / f"scene{i:02d}"
        while True:
            a, b = (held[j] for j in rng.choice(len(held), 2, replace=False))
            if a.shape != b.shape and a.colour != b.colour:
                break
        if not (path / "scene.json").is_file():
            r = render(SceneSpec((a, b)), size=64, seed=seed * 1000 + i)
            save_scene(path, Image.fromarray(r.image), list(r.masks), [a.shape, b.shape],
                       [a.phrase, b.phrase], overwrite=True)
        out.append(path)
    return out


def scene_prompts(classes: list[str], seed: int, actions: int = 2,
                  relations: int = 3) -> list[tuple[str, str]]:
    """(category, prompt) pairs for a two-subject scene of micro-world ``classes``."""
    from dynasyn.micro.world import valid_actions, valid_relations

    rng = np.random.default_rng([seed, 37])
    out: list[tuple[str, str]] = []
    for s, shape in enumerate(classes):
        acts = [a for a in valid_actions(shape) if a != "standing"]
        for j in rng.choice(len(acts), min(actions, len(acts)), replace=False):
            out.append(("action", f"<asset{s}> is {acts[j]}"))
    pairs = [(0, 1), (1, 0)]
    options = [(p, r) for p in pairs for r in valid_relations(classes[p[0]], classes[p[1]])]
    for j in rng.choice(len(options), min(relations, len(options)), replace=False):
        (x, y), rel = options[j]
        out.append(("interaction", f"<asset{x}> is {rel} <asset{y}>"))
    return out


def _template(prompt: str) -> tuple[str, list[int]]:
    """``"<asset1> is on top of <asset0>"`` -> (``"{0} is on top of {1}"``, [1, 0])."""
    order: list[int] = []

    def sub(m: re.Match[str]) -> str:
        k = int(m.group(1))
        if k not in order:
            order.append(k)
        return "{" + str(order.index(k)) + "}"

    return re.sub(r"<asset(\d+)>", sub, prompt), order


def _score(images: list[Any], prompt: str, scene: Any, refs: list[Any]) -> list[dict[str, Any]]:
    from dynasyn.dynamicid.pipeline import prompt_identities, substitute_classes
    from dynasyn.evaluate.exact import prompt_meaning, score_image

    meaning = prompt_meaning(substitute_classes(prompt, scene.classes))
    subjects = prompt_identities(prompt)
    out = []
    for im in images:
        r = score_image(im, subjects, refs, meaning)
        r.pop("parsed", None)
        out.append(r)
    return out


def _save(images: list[Any], folder: Path, prompt: str) -> None:
    from dynasyn.generate import slug

    folder.mkdir(parents=True, exist_ok=True)
    for j, im in enumerate(images):
        tmp = folder / f".{slug(prompt)}_{j}.png.tmp"
        im.save(tmp, format="PNG")
        tmp.replace(folder / f"{slug(prompt)}_{j}.png")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _zeroshot(pipe: Any, scene: Any, prompts: list[tuple[str, str]], opts: dict[str, Any],
              n: int, steps: int, guidance: float, folder: Path) -> dict[str, Any]:
    from dynasyn.scene import MASK_THRESHOLD

    refs_img = [scene.image] * len(scene)
    masks = [m >= MASK_THRESHOLD for m in scene.masks]
    boxes = opts.get("boxes", "auto")
    records, seconds, count = [], 0.0, 0
    from dynasyn.evaluate.exact import scene_references

    refs = scene_references(scene)
    for category, prompt in prompts:
        images = []
        for j in range(n):
            t0 = time.perf_counter()
            im = pipe(prompt, id_images=refs_img, id_masks=masks, id_boxes=boxes,
                      gate=opts.get("gate", True), use_imr=opts.get("use_imr", True),
                      num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(j)).images[0]
            seconds += time.perf_counter() - t0
            count += 1
            images.append(im)
        _save(images, folder, prompt)
        records.append({"category": category, "prompt": prompt,
                        "exact": {"images": _score(images, prompt, scene, refs)}})
    return {"records": records, "seconds": seconds, "images": count}


def _ceiling(model: str, scene: Any, prompts: list[tuple[str, str]], n: int, steps: int,
             guidance: float, cache: Path, folder: Path, device: str) -> dict[str, Any]:
    from dynasyn.evaluate.exact import ceiling_images, phrase_prompt, scene_references

    refs = scene_references(scene)
    texts = []
    for _, prompt in prompts:
        template, order = _template(prompt)
        texts.append(phrase_prompt(template, order, refs))
    t0 = time.perf_counter()
    images, _, sampled = ceiling_images(model, texts, list(range(n)), steps, guidance,
                                        device=device, cache_dir=cache)
    seconds = time.perf_counter() - t0
    records = []
    for (category, prompt), text, ims in zip(prompts, texts, images, strict=True):
        _save(ims, folder, prompt)
        records.append({"category": category, "prompt": prompt, "text": text,
                        "exact": {"images": _score(ims, prompt, scene, refs)}})
    return {"records": records, "seconds": seconds, "images": sampled}


def _dynasyn(model: str, scene_dir: Path, scene: Any, prompts: list[tuple[str, str]], n: int,
             steps: int, guidance: float, work: Path, folder: Path, phase_steps: int
             ) -> dict[str, Any]:
    from dynasyn.augment.pipeline import AugmentConfig, augment
    from dynasyn.config import build_config
    from dynasyn.evaluate.exact import scene_references
    from dynasyn.train import train as train_dynasyn

    t0 = time.perf_counter()
    aug = augment(scene_dir, work / "augmented",
                  AugmentConfig(model=model, num_prompts=8, provider="micro", draft_steps=20,
                                gsa_steps=30, guidance=5.0), progress=False)
    cfg = build_config("dynasyn", overrides=dict(
        model=model, scene=str(scene_dir), augmented=str(aug), phase1_steps=phase_steps,
        phase2_steps=phase_steps, phase2_lr=2e-5, prompt_prefix=""))
    trainer = train_dynasyn(cfg, work / "run", progress=False, overwrite=True)
    train_s = time.perf_counter() - t0
    pipe = trainer.pipeline()
    pipe.set_progress_bar_config(disable=True)
    refs = scene_references(scene)
    records, seconds, count = [], 0.0, 0
    for category, prompt in prompts:
        images = []
        for j in range(n):
            t1 = time.perf_counter()
            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(j)).images[0])
            seconds += time.perf_counter() - t1
            count += 1
        _save(images, folder, prompt)
        records.append({"category": category, "prompt": prompt,
                        "exact": {"images": _score(images, prompt, scene, refs)}})
    return {"records": records, "seconds": seconds, "images": count, "train_seconds": train_s}


def measure(weights: Path, out: Path, *, model: str = "micro", scenes: int = 10, n: int = 4,
            steps: int = 25, guidance: float = 5.0, methods: list[str] | None = None,
            ceiling: bool = True, dynasyn: bool = True, dynasyn_steps: int = 100,
            device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Run the measurement into ``out`` (resumable); returns the metrics."""
    from tqdm.auto import tqdm

    from dynasyn.dynamicid.pipeline import load
    from dynasyn.evaluate.exact import summarize
    from dynasyn.models import load_pipeline, pick_device
    from dynasyn.scene import load_scene

    methods = list(methods or METHODS)
    scene_dirs = make_scenes(out / "scenes", scenes)
    pipe = None
    rows: dict[str, dict[str, Any]] = {}
    todo = [*methods, *(["text ceiling"] if ceiling else []), *(["dynasyn"] if dynasyn else [])]
    bar = tqdm(total=len(todo) * len(scene_dirs), desc="measure", disable=not progress)
    for method in todo:
        per_scene = []
        for i, sdir in enumerate(scene_dirs):
            rec_file = out / "records" / method.replace(" ", "-") / f"{sdir.name}.json"
            if rec_file.is_file():
                per_scene.append(json.loads(rec_file.read_text()))
                bar.update(1)
                continue
            scene = load_scene(sdir)
            prompts = scene_prompts(scene.classes, seed=i)
            folder = out / "images" / method.replace(" ", "-") / sdir.name
            if method in METHODS:
                if pipe is None:
                    from diffusers import DDIMScheduler

                    base = load_pipeline(model)
                    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
                    base.set_progress_bar_config(disable=True)
                    pipe = load(base, weights).to(pick_device(device))
                pipe.classes = scene.classes
                res = _zeroshot(pipe, scene, prompts, METHODS[method], n, steps, guidance,
                                folder)
            elif method == "text ceiling":
                res = _ceiling(model, scene, prompts, n, steps, guidance,
                               out / "ceiling-cache", folder, device)
            else:
                res = _dynasyn(model, sdir, scene, prompts, n, steps, guidance,
                               out / "dynasyn" / sdir.name, folder, dynasyn_steps)
            _write_json(rec_file, res)
            per_scene.append(res)
            bar.update(1)
        records = [r for s in per_scene for r in s["records"]]
        images = sum(s["images"] for s in per_scene)
        seconds = sum(s["seconds"] for s in per_scene)
        rows[method] = {**summarize(records),
                        "seconds_per_image": round(seconds / images, 3) if images else None,
                        "train_seconds": round(sum(s.get("train_seconds", 0.0)
                                                   for s in per_scene), 1)}
    bar.close()
    result = {"weights": str(weights), "model": model, "scenes": len(scene_dirs), "n": n,
              "steps": steps, "guidance": guidance, "methods": rows}
    _write_json(out / "metrics.json", result)
    text = table(result)
    tmp = out / ".table.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "table.md")
    return result


def _cell(r: dict[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f} % [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`measure`'s result."""
    rows = result["methods"]

    def kept(m: str) -> float | None:
        r = rows.get(m, {}).get("overall", {}).get("identity_kept", {})
        return r.get("rate") if r else None

    lines = [
        "| method | identity kept | … action prompts | … interaction prompts | action followed"
        " | relation followed | identity mixing (two subjects) | kept / ceiling | kept / DynASyn"
        " | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ceil, dyn = kept("text ceiling"), kept("dynasyn")
    for m, r in rows.items():
        cats = r.get("categories", {})
        act, inter = cats.get("action", {}), cats.get("interaction", {})
        k = kept(m)
        lines.append(" | ".join([
            f"| {m}", _cell(r["overall"].get("identity_kept")), _cell(act.get("identity_kept")),
            _cell(inter.get("identity_kept")), _cell(act.get("action_followed")),
            _cell(inter.get("action_followed")), _cell(inter.get("identity_mixing")),
            f"{k / ceil:.2f}" if k is not None and ceil else "–",
            f"{k / dyn:.2f}" if k is not None and dyn else "–",
            f"{r['seconds_per_image']:.2f}" if r.get("seconds_per_image") else "–"]) + " |")
    lines.append("")
    lines.append(f"{result['scenes']} scenes of held-out identities, {result['n']} images per "
                 f"prompt, {result['steps']} DDIM steps, guidance {result['guidance']}; rates "
                 "with 95 % Wilson intervals. dynasyn's s / image excludes its training "
                 "(train_seconds in metrics.json).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m dynasyn.dynamicid.measure --help``."""
    from dynasyn.dynamicid.train import default_out
    from dynasyn.errors import InputError
    from dynasyn.models import quiet_libraries

    ap = argparse.ArgumentParser(
        prog="python -m dynasyn.dynamicid.measure",
        description="Measure DynamicID exactly in the micro world (held-out identities) beside "
        "its ablations, the text ceiling and the dynasyn preset; writes OUT/table.md and "
        "OUT/metrics.json (resumable).")
    ap.add_argument("--weights", type=Path, default=None,
                    help="DynamicID weights directory (default: the bundled one)")
    ap.add_argument("--out", type=Path, default=Path("runs/dynamicid-measure"))
    ap.add_argument("--model", default="micro")
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--no-dynasyn", action="store_true")
    ap.add_argument("--dynasyn-steps", type=int, default=100,
                    help="steps per phase of the dynasyn preset (default 100, demo scale)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    weights = args.weights or default_out()
    try:
        from dynasyn.dynamicid.weights import read_weights

        read_weights(weights)
        result = measure(weights, args.out, model=args.model, scenes=args.scenes, n=args.n,
                         steps=args.steps, guidance=args.guidance, methods=methods,
                         ceiling=not args.no_ceiling, dynasyn=not args.no_dynasyn,
                         dynasyn_steps=args.dynasyn_steps, device=args.device,
                         progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"wrote {args.out / 'table.md'} and {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
