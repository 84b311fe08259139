"""The trainer's config schema: preset defaults < YAML file < command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynasyn.errors import InputError
from dynasyn.presets import PRESETS, micro_recipe

PRIOR_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Valid ``prior_dtype`` values."""


@dataclass
class TrainConfig:
    """Everything needed to reproduce a run (written to ``RUN/config.yaml``)."""

    preset: str = "dynasyn"
    model: str = "micro"
    scene: str = ""
    classes: list[str] = field(default_factory=list)
    phrases: list[str | None] = field(default_factory=list)
    augmented: str | None = None
    resolution: int | None = None
    # schedule (paper Table 4)
    phase1_steps: int = 700
    phase2_steps: int = 700
    phase1_lr: float = 5e-4
    phase2_lr: float = 2e-6
    optimizer: str = "adam"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 1
    # losses
    lambda_md: float = 1.0
    lambda_m2a: float = 1e-2
    lambda_ica: float = 5e-3
    lambda_aug: float = 1e-4
    prior_model: str = "frozen"
    # storage of the frozen prior (full phase 2): auto = the mixed-precision dtype (exact under
    # its autocast), float32 without mixed precision; bfloat16 / float16 under fp32 training
    # run the prior passes in that precision (approximate, about half the prior's memory).
    # A run that never trains the UNet (LoRA, embeddings only) under mixed precision keeps
    # the UNet itself in the autocast dtype when prior_dtype is auto (or that dtype)
    prior_dtype: str = "auto"
    attention_downsample: int | None = None
    # Break-a-Scene's prior preservation (on in its preset; docs/decisions.md): an unmasked
    # diffusion loss on class images the base model renders from class_prompt, cached in
    # class_data_dir (default: $DYNASYN_CACHE or ~/.cache/dynasyn, by model and prompt)
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_prompt: str = "a photo at the beach"
    class_data_dir: str | None = None
    single_subject: bool = False
    # MuDI's Seg-Mix (the mudi preset): the probability that a step's scene item is replaced
    # by the sampled subjects cut out and re-pasted at random on a white canvas
    segmix_prob: float = 0.0
    # placeholders: tokens per placeholder (0 = one per word of its init text) and what they
    # start from ("class": the class noun; "phrase": the subject's noun phrase, from scene.json
    # or Step 1, falling back to the class noun where a subject has none)
    placeholder_vectors: int = 1
    placeholder_init: str = "class"
    flip_p: float = 0.5
    prompt_prefix: str = "a photo of"
    # phase 2 mode
    lora_rank: int = 0
    lora_lr: float = 1e-4
    train_text_encoder: bool = True
    gradient_checkpointing: bool = False
    # the low-VRAM recipe (dynasyn.lowvram, docs/low-vram.md): a profile that sets lora_rank,
    # gradient_checkpointing, use_8bit_adam, mixed_precision (on CUDA), prior_dtype and
    # efficient where they are not given explicitly; config.yaml records what it resolved to
    low_vram: bool = False
    # bitsandbytes' 8-bit Adam/AdamW (the lowvram extra, CUDA); without it: a warning, plain Adam
    use_8bit_adam: bool = False
    # step cost: early-stopped attention-only passes, cached VAE latents and class-prompt
    # embeddings, separate backward for L_AUG. False = the straightforward implementation
    # (every pass full, everything recomputed, one backward); same losses and gradients.
    efficient: bool = True
    # bookkeeping
    seed: int = 0
    mixed_precision: str = "no"
    device: str = "auto"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 25

    def validate(self) -> TrainConfig:
        """Raise :class:`InputError` (one line) for values that cannot work."""
        if self.preset not in PRESETS:
            raise InputError(
                f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}"
            )
        for name in ("phase1_steps", "phase2_steps", "batch_size", "lora_rank", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.batch_size < 1:
            raise InputError("batch_size must be >= 1")
        if self.phase1_steps + self.phase2_steps == 0:
            raise InputError("phase1_steps + phase2_steps is 0: nothing to train")
        if all(v <= 0 for v in self.lambdas.values()):
            raise InputError("every loss weight (lambda_*) is 0: nothing to train")
        if self.placeholder_vectors < 0:
            raise InputError(f"placeholder_vectors must be >= 0 (got {self.placeholder_vectors})")
        if self.placeholder_init not in ("class", "phrase"):
            raise InputError("placeholder_init must be 'class' or 'phrase' "
                             f"(got {self.placeholder_init!r})")
        if self.optimizer not in ("adam", "adamw"):
            raise InputError(f"optimizer must be 'adam' or 'adamw' (got {self.optimizer!r})")
        if self.prior_model not in ("frozen", "current"):
            raise InputError(f"prior_model must be 'frozen' or 'current' (got {self.prior_model!r})")
        if self.prior_dtype not in PRIOR_DTYPES:
            raise InputError(f"prior_dtype must be one of: {', '.join(PRIOR_DTYPES)} "
                             f"(got {self.prior_dtype!r})")
        if self.prior_preservation and (self.num_class_images < 1 or self.prior_loss_weight < 0):
            raise InputError("prior preservation needs num_class_images >= 1 and "
                             f"prior_loss_weight >= 0 (got {self.num_class_images}, "
                             f"{self.prior_loss_weight}); or set prior_preservation=false")
        if not 0 <= self.segmix_prob <= 1:
            raise InputError(f"segmix_prob must be in [0, 1] (got {self.segmix_prob})")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError("mixed_precision must be one of: no, fp16, bf16")
        return self

    @property
    def lambdas(self) -> dict[str, float]:
        return {"md": self.lambda_md, "m2a": self.lambda_m2a, "ica": self.lambda_ica,
                "aug": self.lambda_aug}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, atomically."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    hint = _HINTS[name]
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
            return None
        raise InputError(f"config value {name} may not be empty")
    if origin in (typing.Union, types.UnionType):
        hint = args[0]
        origin = typing.get_origin(hint)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return list(value)
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if isinstance(value, bool):  # YAML reads a bare no / yes as a boolean
            return "yes" if value else "no"
        return str(value)
    except (TypeError, ValueError):
        raise InputError(
            f"config value {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}"
        ) from None


def build_config(
    preset: str = "dynasyn",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    assume_cuda: bool | None = None,
) -> TrainConfig:
    """Preset defaults, then the micro recipe (on the bundled micro model only), then a YAML
    file's values, then explicit overrides (None = unset). With ``low_vram``, its profile
    fills the keys neither the file nor the overrides give (:mod:`dynasyn.lowvram`;
    ``assume_cuda``: resolve it as for a CUDA device, or not, instead of looking)."""
    values: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    if config_file is not None:
        p = Path(config_file)
        try:
            loaded = yaml.safe_load(p.read_text())
        except OSError as e:
            raise InputError(f"cannot read config file {p}: {e.strerror}; check the path") from None
        except yaml.YAMLError as e:
            msg = str(e).splitlines()[0]
            raise InputError(f"config file {p} is not valid YAML ({msg}); fix its syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(f"config file {p} must hold a mapping of key: value")
        file_values = loaded
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = overrides.get("preset", file_values.get("preset", preset))
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values.update(PRESETS[preset])
    model = overrides.get("model", file_values.get("model", TrainConfig.model))
    if str(model) == "micro":
        values.update(micro_recipe(preset))
    values.update(file_values)
    values.update(overrides)
    values["preset"] = preset
    from dynasyn.lowvram import apply_low_vram

    values = apply_low_vram(values, set(file_values) | set(overrides), assume_cuda)
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise InputError(
            f"unknown config key {unknown[0]!r}; valid keys: {', '.join(sorted(_FIELDS))}"
        )
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


def load_config(path: str | Path) -> TrainConfig:
    """Read a run's saved ``config.yaml`` back (exact values, no preset re-application)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise InputError(f"{path}: unknown config key {unknown[0]!r}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in data.items()}).validate()


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--set expects key=value (got {item!r})")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        out[k] = yaml.safe_load(v) if v.strip() else None
    return out


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` under the process umask: what ``open()`` / ``mkdir()`` would give a new file
    or directory (``tempfile.mkstemp`` / ``mkdtemp`` create theirs private, 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary file in the same directory and a rename (the file
    gets the usual permissions, not the temporary file's private ones)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, umask_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
