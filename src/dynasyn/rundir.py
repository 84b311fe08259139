"""The run directory: what ``dynasyn train`` writes, and how every command reads it back.

Layout::

    RUN/
      config.yaml                        the training config (paths: see below)
      scene/                             a copy of the scene: photo, masks and a scene.json
                                         naming the class nouns the run used (also --classes)
      logs/losses.jsonl                  one JSON line per logged step
      checkpoints/step-NNNNNN/           resumable checkpoints (--checkpoint-every)
      learned_embeds.safetensors         the placeholder embeddings (every mode)
      learned_embeds_2.safetensors       SDXL: their rows in the second text encoder
      unet/, text_encoder/               full phase 2: the fine-tuned modules (diffusers format;
        text_encoder_2/                  SDXL: also the second text encoder)
      pytorch_lora_weights.safetensors   LoRA phase 2: the adapters
      samples/                           renders of ``sample_prompts`` (when set)
      run.json                           written last: its presence marks a finished run

A run is self-contained: every path it records resolves relative to ``RUN`` (``config.yaml``
records ``scene: scene``; an augmented directory inside ``RUN`` is recorded relative to it, one
outside as an absolute path, and so is a local base-model directory), so ``dynasyn generate`` /
``evaluate`` / ``train --resume`` work from any working directory and after the original scene
folder has moved. Runs written before scene copies existed recorded the scene relative to the
working directory of their training; :func:`run_path` still finds those.

Every file is written atomically (a temporary name, then a rename), so a killed run never
leaves a half-written weight file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynasyn.atomic import atomic_dir, save_tensors
from dynasyn.checkpoint import list_checkpoints, load_optimizer, read_checkpoint, write_checkpoint
from dynasyn.config import TrainConfig, atomic_write_text
from dynasyn.errors import InputError
from dynasyn.scene import SCENE_JSON, Scene

if TYPE_CHECKING:
    from dynasyn.train import Trainer

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "EMBEDS",
    "EMBEDS_2",
    "LORA_FILE",
    "LOSS_LOG",
    "RUN_INFO",
    "SCENE_DIR",
    "append_log",
    "copy_scene",
    "find_run_scene",
    "last_checkpoint_note",
    "prepare_run_dir",
    "read_run",
    "record_path",
    "recorded_config",
    "resolved_config",
    "restore_checkpoint",
    "resume_point",
    "run_path",
    "save_checkpoint",
    "save_outputs",
    "start_run",
    "trim_log",
]

RUN_INFO = "run.json"
EMBEDS = "learned_embeds.safetensors"
EMBEDS_2 = "learned_embeds_2.safetensors"
"""SDXL runs: the placeholders' rows in the second text encoder (same keys as EMBEDS)."""
LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG = "config.yaml"
SCENE_DIR = "scene"
LOSS_LOG = "logs/losses.jsonl"
CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------------------ paths


def run_path(run: str | Path, recorded: str | Path) -> Path:
    """Where a path recorded by a run is: an absolute path as is, a relative one inside
    ``run``; a relative path that exists only from the working directory (a run written before
    runs were self-contained) is returned as it was recorded."""
    p = Path(recorded).expanduser()
    if p.is_absolute():
        return p
    inside = Path(run) / p
    if not inside.exists() and p.exists():
        return p
    return inside


def record_path(run: str | Path, path: str | Path) -> str:
    """How a run records ``path``: relative to ``run`` when inside it, else absolute."""
    p = Path(path).expanduser().resolve()
    try:
        return p.relative_to(Path(run).expanduser().resolve()).as_posix()
    except ValueError:
        return str(p)


def _recorded_model(model: str) -> str:
    """``micro`` and hub ids stay; a local pipeline directory becomes absolute."""
    from dynasyn.models import MICRO_NAMES

    p = Path(model).expanduser()
    if model in MICRO_NAMES or not p.is_dir():
        return model
    return str(p.resolve())


def recorded_config(cfg: TrainConfig, run: str | Path) -> TrainConfig:
    """The config as ``RUN/config.yaml`` records it: the scene is ``RUN/scene`` (the copy),
    other paths as :func:`record_path` writes them."""
    return dataclasses.replace(
        cfg,
        scene=SCENE_DIR,
        augmented=record_path(run, cfg.augmented) if cfg.augmented else None,
        model=_recorded_model(cfg.model),
    )


def find_run_scene(run: str | Path, recorded: str, fix: str) -> Path:
    """The scene directory a run recorded, or an :class:`InputError` ending with ``fix``."""
    if recorded:
        p = run_path(run, recorded)
        if p.is_dir():
            return p
    raise InputError(
        f"the run's scene {recorded!r} (from {Path(run) / CONFIG}) is not found in the run "
        f"nor from the working directory; {fix}"
    )


def resolved_config(cfg: TrainConfig, run: str | Path) -> TrainConfig:
    """A recorded config (``RUN/config.yaml``) with usable paths, for resuming the run."""
    scene = find_run_scene(run, cfg.scene, "restore it, or start a new run from the scene")
    augmented = str(run_path(run, cfg.augmented)) if cfg.augmented else None
    return dataclasses.replace(cfg, scene=str(scene), augmented=augmented)


# ------------------------------------------------------------------------------ a new run


def prepare_run_dir(out: Path, overwrite: bool, resume: bool, allow_existing: bool = False) -> None:
    """Refuse to clobber an existing run unless --overwrite / --resume says so."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume or allow_existing):
        raise InputError(
            f"output directory {out} already exists; pass --overwrite to replace it "
            "or --resume to continue it"
        )
    if resume and not (out / CONFIG).is_file():
        raise InputError(f"cannot resume: {out} has no {CONFIG}; start a new run without --resume")


def copy_scene(scene: Scene, dest: str | Path) -> Path:
    """Copy the scene's photo and masks (bytes unchanged) into the new directory ``dest`` with
    a ``scene.json`` naming them, the class nouns the scene was loaded with (so also
    ``--classes``) and the phrases: ``load_scene(dest)`` alone gives the same scene."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    image = f"img{scene.image_path.suffix.lower()}"
    shutil.copyfile(scene.image_path, dest / image)
    subjects = []
    for s in scene.subjects:
        mask = f"mask{s.index}{s.mask_path.suffix.lower()}"
        shutil.copyfile(s.mask_path, dest / mask)
        subjects.append({"mask": mask, "class": s.class_noun,
                         **({"phrase": s.phrase} if s.phrase is not None else {})})
    meta = {"image": image, "subjects": subjects}
    (dest / SCENE_JSON).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return dest


def start_run(out: str | Path, cfg: TrainConfig, scene: Scene, overwrite: bool = False) -> None:
    """Create the run directory ``out`` (emptied first with ``overwrite``), copy the scene into
    ``RUN/scene`` and write ``RUN/config.yaml`` (:func:`recorded_config`).

    The scene is copied beside ``out`` first, so ``--overwrite`` of a run trained on its own
    ``RUN/scene`` works, and ``RUN/scene`` appears complete or not at all.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.parent / f".{out.name}.scene-{uuid.uuid4().hex[:8]}"
    try:
        copy_scene(scene, staged)
        recorded = recorded_config(cfg, out)
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if (out / SCENE_DIR).exists():  # a run directory an earlier attempt began
            shutil.rmtree(out / SCENE_DIR)
        staged.rename(out / SCENE_DIR)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    recorded.save(out / CONFIG)


# ------------------------------------------------------------------------------ loss log


def trim_log(run: str | Path, done: int) -> None:
    """Create ``RUN/logs/``; drop log lines past step ``done`` (a resumed run rewrites them)."""
    path = Path(run) / LOSS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= done]
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def append_log(run: str | Path, record: dict[str, Any]) -> None:
    """Append one record to ``RUN/logs/losses.jsonl``."""
    with open(Path(run) / LOSS_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------ checkpoints


def _trained_weights(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The weight groups the current phase trains (what a checkpoint must hold)."""
    w = {"placeholders": {"rows": trainer.embedding[trainer.orig_vocab :].detach()}}
    if trainer.xl:
        w["placeholders"]["rows_2"] = trainer.embeddings[1][trainer.orig_vocab :].detach()
    if trainer.phase == 2:
        names = _text_encoder_names(trainer)
        if trainer.lora:
            from peft.utils import get_peft_model_state_dict

            w["unet_lora"] = get_peft_model_state_dict(trainer.unet)
            if trainer.cfg.train_text_encoder:
                for name, te in names.items():
                    w[f"{name}_lora"] = get_peft_model_state_dict(te, save_embedding_layers=False)
        else:
            w["unet"] = trainer.unet.state_dict()
            if trainer.cfg.train_text_encoder:
                for name, te in names.items():
                    w[name] = te.state_dict()
    return w


def _text_encoder_names(trainer: Trainer) -> dict[str, Any]:
    """``{"text_encoder": …}``, with SDXL's ``"text_encoder_2"``: the folder / key names."""
    names = {"text_encoder": trainer.text_encoder}
    if trainer.xl:
        names["text_encoder_2"] = trainer.text_encoder_2
    return names


def _load_trained_weights(trainer: Trainer, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of :func:`_trained_weights`."""
    with torch.no_grad():
        for emb, key in zip(trainer.embeddings, ("rows", "rows_2"), strict=False):
            emb[trainer.orig_vocab :] = weights["placeholders"][key].to(trainer.device)
    if "unet" in weights:
        trainer.unet.load_state_dict(weights["unet"])
    names = _text_encoder_names(trainer)
    for name, te in names.items():
        if name in weights:
            te.load_state_dict(weights[name])
    if any(k.endswith("_lora") for k in weights):
        from peft.utils import set_peft_model_state_dict

        if "unet_lora" in weights:
            set_peft_model_state_dict(trainer.unet, weights["unet_lora"])
        for name, te in names.items():
            if f"{name}_lora" in weights:
                set_peft_model_state_dict(te, weights[f"{name}_lora"])


def save_checkpoint(trainer: Trainer, step_in_phase: int, gstep: int) -> None:
    """Write ``RUN/checkpoints/step-{gstep}`` (main process; every process waits for it)."""
    if trainer.acc.is_main_process:
        write_checkpoint(
            Path(trainer.out) / CHECKPOINTS, f"step-{gstep:06d}", _trained_weights(trainer),
            trainer.optimizer,
            {"phase": trainer.phase, "step": step_in_phase, "global_step": gstep},
            keep=trainer.cfg.keep_checkpoints,
        )
    trainer.acc.wait_for_everyone()


def resume_point(run: str | Path) -> tuple[int, int, Path | None]:
    """``(phase, step in phase, checkpoint)`` of the newest checkpoint, ``(1, 0, None)``
    without one."""
    cks = list_checkpoints(Path(run) / CHECKPOINTS)
    if not cks:
        return 1, 0, None
    state = json.loads((cks[-1] / "state.json").read_text())
    return state["phase"], state["step"], cks[-1]


def restore_checkpoint(trainer: Trainer, checkpoint: Path) -> None:
    """Load a checkpoint's weights and optimizer state into ``trainer`` (its phase set up)."""
    state, weights, opt_tensors = read_checkpoint(checkpoint)
    _load_trained_weights(trainer, weights)
    load_optimizer(trainer.optimizer, opt_tensors, state["optimizer"])


def last_checkpoint_note(run: str | Path) -> str:
    """What a stopped run keeps, for its error message."""
    cks = list_checkpoints(Path(run) / CHECKPOINTS)
    if cks:
        return f"the last good checkpoint is kept at {cks[-1]}"
    return "no checkpoint was written (use --checkpoint-every K)"


# ------------------------------------------------------------------------------ outputs


def save_text_encoder(text_encoder: Any, orig_vocab: int, d: Path) -> None:
    """Save a text encoder with its *original* vocabulary (placeholders live in EMBEDS)."""
    sd = dict(text_encoder.state_dict())
    key = next(k for k in sd if k.endswith("token_embedding.weight"))
    sd[key] = sd[key][:orig_vocab].clone()
    old = text_encoder.config.vocab_size
    text_encoder.config.vocab_size = orig_vocab
    try:
        text_encoder.save_pretrained(d, state_dict=sd, safe_serialization=True)
    finally:
        text_encoder.config.vocab_size = old


def _save_lora(trainer: Trainer, out: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_sd = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(trainer.unet, save_embedding_layers=False))
    te = {}
    if trainer.cfg.train_text_encoder:
        for name, enc in _text_encoder_names(trainer).items():
            te[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(enc, save_embedding_layers=False))
    cls = StableDiffusionXLPipeline if trainer.xl else StableDiffusionPipeline

    def write(d: Path) -> None:
        cls.save_lora_weights(d, unet_lora_layers=unet_sd, weight_name=LORA_FILE, **te)

    tmp = out / ".lora-tmp"
    atomic_dir(tmp, write)
    (tmp / LORA_FILE).replace(out / LORA_FILE)
    shutil.rmtree(tmp, ignore_errors=True)


def save_outputs(trainer: Trainer) -> None:
    """Write the run directory's weights, samples and ``run.json`` (last), each atomically."""
    from dynasyn.tokens import placeholder

    out, cfg = Path(trainer.out), trainer.cfg
    # one key per placeholder: a (dim,) row, or (vectors, dim) rows for a multi-vector one
    # (stock load_textual_inversion names them <asset0>, <asset0>_1, …); SDXL: a second file
    # for the second text encoder
    for emb, name in zip(trainer.embeddings, (EMBEDS, EMBEDS_2), strict=False):
        save_tensors({placeholder(i): emb[tids[0] if len(tids) == 1 else tids].detach().cpu()
                      .clone().contiguous() for i, tids in enumerate(trainer.placeholder_ids)},
                     out / name)
    if trainer.mode == "full":
        atomic_dir(out / "unet", lambda d: trainer.unet.save_pretrained(d, safe_serialization=True))
        if cfg.train_text_encoder:
            for name, te in _text_encoder_names(trainer).items():
                atomic_dir(out / name,
                           lambda d, te=te: save_text_encoder(te, trainer.orig_vocab, d))
    elif trainer.mode == "lora":
        _save_lora(trainer, out)
    if cfg.sample_prompts:
        from dynasyn.generate import generate_images

        generate_images(trainer.pipeline(), cfg.sample_prompts, out / "samples", n=1,
                        seed=cfg.seed, steps=cfg.sample_steps, progress=False)
    info = {
        "base_model": _recorded_model(cfg.model),
        "mode": trainer.mode,
        "placeholders": [placeholder(i) for i in range(trainer.n)],
        "classes": trainer.classes,
        "phrases": [s.phrase for s in trainer.scene.subjects],
        "resolution": trainer.resolution,
        "architecture": "sdxl" if trainer.xl else "sd",
        "lora_rank": cfg.lora_rank,
    }
    atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2))


def read_run(run: str | Path) -> dict:
    """The run's ``run.json`` (written last, so its presence marks a finished run)."""
    run = Path(run)
    info = run / RUN_INFO
    if not info.is_file():
        raise InputError(
            f"{run} is not a finished dynasyn run (no {RUN_INFO}); train it with `dynasyn train` "
            "or finish it with `dynasyn train … --resume`"
        )
    return json.loads(info.read_text())
