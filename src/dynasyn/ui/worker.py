"""One UI job in its own process: ``python -m dynasyn.ui.worker SPEC.json``.

The job manager (:mod:`.jobs`) starts one such process per job, so the server never runs a
training step itself: Cancel kills the process (the run keeps its last checkpoint and resumes
from it), a crash or a bad input ends only the job, and the page stays responsive. The spec
names the kind (``augment``, ``reroll``, ``train``, ``evaluate``), the run directory, the
parameters and the result file; the result is ``{"ok": true}`` or ``{"ok": false, "error":
"<one line>"}`` (the traceback goes to the job's log).

Training samples: every ``checkpoint_every`` steps the trainer writes a checkpoint; here the
module-level ``dynasyn.train.save_checkpoint`` is wrapped (in this process only) so that after
each checkpoint one image of ``sample_prompt`` is rendered with the weights being trained into
``RUN/ui/samples/stepNNNNN.png`` — the live sample the page shows.
"""

from __future__ import annotations

import json
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dynasyn.errors import InputError, TrainingError
from dynasyn.ui.paths import UI_DIR

SAMPLES = "samples"
"""Training samples, in ``RUN/ui/samples``."""


def sample_path(run: str | Path, gstep: int) -> Path:
    """Where the sample rendered after global step ``gstep`` goes."""
    return Path(run) / UI_DIR / SAMPLES / f"step{gstep:05d}.png"


def render_sample(trainer: Any, prompt: str, gstep: int, steps: int = 25) -> Path:
    """One image of ``prompt`` with the trainer's current weights (seed = the run's seed)."""
    import torch

    from dynasyn.generate import save_png

    pipe = trainer.pipeline()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device="cpu").manual_seed(trainer.cfg.seed)
    was_training = trainer.unet.training
    trainer.unet.eval()
    try:
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=g).images[0]
    finally:
        trainer.unet.train(was_training)
    path = sample_path(trainer.out, gstep)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path)
    return path


@contextmanager
def samples_at_checkpoints(prompt: str | None, steps: int = 25):
    """Render a sample after every checkpoint the trainer writes (see the module docstring)."""
    import dynasyn.train as train_mod

    original = train_mod.save_checkpoint
    if not prompt:
        yield
        return

    def checkpoint_and_sample(trainer, step_in_phase: int, gstep: int) -> None:
        original(trainer, step_in_phase, gstep)
        if trainer.acc.is_main_process:
            render_sample(trainer, prompt, gstep, steps)

    train_mod.save_checkpoint = checkpoint_and_sample
    try:
        yield
    finally:
        train_mod.save_checkpoint = original


def run_train(run: Path, p: dict[str, Any]) -> None:
    from dynasyn.config import build_config, load_config
    from dynasyn.train import train

    if p.get("resume"):
        cfg = load_config(run / "config.yaml")
    else:
        cfg = build_config(p.get("preset") or "dynasyn", None, p.get("overrides") or {})
    with samples_at_checkpoints(p.get("sample_prompt"), int(p.get("sample_steps", 25))):
        train(cfg, run, resume=bool(p.get("resume")), progress=False, allow_existing=True)


def run_augment(run: Path, p: dict[str, Any]) -> None:
    from dynasyn.augment.pipeline import AugmentConfig, augment

    augment(p["scene"], p["out"], AugmentConfig(**p["config"]).validate(), progress=False)


def run_reroll(run: Path, p: dict[str, Any]) -> None:
    """Render augmented item ``index`` again with a new seed, in place (same cache entry), and
    rewrite the augmented directory's index."""
    import torch

    from dynasyn.augment.data import INDEX
    from dynasyn.augment.describe import describe_subjects
    from dynasyn.augment.pipeline import (
        AugmentConfig,
        _model_resolution,
        _Models,
        _scene_arrays,
        _write_cache,
        merge_index,
        render_item,
    )
    from dynasyn.augment.prompts import PromptItem
    from dynasyn.models import resolve_model
    from dynasyn.scene import load_scene

    out = Path(p["out"])
    cfg = AugmentConfig(**p["config"]).validate()
    records = [json.loads(x) for x in (out / INDEX).read_text().splitlines() if x.strip()]
    index = int(p["index"])
    if not 0 <= index < len(records):
        raise InputError(f"no augmented item {index}; pick one of 0..{len(records) - 1}")
    rec = records[index]
    scene = load_scene(p["scene"])
    phrases = describe_subjects(scene, provider="scene")
    item = PromptItem(rec["template"], list(rec["subjects"]), rec["kind"])
    scene_img, scene_masks = _scene_arrays(scene, cfg.resolution
                                           or _model_resolution(resolve_model(cfg.model)))
    seed = (int(rec["seed"]) + 7919) % 2**31
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = render_item(_Models(cfg, device), cfg, item, phrases, scene.classes, scene_img,
                         scene_masks, seed)
    _write_cache(out / "cache" / rec["key"], result,
                 dict(item.record(scene.classes, phrases), seed=seed, key=rec["key"]))
    merge_index(out, [r["key"] for r in records])


def run_evaluate(run: Path, p: dict[str, Any]) -> None:
    from dynasyn.evaluate import evaluate

    evaluate(run, progress=False, **p)


KINDS = {"train": run_train, "augment": run_augment, "reroll": run_reroll,
         "evaluate": run_evaluate}


def one_line(e: BaseException) -> str:
    """An exception as the one line the page shows."""
    text = str(e).replace("\n", " ").strip()
    if isinstance(e, InputError | TrainingError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def exit_with_parent(interval: float = 1.0) -> None:
    """End this process when the server that started it is gone (killed, even with SIGKILL),
    so that no orphan job goes on writing into a run that a new server may resume."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(3)  # writes are atomic: the run keeps its last checkpoint

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    exit_with_parent()
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    result = Path(spec["result"])
    try:
        from dynasyn.models import quiet_libraries

        quiet_libraries()
        KINDS[spec["kind"]](Path(spec["run"]), spec["params"])
        status: dict[str, Any] = {"ok": True}
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the page
        traceback.print_exc()
        status = {"ok": False, "error": one_line(e) or "interrupted"}
    tmp = result.with_name(result.name + ".tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(result)
    return 0 if status["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
