"""``dynasyn evaluate``: render a run's evaluation prompts and score them.

For every prompt (:mod:`dynasyn.evaluate.prompts`) the run renders ``n`` images with seeds
``seed … seed+n-1`` — the same calls as ``dynasyn generate``, so the pictures match it up to
floating-point rounding — while the placeholder tokens' cross-attention maps are captured
(averaged over the capture layers and the denoising steps, conditional half of CFG). Each image
is scored (:mod:`dynasyn.evaluate.metrics`):

- ``clip_t``: CLIP-T against the class-noun rendering of the prompt;
- ``clip_i``: CLIP-I against the whole reference photo (at the run's resolution, the
  center-cropped view the run was trained on);
- ``clip_i_subject``: CLIP-I against each prompted subject's reference crop, averaged;
- ``identity_region``: CLIP-I between each prompted subject's reference crop and the generated
  image cropped the same way to that subject's attention region (segmented like the
  augmentation's pseudo masks: Otsu threshold, overlaps resolved, largest component), averaged;
- ``image_reward`` / ``dino_i`` / ``dino_i_subject`` when available;
- ``detect_compare`` (two or more subjects; approximate, :mod:`dynasyn.evaluate.detect_compare`):
  each prompted subject's region crop against every reference subject crop, own similarity
  minus the best other one, and the share of subjects another reference is closer to
  (identity mixing on photos, MuDI's Detect-and-Compare), with CLIP and, when given, DINO.

For a micro-world scene (every class one of the micro world's) every image is also read by the
micro parser and scored exactly (:mod:`dynasyn.evaluate.exact`: ``identity_kept``,
``action_followed``, ``identity_and_action``, ``identity_mixing``, rates with 95 % Wilson
intervals per category and overall, ``"exact"`` in ``metrics.json``), and beside them the *text
ceiling* (``"exact_ceiling"``): the run's base model prompted with each subject's identity
phrase instead of its placeholder ("a red striped star is jumping"), same prompts and seeds,
scored the same way (``ceiling=False`` / ``--no-ceiling`` skips it; its images are reused from
``ceiling_cache`` or from a previous evaluation in ``out``).

``metrics.json`` holds every per-image score, and mean ± std (population std, over images) per
prompt, per category and overall; ``report.html`` shows the pictures. The output directory is
assembled under a temporary name beside it and renamed into place when complete, so a reader
never sees half an evaluation; a previous evaluation there is replaced.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dynasyn.errors import InputError
from dynasyn.evaluate.detect_compare import detect_compare, detect_compare_block
from dynasyn.evaluate.exact import (
    ceiling_images,
    exact_block,
    phrase_prompt,
    prompt_meaning,
    prompt_rates,
    scene_references,
    score_image,
    summarize,
)
from dynasyn.evaluate.metrics import (
    ClipScorer,
    DinoScorer,
    ImageRewardScorer,
    attention_region,
    attention_regions,
    blank_crop,
    image_reward_available,
    mean_std,
    subject_reference,
)
from dynasyn.evaluate.prompts import (
    CATEGORIES,
    DEFAULT_LIMIT,
    EvalPrompt,
    is_micro_scene,
    prompt_sets,
    read_prompt_file,
)

__all__ = ["METRICS", "METRICS_FILE", "evaluate"]

METRICS_FILE = "metrics.json"

METRICS: dict[str, str] = {
    "clip_t": "CLIP-T: cosine of the image and the prompt with class nouns for placeholders",
    "clip_i": "CLIP-I: cosine of the image and the whole reference photo",
    "clip_i_subject": "CLIP-I against each prompted subject's reference crop (mask box, "
                      "background grey), mean over the prompt's subjects",
    "identity_region": "CLIP-I between each prompted subject's reference crop and the image "
                       "cropped to that subject's attention region (whole image if the map is "
                       "empty), mean over the prompt's subjects; does not reward copying the "
                       "reference layout",
    "image_reward": "ImageReward-v1.0 score for the class-noun prompt",
    "dino_i": "DINO cosine of the image and the whole reference photo",
    "dino_i_subject": "DINO cosine against each prompted subject's reference crop, mean",
}
"""Metric name -> what it measures (also written into metrics.json)."""


def _to_pil(image: torch.Tensor) -> Image.Image:
    arr = ((image.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(arr)


def _find_scene(run: Path, cfg_scene: str, scene: str | Path | None) -> Path:
    """``scene`` (``--scene``) when given, else the run's recorded scene: its copy
    ``RUN/scene`` (or, for older runs, the path recorded relative to the working directory)."""
    from dynasyn.rundir import find_run_scene

    if scene is not None:
        p = Path(scene)
        if not p.is_dir():
            raise InputError(f"scene directory {p} does not exist; check --scene")
        return p
    return find_run_scene(run, cfg_scene, "pass --scene DIR with the scene the run was trained on")


def _find_augmented(run: Path, augmented: str | None) -> Path | None:
    from dynasyn.rundir import run_path

    if not augmented:
        return None
    for p in (run_path(run, augmented), run / "augmented"):
        if p.is_dir():
            return p
    return None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / METRICS_FILE).is_file():
        raise InputError(
            f"output directory {out} exists and is not an evaluation (no {METRICS_FILE}); "
            "choose another --out or delete it"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _choose_prompts(categories: Sequence[str], prompt_file: str | Path | None, n_subjects: int,
                    classes: Sequence[str], grammar: str, limit: int | None
                    ) -> tuple[dict[str, list[EvalPrompt]], str, list[str]]:
    notes: list[str] = []
    if prompt_file is not None:
        return read_prompt_file(prompt_file, n_subjects), f"file {Path(prompt_file).name}", notes
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    if grammar == "auto":
        grammar = "micro" if is_micro_scene(classes) else "paper"
    sets = prompt_sets(n_subjects, categories, classes, grammar, limit)
    for cat in list(sets):
        if not sets[cat]:
            notes.append(f"{cat} prompts skipped: they need two subjects and the run has one")
            del sets[cat]
    if not sets:
        raise InputError("no evaluation prompts for this run; choose other --prompts "
                         "or pass --prompt-file")
    return sets, grammar, notes


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b)


def _previous_ceiling(out: Path) -> dict[str, Path]:
    """Ceiling images of a previous evaluation in ``out``: cache key -> file."""
    try:
        old = json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    known: dict[str, Path] = {}
    for rec in (old.get("exact_ceiling") or {}).get("prompts", []):
        for key, path in zip(rec.get("keys", []), rec.get("images", []), strict=False):
            known[str(key)] = out / str(path)
    return known


def _text_ceiling(base_model: str, records: Sequence[dict[str, Any]], refs: Sequence[Any],
                  tmp: Path, out: Path, *, n: int, seed: int, steps: int, guidance: float,
                  device: str, cache_dir: str | Path | None, progress: bool) -> dict[str, Any]:
    """Render every evaluated prompt with the base model and the subjects' identity phrases
    (same seeds), save the images under ``tmp/ceiling`` and score them exactly."""
    from dynasyn.generate import slug

    t0 = time.time()
    seeds = [seed + j for j in range(n)]
    texts = [phrase_prompt(r["template"], r["subjects"], refs) for r in records]
    unique = list(dict.fromkeys(texts))
    images, keys, sampled = ceiling_images(
        base_model, unique, seeds, steps, guidance, device=device, cache_dir=cache_dir,
        known=_previous_ceiling(out), progress=progress)
    by_text = {t: (ims, ks) for t, ims, ks in zip(unique, images, keys, strict=True)}
    out_records: list[dict[str, Any]] = []
    used: dict[str, set[str]] = {}
    for r, text in zip(records, texts, strict=True):
        ims, ks = by_text[text]
        cat_dir = tmp / "ceiling" / r["category"]
        cat_dir.mkdir(parents=True, exist_ok=True)
        name = slug(text)
        while name in used.setdefault(r["category"], set()):
            name += "-x"
        used[r["category"]].add(name)
        paths = []
        for s, im in zip(seeds, ims, strict=True):
            f = cat_dir / f"{name}_{s}.png"
            im.save(f)
            paths.append(f.relative_to(tmp).as_posix())
        meaning = prompt_meaning(r["class_prompt"])
        scored = [score_image(im, r["subjects"], refs, meaning) for im in ims]
        out_records.append({
            "category": r["category"], "template": r["template"], "subjects": r["subjects"],
            "prompt": text, "class_prompt": r["class_prompt"], "seeds": seeds,
            "images": paths, "keys": ks,
            "exact": {"images": scored, "summary": prompt_rates(scored)},
        })
    return {"model": base_model, "prompts": out_records, "sampled": sampled,
            "reused": len(unique) * n - sampled, "seconds": round(time.time() - t0, 1),
            **summarize(out_records)}


def evaluate(
    run: str | Path,
    categories: Sequence[str] | str = CATEGORIES,
    prompt_file: str | Path | None = None,
    n: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    clip_model: str | Path = "micro",
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    *,
    limit: int | None = DEFAULT_LIMIT,
    grammar: str = "auto",
    scene: str | Path | None = None,
    dino_model: str | Path | None = None,
    threshold: float | str = "otsu",
    max_sheets: int = 12,
    classes: Sequence[str] | None = None,
    ceiling: bool = True,
    ceiling_cache: str | Path | None = None,
    mean_shift: float = 0.0,
) -> dict[str, Any]:
    """Evaluate a trained run; write ``metrics.json`` and ``report.html`` into ``out``.

    Args:
        run: run directory (``dynasyn train`` output).
        categories: prompt categories (``plain``, ``action``, ``interaction``; a list or a
            comma-separated string); ignored with ``prompt_file``.
        prompt_file: a file of prompts with ``<assetN>`` placeholders
            (:func:`~dynasyn.evaluate.prompts.read_prompt_file`) instead of the built-in sets.
        n: images per prompt (seeds ``seed … seed+n-1``).
        seed: first seed.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        clip_model: ``"micro"``, a local CLIPModel directory or a hub id.
        out: output directory (default ``RUN/eval``); a previous evaluation there is replaced.
        device: ``auto``, ``cpu``, ``cuda``, …
        progress: show a progress bar.
        limit: prompts per category for the built-in sets (None: all).
        grammar: ``paper``, ``micro`` or ``auto`` (micro for micro-world classes).
        scene: a scene directory to use instead of the run's own copy (``RUN/scene``; runs
            from before such copies: the scene recorded in ``RUN/config.yaml``).
        dino_model: a DINO/ViT model directory or hub id for the optional DINO scores.
        threshold: attention-region threshold: ``"otsu"`` (per map) or a fraction in (0, 1)
            of the min-max normalized map.
        max_sheets: contact sheets of the augmented data shown in the report.
        classes: class nouns of the subjects (one per placeholder) for the scene and the class
            prompts (CLIP-T, ImageReward); default: the run's (``run.json``).
        ceiling: for micro-world scenes, also render the *text ceiling* (the base model
            prompted with each subject's identity phrase, same prompts and seeds) and score it
            with the same exact metrics (``"exact_ceiling"``).
        ceiling_cache: a directory of ceiling images to reuse and add to (``<key>.png``, the
            key covering base model, prompt, seed, steps and guidance); without one, the
            ceiling images of a previous evaluation in ``out`` are reused.
        mean_shift: γ > 0 renders the run's images from MuDI's mean-shifted initial noise
            (:func:`~dynasyn.generate.mean_shifted_latents`, the prompt's subjects cut out of
            the scene); the text ceiling keeps plain noise.

    Returns:
        The metrics dictionary as written to ``metrics.json``, plus ``"out"`` (its directory).

    Raises:
        InputError: the run, scene, prompts, CLIP model or output directory cannot be used
            (checked before anything is generated or written).
    """
    from dynasyn.attention import install_attention_capture
    from dynasyn.augment.draft import cfg_weights, run_capturing
    from dynasyn.config import atomic_write_text, load_config
    from dynasyn.evaluate.report import heat_overlay, write_report
    from dynasyn.generate import (
        check_placeholders,
        load_run,
        make_grid,
        mean_shifted_latents,
        read_run,
        slug,
    )
    from dynasyn.models import pick_device
    from dynasyn.scene import load_scene
    from dynasyn.tokens import encode_template, placeholder

    # ---------------------------------------------------------------- validate everything
    run = Path(run)
    info = read_run(run)
    if not (run / "config.yaml").is_file():
        raise InputError(f"{run} has no config.yaml; evaluate a run written by `dynasyn train`")
    cfg = load_config(run / "config.yaml")
    if n < 1 or steps < 1:
        raise InputError("--n and --steps must be >= 1")
    if threshold != "otsu" and not (isinstance(threshold, int | float) and 0 < threshold < 1):
        raise InputError(f"the attention threshold must be 'otsu' or in (0, 1) (got {threshold!r})")
    placeholders: list[str] = list(info["placeholders"])
    if classes is not None and len(classes) != len(placeholders):
        raise InputError(f"--classes: {len(classes)} given but the run has {len(placeholders)} "
                         f"subjects ({', '.join(placeholders)}); give one class noun per subject")
    classes = list(classes if classes is not None else info["classes"])
    scene_dir = _find_scene(run, cfg.scene, scene)
    sc = load_scene(scene_dir, classes=classes)
    refs = scene_references(sc) if is_micro_scene(classes) else None
    if len(sc) != len(placeholders):
        raise InputError(f"scene {scene_dir} has {len(sc)} subjects but the run has "
                         f"{len(placeholders)}; pass the scene the run was trained on")
    sets, prompt_set, notes = _choose_prompts(categories, prompt_file, len(placeholders),
                                              classes, grammar, limit)
    for prompts in sets.values():
        for p in prompts:
            check_placeholders(p.placeholder_prompt(), placeholders)
    out = Path(out) if out is not None else run / "eval"
    _check_out(out)
    dev = pick_device(device)
    scorer = ClipScorer.from_name(clip_model, device=dev)
    dino = DinoScorer.from_name(dino_model, device=dev) if dino_model is not None else None
    if dino is None:
        notes.append("DINO skipped: no DINO model given (dino_model / --dino-model PATH)")
    reward = None
    ok, why = image_reward_available()
    if ok:
        try:
            reward = ImageRewardScorer(dev)
        except Exception as e:  # noqa: BLE001 - optional metric, any failure is a note
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if reward is None:
        notes.append(f"ImageReward skipped: {why}")

    # ---------------------------------------------------------------- references
    resolution = int(info.get("resolution") or cfg.resolution or 512)
    ref_t, masks_t = sc.tensors(resolution)
    ref = _to_pil(ref_t)
    masks = [m.numpy() for m in masks_t]
    subj_refs = [subject_reference(ref, m) for m in masks]
    ref_e = scorer.image_embeds([ref, *subj_refs])
    dino_ref = dino.image_embeds([ref, *subj_refs]) if dino is not None else None

    pipe = load_run(run, device=device)
    try:
        store = install_attention_capture(pipe.unet, cfg.attention_downsample)
    except ValueError as e:
        store = None
        notes.append(f"attention maps unavailable ({e}); identity_region uses whole images")

    # every prompt must tokenize (length, placeholders) before anything is generated
    encoded = {(cat, i): encode_template(pipe.tokenizer, p.template,
                                         [placeholder(s) for s in p.subjects])
               for cat, prompts in sets.items() for i, p in enumerate(prompts)}

    if refs is None:
        notes.append("exact metrics skipped: they need a micro-world scene (every class one of "
                     "the micro world's)")
    metric_names = ["clip_t", "clip_i", "clip_i_subject", "identity_region"]
    if reward is not None:
        metric_names.append("image_reward")
    if dino is not None:
        metric_names += ["dino_i", "dino_i_subject"]
    dc_embeddings = ["clip", "dino"] if dino is not None else ["clip"]
    dc_on = len(placeholders) >= 2
    if not dc_on:
        notes.append("Detect-and-Compare skipped: it needs two or more subjects")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    t0 = time.time()
    try:
        records: list[dict[str, Any]] = []
        total = sum(len(v) for v in sets.values()) * n
        bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
        fallbacks = renders = 0
        for cat, prompts in sets.items():
            cat_dir = tmp / "images" / cat
            cat_dir.mkdir(parents=True, exist_ok=True)
            used_slugs: set[str] = set()
            for i, p in enumerate(prompts):
                text = p.placeholder_prompt()
                class_text = p.class_prompt(classes)
                name = slug(text)
                while name in used_slugs:
                    name += "-x"
                used_slugs.add(name)
                enc = encoded[(cat, i)]
                k = len(p.subjects)
                text_e = scorer.text_embeds([class_text])[0]
                images: list[Image.Image] = []
                scores: dict[str, list[float]] = {m: [] for m in metric_names}
                attention: list[dict[str, Any]] = []
                prompt_fallbacks = 0
                meaning = prompt_meaning(class_text) if refs is not None else None
                exact_images: list[dict[str, Any]] = []
                dc: dict[str, list[list[dict[str, Any]]]] = {e: [] for e in dc_embeddings}
                for j in range(n):
                    g = torch.Generator(device="cpu").manual_seed(seed + j)

                    latents = (mean_shifted_latents(pipe, sc, list(p.subjects), mean_shift,
                                                    seed + j) if mean_shift else None)

                    def call(g: torch.Generator = g, prompt: str = enc.text,
                             latents: torch.Tensor | None = latents) -> Any:
                        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                    generator=g, latents=latents)

                    if store is not None:
                        w = cfg_weights(enc, k, 1, guidance > 1).to(pipe.unet.device)
                        result, maps = run_capturing(store, w, call)
                        cond = maps[-1].float().cpu().numpy()  # (K, h, w)
                    else:
                        result, cond = call(), None
                    img = result.images[0].convert("RGB")
                    images.append(img)
                    img.save(cat_dir / f"{name}_{seed + j}.png")
                    if refs is not None and meaning is not None:
                        exact_images.append(score_image(img, p.subjects, refs, meaning))
                    regions = ([None] * k if cond is None
                               else attention_regions(cond, img.width, threshold)
                               if img.width == img.height
                               else [attention_region(c, (img.height, img.width),
                                                      0.5 if threshold == "otsu" else threshold)
                                     for c in cond])
                    crops = [img if r is None else blank_crop(img, r) for r in regions]
                    prompt_fallbacks += sum(r is None for r in regions)
                    renders += k
                    e = scorer.image_embeds([img, *crops])
                    scores["clip_t"].append(_dot(e[0], text_e))
                    scores["clip_i"].append(_dot(e[0], ref_e[0]))
                    scores["clip_i_subject"].append(
                        float(np.mean([_dot(e[0], ref_e[1 + s]) for s in p.subjects])))
                    scores["identity_region"].append(
                        float(np.mean([_dot(e[1 + slot], ref_e[1 + s])
                                       for slot, s in enumerate(p.subjects)])))
                    if dc_on:
                        used = [r is not None for r in regions]
                        found = {"clip": (e[1:], ref_e[1:])}
                        if dino is not None and dino_ref is not None:
                            found["dino"] = (dino.image_embeds(crops), dino_ref[1:])
                        for emb, (crop_e, refs_e) in found.items():
                            dc[emb].append([dict(x, region=u) for x, u in zip(
                                detect_compare(crop_e, refs_e, p.subjects), used, strict=True)])
                    if dino is not None and dino_ref is not None:
                        d = dino.image_embeds([img])[0]
                        scores["dino_i"].append(_dot(d, dino_ref[0]))
                        scores["dino_i_subject"].append(
                            float(np.mean([_dot(d, dino_ref[1 + s]) for s in p.subjects])))
                    if j == 0 and cond is not None:
                        att_dir = tmp / "attention" / cat
                        att_dir.mkdir(parents=True, exist_ok=True)
                        for slot, s in enumerate(p.subjects):
                            f = att_dir / f"{name}_{seed + j}_asset{s}.png"
                            heat_overlay(img, cond[slot]).save(f)
                            attention.append({"subject": s, "placeholder": placeholder(s),
                                              "class": classes[s],
                                              "image": f.relative_to(tmp).as_posix()})
                    bar.update(1)
                if reward is not None:
                    scores["image_reward"] = reward.score(class_text, images)
                make_grid(images).save(cat_dir / f"{name}_grid.png")
                fallbacks += prompt_fallbacks
                records.append({
                    "category": cat,
                    "template": p.template,
                    "subjects": list(p.subjects),
                    "prompt": text,
                    "class_prompt": class_text,
                    "seeds": [seed + j for j in range(n)],
                    "images": [f"images/{cat}/{name}_{seed + j}.png" for j in range(n)],
                    "grid": f"images/{cat}/{name}_grid.png",
                    "attention": attention,
                    "region_fallbacks": prompt_fallbacks,
                    "scores": {m: [round(v, 6) for v in vals] for m, vals in scores.items()},
                    "summary": {m: mean_std(vals) for m, vals in scores.items()},
                    **({"exact": {"images": exact_images, "summary": prompt_rates(exact_images)}}
                       if refs is not None else {}),
                    **({"detect_compare": dc} if dc_on else {}),
                })
        bar.close()
        seconds = round(time.time() - t0, 1)
        exact = exact_ceiling = None
        if refs is not None:
            exact = exact_block(records, refs)
            if ceiling:
                del pipe, store
                exact_ceiling = _text_ceiling(
                    info["base_model"], records, refs, tmp, out, n=n, seed=seed, steps=steps,
                    guidance=guidance, device=device, cache_dir=ceiling_cache, progress=progress)
            else:
                notes.append("text ceiling skipped (--no-ceiling)")
        if fallbacks:
            notes.append(f"identity_region used the whole image for {fallbacks} of {renders} "
                         "subject renders (empty attention map)")
        result_dict: dict[str, Any] = {
            "version": 1,
            "run": str(run),
            "base_model": info.get("base_model"),
            "mode": info.get("mode"),
            "placeholders": placeholders,
            "classes": classes,
            "settings": {
                "prompt_set": prompt_set,
                "categories": list(sets),
                "limit": limit,
                "n": n,
                "seed": seed,
                "steps": steps,
                "guidance": guidance,
                "mean_shift": mean_shift,
                "clip_model": str(clip_model),
                "dino_model": None if dino_model is None else str(dino_model),
                "threshold": threshold,
                "resolution": resolution,
                "scene": str(scene_dir),
            },
            "metrics": {m: METRICS[m] for m in metric_names},
            "notes": notes,
            "prompts": records,
            "categories": {
                cat: {m: mean_std(v for r in records if r["category"] == cat
                                  for v in r["scores"][m]) for m in metric_names}
                for cat in sets
            },
            "overall": {m: mean_std(v for r in records for v in r["scores"][m])
                        for m in metric_names},
            **({"detect_compare": detect_compare_block(records, dc_embeddings)} if dc_on else {}),
            **({"exact": exact} if exact is not None else {}),
            **({"exact_ceiling": exact_ceiling} if exact_ceiling is not None else {}),
            "seconds": seconds,
        }
        atomic_write_text(tmp / METRICS_FILE, json.dumps(result_dict, indent=2) + "\n")
        write_report(tmp, result_dict, ref, masks, run,
                     _find_augmented(run, cfg.augmented), max_sheets=max_sheets)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result_dict, "out": str(out)}
