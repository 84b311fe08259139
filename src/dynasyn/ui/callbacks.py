"""What every control of ``dynasyn ui`` does, as plain functions of plain values.

:class:`Studio` holds the runs directory, the job manager and the model; :mod:`.app` binds its
methods to Gradio events. Each method returns what the page shows (a message, image paths, a
table) and reports bad input as a message rather than raising, so the page always answers:
messages start with ``✓`` (done), ``◷`` (queued / running) or ``⚠`` (refused or failed, with
the one-line reason the command line would print).

The project modules are imported here, once, rather than inside the callbacks: Gradio runs
callbacks in several threads at once, and two threads importing the same module for the first
time can see it half-initialized.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dynasyn.augment.data import INDEX
from dynasyn.augment.pipeline import AugmentConfig
from dynasyn.classmasks import overlay
from dynasyn.classmasks.cli import make_scene
from dynasyn.config import build_config, load_config
from dynasyn.errors import InputError, TrainingError
from dynasyn.evaluate.prompts import prompt_sets
from dynasyn.evaluate.report import METRIC_LABELS, read_losses
from dynasyn.evaluate.run import METRICS_FILE
from dynasyn.generate import check_placeholders, generate_images, load_run, save_png
from dynasyn.micro.examples import EXAMPLES, render_example
from dynasyn.models import resolve_model
from dynasyn.rundir import CONFIG, LOSS_LOG, RUN_INFO, read_run, resume_point
from dynasyn.scene import load_scene
from dynasyn.ui.jobs import Job, JobManager
from dynasyn.ui.paths import AUGMENTED, MASKS, UI_DIR, RunsDir
from dynasyn.ui.uploads import (
    check_image,
    layer_masks,
    parse_classes,
    parse_phrases,
    scene_from_arrays,
    scene_from_uploads,
)
from dynasyn.ui.worker import SAMPLES, one_line

log = logging.getLogger("dynasyn")

OK, BUSY, BAD = "✓", "◷", "⚠"
MAX_SUBJECTS = 4
"""Insert buttons on the Generate tab (``<asset0>`` … ``<asset3>``)."""
MAX_IMAGES = 16
"""Most images one Generate click renders (prompt × n)."""


def refusal(e: BaseException) -> str:
    """The page's one-line message for a refused input or a failure."""
    return f"{BAD} {one_line(e)}"


class Studio:
    """The state behind one ``dynasyn ui`` server."""

    def __init__(self, runs_dir: str | Path, model: str = "micro", device: str = "auto",
                 jobs: JobManager | None = None):

        resolve_model(model)  # a missing model stops `dynasyn ui` before the server starts
        self.runs = RunsDir(runs_dir)
        self.runs_label = str(runs_dir)  # as given (the page shows it)
        self.runs.root.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.device = device
        self.jobs = jobs or JobManager()
        self.tmp = Path(tempfile.mkdtemp(prefix="dynasyn-ui-"))
        self._pipes: dict[tuple[str, float], Any] = {}

    def close(self) -> None:
        self.jobs.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ runs
    def run_names(self) -> list[str]:
        return self.runs.names()

    def _scene_dir(self, run: str) -> Path:
        return self.runs.path(run) / MASKS

    def _refuse_if_trained(self, path: Path) -> None:

        if (path / CONFIG).is_file():
            raise InputError(f"run {path.name} is already trained or training; type a new run "
                             "name for a new scene")
        if self.jobs.active(path) is not None:
            raise InputError(f"run {path.name} has a job in progress; wait for it or cancel it")

    # ------------------------------------------------------------------ 1. scene
    def example(self, name: str) -> tuple[str, list[str], str, str, str]:
        """Render micro-world example ``name``: (photo, masks, classes, phrases, run name)."""

        if name not in EXAMPLES:
            raise InputError(f"unknown example {name!r}; pick one of {', '.join(EXAMPLES)}")
        dest = self.tmp / "examples"
        if not (dest / name).is_dir():
            render_example(name, dest)
        scene = load_scene(dest / name)
        masks = [str(s.mask_path) for s in scene.subjects]
        run = f"{name}-{time.strftime('%m%d-%H%M%S')}"
        phrases = ", ".join(s.phrase or s.class_noun for s in scene.subjects)
        return str(scene.image_path), masks, " ".join(scene.classes), phrases, run

    def _scene_answer(self, scene, run: str, how: str) -> tuple[str, str]:

        path = self.runs.path(run)
        masks = [m >= 0.5 for m in scene.masks]
        preview = path / UI_DIR / "overlay.png"
        preview.parent.mkdir(parents=True, exist_ok=True)
        save_png(enlarged(overlay(scene.image, masks)), preview)
        shutil.rmtree(path / AUGMENTED, ignore_errors=True)  # made for another scene
        subjects = ", ".join(f"{s.placeholder} = {s.class_noun}" for s in scene.subjects)
        return (f"{OK} scene saved ({how}): {len(scene)} subjects, {subjects}; "
                f"{scene.image.width}x{scene.image.height}, in {run}/{MASKS}. Next: Augment or "
                "Train.", str(preview))

    def save_uploaded(self, run: str, photo: str | None, masks: list[str] | None,
                      classes: str, phrases: str = "") -> tuple[str, str | None]:
        """Scene from the uploaded photo and mask files: (message, overlay preview)."""
        try:
            path = self.runs.path(run)
            self._refuse_if_trained(path)
            scene = scene_from_uploads(photo, masks or [], parse_classes(classes), path / MASKS,
                                       phrases=parse_phrases(phrases))
            return self._scene_answer(scene, run, "uploaded masks")
        except Exception as e:  # noqa: BLE001
            return self._fail(e), None

    def save_brushed(self, run: str, photo: str | None, editor: dict | None,
                     classes: str) -> tuple[str, str | None]:
        """Scene from the brush layers painted over the photo: (message, overlay preview)."""
        try:
            path = self.runs.path(run)
            self._refuse_if_trained(path)
            if not photo:
                raise InputError("no photo: upload one first (PNG, JPEG or WebP)")
            scene = scene_from_arrays(photo, layer_masks(editor), parse_classes(classes),
                                      path / MASKS)
            return self._scene_answer(scene, run, "brush layers")
        except Exception as e:  # noqa: BLE001
            return self._fail(e), None

    def masks_from_classes(self, run: str, photo: str | None,
                           classes: str) -> tuple[str, str | None]:
        """Masks from the class names (:func:`dynasyn.classmasks.cli.make_scene`, the UI's
        model): (message, overlay preview)."""
        try:

            path = self.runs.path(run)
            self._refuse_if_trained(path)
            if not photo:
                raise InputError("no photo: upload one first (PNG, JPEG or WebP)")
            check_image(photo, "photo")
            make_scene(photo, parse_classes(classes), path / MASKS, self.model,
                       device=self.device, overwrite=True)
            return self._scene_answer(load_scene(path / MASKS), run, "from the class names")
        except Exception as e:  # noqa: BLE001
            return self._fail(e), None

    @staticmethod
    def _fail(e: BaseException) -> str:
        if not isinstance(e, InputError | TrainingError):
            log.exception("ui: unexpected error")
        return refusal(e)

    # ------------------------------------------------------------------ 2. augment
    def _augment_config(self, num_prompts: int, provider: str, seed: int) -> dict[str, Any]:

        cfg = AugmentConfig(model=self.model, num_prompts=int(num_prompts), provider=provider,
                            seed=int(seed), draft_steps=20, gsa_steps=30, guidance=5.0)
        return cfg.validate().__dict__.copy()

    def augment(self, run: str, num_prompts: int = 8, provider: str = "template",
                seed: int = 0) -> str:
        """Queue Steps 1-4 for the run's scene into ``RUN/augmented``."""
        try:

            path = self.runs.path(run)
            self._refuse_if_trained(path)
            load_scene(path / MASKS)  # the scene must be saved first
            cfg = self._augment_config(num_prompts, provider, seed)
            job = self.jobs.submit("augment", path, {"scene": str(path / MASKS),
                                                     "out": str(path / AUGMENTED), "config": cfg})
            return self._queued(job)
        except Exception as e:  # noqa: BLE001
            return self._fail(self._no_scene(e, run))

    def reroll(self, run: str, index: int, num_prompts: int = 8, provider: str = "template",
               seed: int = 0) -> str:
        """Queue a new rendering of augmented item ``index`` (new seed, same prompt)."""
        try:

            path = self.runs.path(run)
            self._refuse_if_trained(path)
            if not (path / AUGMENTED / INDEX).is_file():
                raise InputError(f"run {run} has no augmented items yet; press Augment first")
            cfg = self._augment_config(num_prompts, provider, seed)
            job = self.jobs.submit("reroll", path, {"scene": str(path / MASKS),
                                                    "out": str(path / AUGMENTED), "config": cfg,
                                                    "index": int(index)})
            return self._queued(job)
        except Exception as e:  # noqa: BLE001
            return self._fail(e)

    def augment_status(self, run: str) -> tuple[str, list[tuple[str, str]]]:
        """(message, contact sheets with their prompts) of the run's augmentation."""

        try:
            path = self.runs.path(run)
        except InputError as e:
            return refusal(e), []
        aug = path / AUGMENTED
        sheets = []
        if (aug / INDEX).is_file():
            for line in (aug / INDEX).read_text().splitlines():
                rec = json.loads(line)
                sheets.append((str(aug / rec["sheet"]), f"{rec['id']}: {rec['placeholder_prompt']}"))
        job = self.jobs.latest(path, ("augment", "reroll"))
        if job is not None and job.state in ("queued", "running", "failed", "cancelled"):
            done = len(list((aug / "cache").glob("*/record.json"))) if aug.is_dir() else 0
            return self._job_line(job, f"{done} items rendered"), sheets
        if sheets:
            return (f"{OK} {len(sheets)} augmented items (draft → composed → final); training "
                    "uses them for L_AUG", sheets)
        return "no augmented items yet: press Augment (optional; without it L_AUG is off)", sheets

    # ------------------------------------------------------------------ 3. train
    def train(self, run: str, preset: str = "dynasyn", phase1: int = 100, phase2: int = 100,
              lora_rank: int = 0, sample_every: int = 25, seed: int = 0) -> str:
        """Queue training of the run's scene (its augmented items, when there are some)."""
        try:

            path = self.runs.path(run)
            if (path / RUN_INFO).is_file():
                raise InputError(f"run {run} is already trained; open it in Generate, or type a "
                                 "new run name and save the scene again to train another")
            if (path / CONFIG).is_file() and self.jobs.active(path) is None:
                raise InputError(f"run {run} has an unfinished training; press Resume to "
                                 "continue it from its last checkpoint")
            scene = load_scene(path / MASKS)
            augmented = path / AUGMENTED if (path / AUGMENTED / INDEX).is_file() else None
            overrides = dict(scene=str(path / MASKS), model=self.model, phase1_steps=int(phase1),
                             phase2_steps=int(phase2), lora_rank=int(lora_rank),
                             checkpoint_every=int(sample_every), seed=int(seed), log_every=1,
                             augmented=str(augmented) if augmented else None,
                             device=self.device)
            build_config(preset, None, overrides)  # refuse bad values here, inline
            job = self.jobs.submit("train", path, {
                "preset": preset, "overrides": overrides, "resume": False,
                "sample_prompt": sample_prompt(scene.placeholders)})
            note = "" if augmented else " (no augmented items: L_AUG off)"
            return self._queued(job) + note
        except Exception as e:  # noqa: BLE001
            return self._fail(self._no_scene(e, run))

    def resume(self, run: str) -> str:
        """Queue the continuation of a cancelled / killed training from its last checkpoint."""
        try:

            path = self.runs.path(run)
            if (path / RUN_INFO).is_file():
                raise InputError(f"run {run} is finished; nothing to resume")
            if not (path / CONFIG).is_file():
                raise InputError(f"run {run} has no training to resume; press Train")
            cfg = load_config(path / CONFIG)
            n = len(cfg.classes) or len(list((path / "scene").glob("mask*")))
            job = self.jobs.submit("train", path, {
                "resume": True, "sample_prompt": sample_prompt([f"<asset{i}>" for i in range(n)]),
            })
            return self._queued(job)
        except Exception as e:  # noqa: BLE001
            return self._fail(e)

    def cancel(self, run: str) -> str:
        """Cancel the run's queued or running job."""
        try:
            path = self.runs.path(run)
            job = self.jobs.active(path)
            if job is None:
                return f"{BAD} run {run} has no job to cancel"
            self.jobs.cancel(job)
            self.jobs.wait(job, timeout=15)

            extra = ""
            if job.kind == "train" and (path / "config.yaml").is_file():
                phase, step, ck = resume_point(path)
                extra = (f"; its last checkpoint is phase {phase} step {step}: Resume continues "
                         "from there" if ck is not None else "; no checkpoint yet: Resume "
                         "starts it again")
            return f"{OK} {job.kind} job #{job.id} cancelled{extra}"
        except Exception as e:  # noqa: BLE001
            return self._fail(e)

    def train_status(self, run: str) -> tuple[str, Any, str | None]:
        """(message, loss table for the plot, newest sample image) of the run's training."""

        try:
            path = self.runs.path(run)
        except InputError as e:
            return refusal(e), loss_rows([]), None

        records = read_losses(path / LOSS_LOG)
        samples = sorted((path / UI_DIR / SAMPLES).glob("step*.png"))
        sample = str(preview_of(samples[-1], path / UI_DIR / "preview")) if samples else None
        total = _total_steps(path)
        last = records[-1] if records else None
        where = (f"step {last['step']} / {total} (phase {last['phase']}), loss "
                 f"{last['loss']:.4f}" if last else "")
        job = self.jobs.latest(path, ("train",))
        if job is not None and job.state in ("queued", "running", "failed", "cancelled"):
            msg = self._job_line(job, where)
        elif (path / RUN_INFO).is_file():
            msg = f"{OK} trained: {where}; the run is in {run}/ — open it in Generate"
        elif (path / CONFIG).is_file():
            msg = (f"{BAD} unfinished training ({where or 'no step logged'}): press Resume to "
                   "continue from its last checkpoint")
        else:
            msg = "not trained yet: set the steps and press Train"
        return msg, loss_rows(records), sample

    # ------------------------------------------------------------------ jobs shown
    def _queued(self, job: Job) -> str:
        pos = self.jobs.position(job)
        wait = f", position {pos} in the queue" if pos > 1 else ""
        return f"{BUSY} {job.kind} job #{job.id} queued{wait}"

    def _job_line(self, job: Job, progress: str) -> str:
        if job.state == "queued":
            pos = self.jobs.position(job)
            return f"{BUSY} {job.kind} job #{job.id} queued (position {pos}; one job runs at a time)"
        if job.state == "running":
            secs = time.time() - (job.started or time.time())
            return f"{BUSY} {job.kind} running {secs:.0f} s" + (f": {progress}" if progress else "")
        if job.state == "cancelled":
            return f"{BAD} {job.kind} job #{job.id} cancelled" + (f" at {progress}" if progress
                                                                    else "")
        return f"{BAD} {job.kind} failed: {job.error}"

    @staticmethod
    def _no_scene(e: BaseException, run: str) -> BaseException:
        if isinstance(e, InputError) and f"{MASKS}: directory does not exist" in str(e):
            return InputError(f"run {run} has no scene yet: save one on the Scene tab first")
        return e

    # ------------------------------------------------------------------ 4. generate
    def run_choices(self) -> list[str]:
        """Finished runs (for Generate / Evaluate)."""
        return self.runs.trained()

    def run_placeholders(self, run: str) -> tuple[list[str], list[str]]:
        """(placeholders, class nouns) of a finished run."""

        info = read_run(self.runs.path(run))
        return list(info["placeholders"]), list(info.get("classes") or [])

    def templates(self, run: str, category: str) -> list[str]:
        """Prompts of one category (plain / action / interaction) for the run's subjects."""

        try:
            places, classes = self.run_placeholders(run)
            sets = prompt_sets(len(places), [category], classes=classes or None, limit=None)
        except InputError:
            return []
        return [p.placeholder_prompt() for p in sets[category]]

    def _pipe(self, path: Path):

        key = (str(path), (path / RUN_INFO).stat().st_mtime)
        if key not in self._pipes:
            self._pipes.clear()  # one run's models in memory at a time
            self._pipes[key] = load_run(path, device=self.device)
        return self._pipes[key]

    def generate(self, run: str, prompts: str, n: int = 4, seed: int = 0, steps: int = 25,
                 guidance: float = 5.0) -> tuple[list[str], str]:
        """Render the prompts (one per line): (image paths for the gallery, message)."""
        try:

            path = self.runs.path(run)
            info = read_run(path)
            lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
            if not lines:
                raise InputError("no prompt: type one, e.g. <asset0> is next to <asset1>")
            for p in lines:
                check_placeholders(p, info["placeholders"])
            n, steps = int(n), int(steps)
            if n < 1 or steps < 1:
                raise InputError("images and steps must be >= 1")
            if n * len(lines) > MAX_IMAGES:
                raise InputError(f"{n * len(lines)} images asked; at most {MAX_IMAGES} per click")
            out = path / "generated"
            paths = generate_images(self._pipe(path), lines, out, n=n, seed=int(seed),
                                    steps=steps, guidance=float(guidance), progress=False)
            images = [str(p) for p in paths if not p.name.endswith("_grid.png")]
            return images, f"{OK} {len(images)} images in {run}/generated"
        except Exception as e:  # noqa: BLE001
            return [], self._fail(e)

    # ------------------------------------------------------------------ 5. evaluate
    def evaluate(self, run: str, n: int = 2, steps: int = 25, limit: int = 3) -> str:
        """Queue an evaluation (the bundled micro CLIP; metrics.json and report.html)."""
        try:

            path = self.runs.path(run)
            read_run(path)
            if int(n) < 1 or int(steps) < 1 or int(limit) < 1:
                raise InputError("images, steps and prompts per category must be >= 1")
            job = self.jobs.submit("evaluate", path, {"n": int(n), "steps": int(steps),
                                                      "limit": int(limit),
                                                      "device": self.device})
            return self._queued(job)
        except Exception as e:  # noqa: BLE001
            return self._fail(e)

    def evaluate_status(self, run: str) -> tuple[str, Any, str | None]:
        """(message, metrics table, report.html path) of the run's evaluation."""

        try:
            path = self.runs.path(run)
        except InputError as e:
            return refusal(e), metrics_rows({}), None
        metrics = path / "eval" / METRICS_FILE
        job = self.jobs.latest(path, ("evaluate",))
        result = json.loads(metrics.read_text()) if metrics.is_file() else {}
        report = path / "eval" / "report.html"
        report_path = str(report) if report.is_file() else None
        if job is not None and job.state in ("queued", "running", "failed", "cancelled"):
            return self._job_line(job, ""), metrics_rows(result), report_path
        if result:
            return f"{OK} evaluated: {run}/eval/metrics.json", metrics_rows(result), report_path
        return "not evaluated yet: press Evaluate", metrics_rows({}), None


PREVIEW_SIDE = 256
"""Small images (the micro model's 64 px) are shown enlarged to at least this side."""


def enlarged(image: Image.Image, side: int = PREVIEW_SIDE) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest neighbour) to at least ``side`` pixels on
    its short side; larger images are returned as they are."""
    k = -(-side // min(image.size))
    return image if k <= 1 else image.resize((image.width * k, image.height * k),
                                             Image.Resampling.NEAREST)


def preview_of(path: Path, folder: Path) -> Path:
    """An enlarged copy of the image ``path`` in ``folder`` (made once), or ``path`` itself."""
    with Image.open(path) as im:
        if min(im.size) >= PREVIEW_SIDE:
            return path
        out = folder / path.name
        if not out.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            save_png(enlarged(im.convert("RGB")), out)
    return out


def sample_prompt(placeholders: list[str]) -> str:
    """The prompt of the live training samples: every subject together."""
    return " and ".join(placeholders) if len(placeholders) > 1 else f"a photo of {placeholders[0]}"


def _total_steps(path: Path) -> int | str:
    try:
        cfg = yaml.safe_load((path / CONFIG).read_text())
        return int(cfg["phase1_steps"]) + int(cfg["phase2_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


LOSS_TERMS = ("loss", "md", "m2a", "ica", "aug")


def loss_rows(records: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    """The loss log as long rows (step, term, value) for a line plot."""
    return [(int(r["step"]), t, float(r[t])) for r in records for t in LOSS_TERMS
            if isinstance(r.get(t), int | float) and np.isfinite(r[t])]


def metrics_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """metrics.json as a table (headers, rows): one row per category and overall, mean ± std
    per metric."""
    names = [m for m in METRIC_LABELS if m in result.get("metrics", {})]
    rows = []
    cats = [*result.get("categories", {}).items()]
    if result:
        cats.append(("overall", result.get("overall", {})))
    for cat, stats in cats:
        n = max((s.get("n", 0) for s in stats.values() if isinstance(s, dict)), default=0)
        cells = [f"{s['mean']:.3f} ± {s['std']:.3f}" if s and s.get("mean") is not None else "–"
                 for s in (stats.get(m) for m in names)]
        rows.append([cat, n, *cells])
    return ["category", "images", *(METRIC_LABELS[m] for m in names)], rows
