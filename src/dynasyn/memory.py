"""Expected peak GPU memory of a configured run, from the model's configs (``--estimate-memory``).

Nothing is trained, loaded or written: the UNet, text encoder(s) and VAE are built from their
configs on the meta device (no weights, no memory), and every figure is computed from their
parameter counts and shapes. Per phase:

- **weights**: every parameter in its storage dtype: fp32 (the UNet, text encoder(s), VAE,
  the added placeholder rows and, in LoRA mode, the adapters), except the UNet of a run that
  never trains it (LoRA, embeddings only) under mixed precision, whose linear and convolution
  weights are kept in the autocast dtype (``Trainer._store_frozen_unet_half``);
- **gradients**: 4 bytes per trained parameter;
- **optimizer**: Adam's two fp32 states, 8 bytes per trained parameter; bitsandbytes' 8-bit
  Adam about 2;
- **frozen prior** (full phase 2 with L_ICA or L_AUG): the attention-only UNet copy in
  ``prior_dtype`` (the whole UNet and text encoder in fp32 with ``efficient: false``);
- **half weight copies** (mixed precision, UNet stored in fp32): autocast's half-precision
  copies of the UNet's weights that the backward pass keeps, 2 bytes per parameter of every
  block that is not checkpointed (with checkpointing: the capture layers' blocks);
- **activations**: :func:`activation_bytes`.

The activation term is an estimate (the rest is arithmetic on parameter counts): it counts
what autograd saves per diffusers block, with per-element coefficients counted on the CPU, and
is checked against :class:`LiveTensors`, a CPU count of the tensors a training pass keeps
alive (docs/low-vram.md). Left out: the CUDA context, the allocator's fragmentation, cuDNN
workspaces.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynasyn.config import TrainConfig
from dynasyn.errors import InputError

GiB = 1024**3

# Bytes autograd saves per element of a block's tensors in fp32, counted with
# torch.autograd.graph.saved_tensors_hooks on diffusers' blocks and transformers' CLIP layer
# (docs/low-vram.md, "The estimate"; checked against LiveTensors below).
RESNET_IN = 8.0    # per element of a ResnetBlock2D's input
RESNET_OUT = 12.0  # per element of its output
TBLOCK = 97.0      # per element of a BasicTransformerBlock's input (SDPA attention)
T2D = 4.0          # per element, a Transformer2DModel's own norm and projections
UPSAMPLE = 16.0    # per element of an Upsample2D's input
HEAD = 12.0        # per element of conv_in's output (conv_in, norm_out, conv_out)
CLIP_LAYER = {"gelu": 60.0, "quick_gelu": 76.0}  # per element of a CLIP layer's input
MIXED_FACTOR = 0.55
"""Mixed precision: half the bytes, plus a tenth for what CUDA's autocast keeps in fp32
(normalization outputs); CPU bf16 autocast measured 0.50 on the SD 2.1 UNet."""
TEXT_TOKENS = 77


@dataclass
class Models:
    """A pipeline's modules built on the meta device (shapes and parameter counts only)."""

    kind: str  # "sd" | "sdxl"
    unet: Any
    text_encoders: list[Any]
    vae: Any


@dataclass
class PhaseEstimate:
    """The memory of one phase, by component (bytes)."""

    phase: int
    label: str
    rows: dict[str, float] = field(default_factory=dict)
    trained_params: int = 0

    @property
    def total(self) -> float:
        return sum(self.rows.values())


@dataclass
class MemoryEstimate:
    """Per-phase estimates of a configured run and what they assume."""

    model: str
    resolution: int
    phases: list[PhaseEstimate]
    notes: list[str]

    @property
    def peak(self) -> float:
        return max(p.total for p in self.phases)


# ---------------------------------------------------------------------- model configs
def model_configs(model: str) -> dict[str, Any]:
    """The component configs of ``model``: a local diffusers directory (its JSON files), one
    of :data:`~dynasyn.known_models.KNOWN_MODELS`, or a hub id whose configs the hub cache
    holds or the hub serves (config files only)."""
    from dynasyn.known_models import KNOWN_MODELS
    from dynasyn.models import resolve_model

    if model in KNOWN_MODELS and not Path(model).is_dir():
        return KNOWN_MODELS[model]
    resolved = resolve_model(model)  # a bad path: one line
    path = resolved if Path(resolved).is_dir() else None

    def read(name: str) -> dict[str, Any] | None:
        if path is not None:
            f = Path(path) / name
            return json.loads(f.read_text()) if f.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return json.loads(Path(hf_hub_download(model, name)).read_text())
        except EntryNotFoundError:
            return None
        except Exception as e:  # offline, unknown repository, gated: one line
            raise InputError(
                f"could not read the configs of {model!r} ({type(e).__name__}); pass a local "
                "diffusers directory or one of: " + ", ".join(KNOWN_MODELS)) from None

    try:
        index = read("model_index.json") or {}
        out: dict[str, Any] = {"kind": "sdxl" if "text_encoder_2" in index else "sd"}
        for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
            cfg = read(f"{part}/config.json")
            if cfg is not None:
                out[part] = cfg
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"could not read the configs of {model!r} ({e}); "
                         "pass a diffusers pipeline directory") from None
    missing = [p for p in ("unet", "text_encoder", "vae") if p not in out]
    if missing:
        raise InputError(f"model {model!r} has no {missing[0]}/config.json; "
                         "pass a diffusers Stable Diffusion pipeline")
    return out


def empty_models(configs: dict[str, Any]) -> Models:
    """Build the UNet, text encoder(s) and VAE of ``configs`` on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        tes = [CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))]
        if "text_encoder_2" in configs:
            tes.append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_dict(configs["text_encoder_2"])))
    return Models(configs.get("kind", "sd"), unet, tes, vae)


def n_params(module: torch.nn.Module) -> int:
    """Parameter count of ``module``."""
    return sum(p.numel() for p in module.parameters())


def lora_parameter_count(module: torch.nn.Module, targets: list[str], rank: int) -> int:
    """Parameters of rank-``rank`` LoRA adapters on ``module``'s linear layers named by
    ``targets`` (as peft matches them: the name or its last parts): r·(in + out) each."""
    total = 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(
                name == t or name.endswith("." + t) for t in targets):
            total += rank * (m.in_features + m.out_features)
    return total


def _dropped_up_blocks(unet: torch.nn.Module, downsample: int) -> list[str]:
    """The up blocks the attention-only copy leaves out (after the last capture layer)."""
    from dynasyn.attention import cross_attention_layers

    last = max((int(n.split(".")[1]) for n, f in cross_attention_layers(unet).items()
                if f == downsample and n.startswith("up_blocks.")), default=-1)
    return [f"up_blocks.{i}." for i in range(last + 1, len(unet.up_blocks))]


def capture_block_params(unet: Any, capture: int) -> int:
    """Parameters of the transformer models that hold the capture layers (at latent/``capture``;
    never checkpointed: :func:`~dynasyn.attention.keep_capture_layers_unchecked`)."""
    n = len(unet.config.block_out_channels)
    blocks = ([(2**i, b) for i, b in enumerate(unet.down_blocks)]
              + [(2 ** (n - 1 - i), b) for i, b in enumerate(unet.up_blocks)])
    return sum(n_params(a) for f, b in blocks if f == capture
               for a in getattr(b, "attentions", None) or [])


def stored_bytes(module: torch.nn.Module, half_bytes: int, skip: list[str] | None = None
                 ) -> float:
    """Bytes of ``module``'s parameters when :func:`~dynasyn.attention.store_weights_as`
    keeps its linear and convolution layers at ``half_bytes`` a weight (4: not at all) and
    everything else in fp32; modules named under a ``skip`` prefix left out."""
    from dynasyn.attention import HALF_STORED

    total = 0.0
    for name, m in module.named_modules():
        if skip and any((name + ".").startswith(p) for p in skip):
            continue
        per = half_bytes if isinstance(m, HALF_STORED) else 4
        total += per * sum(p.numel() for p in m.parameters(recurse=False))
    return total


# ---------------------------------------------------------------------- activations
def _unet_units(unet: Any, latent: int, capture: int | None
                ) -> list[tuple[str, int, int, int]]:
    """(kind, pixels, channels in, channels out) of the UNet's blocks at latent side ``latent``;
    the transformer blocks of the capture layers (down/up blocks at latent/``capture``) are
    of kind "capture" (never checkpointed)."""
    n = len(unet.config.block_out_channels)
    levels = ([(2**i, unet.down_blocks[i]) for i in range(n)]
              + [(0, unet.mid_block)]
              + [(2 ** (n - 1 - i), unet.up_blocks[i]) for i in range(n)])
    units = [("head", latent * latent, unet.conv_in.out_channels, unet.conv_in.out_channels)]
    for factor, block in levels:
        side = latent // (factor or 2 ** (n - 1))
        px = side * side
        for r in getattr(block, "resnets", []) or []:
            units.append(("resnet", px, r.conv1.in_channels, r.conv2.out_channels))
        for a in getattr(block, "attentions", []) or []:
            c = a.config.in_channels
            kind = "capture" if factor == capture else "tblock"
            units.append(("t2d", px, c, c))
            units += [(kind, px, c, c) for _ in a.transformer_blocks]
        for u in getattr(block, "upsamplers", []) or []:
            units.append(("upsample", px, u.channels, u.out_channels))
    return units


def _unit_bytes(kind: str, px: int, cin: int, cout: int) -> float:
    if kind == "resnet":
        return px * (RESNET_IN * cin + RESNET_OUT * cout)
    per = {"t2d": T2D, "tblock": TBLOCK, "capture": TBLOCK, "upsample": UPSAMPLE, "head": HEAD}
    return px * cin * per[kind]


def activation_bytes(models: Models, resolution: int, batch: int, checkpointing: bool,
                     mixed: bool, text_checkpointing: bool | None = None,
                     capture: int | None = None) -> float:
    """Bytes autograd keeps for one training pass of ``batch`` images (an estimate).

    Without checkpointing: Σ over the UNet's blocks of pixels × coefficient × channels (the
    module constants above) plus the text encoders' layers (77 tokens × width × coefficient),
    plus the largest block once more (the backward pass's working buffers), × batch. With
    checkpointing (diffusers checkpoints every ResnetBlock2D and BasicTransformerBlock, and
    transformers every CLIP layer): those keep only their input (4 bytes per element), plus
    one block's full activations, recomputed in the backward pass; the transformer blocks of
    the capture layers (latent/``capture``) are not checkpointed
    (:func:`~dynasyn.attention.keep_capture_layers_unchecked`). Under mixed precision the
    UNet's part × :data:`MIXED_FACTOR` (the text encoder runs outside autocast, in fp32).
    ``text_checkpointing``: the text encoders' own (default: ``checkpointing``).
    """
    text_checkpointing = checkpointing if text_checkpointing is None else text_checkpointing
    elem = 4.0  # bytes of a kept input, scaled with the rest under mixed precision
    vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    latent = resolution // vae_factor
    kept, largest = 0.0, 0.0
    for kind, px, cin, cout in _unet_units(models.unet, latent, capture):
        full = _unit_bytes(kind, px, cin, cout)
        largest = max(largest, full)
        kept += px * cin * elem if checkpointing and kind in ("resnet", "tblock") else full
    unet_part = (kept + largest) * (MIXED_FACTOR if mixed else 1.0)
    kept = 0.0
    for te in models.text_encoders:
        c = te.config
        act = "quick_gelu" if c.hidden_act == "quick_gelu" else "gelu"
        layer = TEXT_TOKENS * c.hidden_size * CLIP_LAYER[act]
        if text_checkpointing:
            kept += c.num_hidden_layers * TEXT_TOKENS * c.hidden_size * elem + layer
        else:
            kept += c.num_hidden_layers * layer
    return batch * (unet_part + kept)


# ---------------------------------------------------------------------- a CPU check
class LiveTensors:
    """Count the bytes of the tensors that ops create, while they are alive, and their peak.

    A ``TorchDispatchMode``: every op output's storage is counted once, until the last tensor
    on it is gone; storages that existed before (parameters, inputs) are not counted. This is
    what a GPU allocator would have to hold for the pass (without its rounding), measured on
    the CPU: the check of :func:`activation_bytes` (``benchmarks/activation_memory.py``).
    """

    def __init__(self, exclude: list[torch.Tensor]):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.count: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.current = 0
        self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track(out)
                return out

        self.mode = _Mode()

    def _track(self, out: Any) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.exclude:
                continue
            if key not in self.count:
                self.count[key] = 0
                self.size[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.count[key] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.count[key] -= 1
        if self.count[key] == 0:
            del self.count[key]
            self.current -= self.size.pop(key)

    def __enter__(self) -> LiveTensors:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def measure_unet_pass(unet: Any, resolution: int, mixed: bool, vae_factor: int = 8) -> int:
    """Peak bytes of the tensors one training pass of ``unet`` creates (forward, a mean-square
    loss, backward; one image, 77 text tokens that need a gradient, bf16 autocast when
    ``mixed``), on the CPU. Configure the UNet as the trainer does first (capture
    processors, checkpointing, weight storage)."""
    side = resolution // vae_factor
    torch.manual_seed(0)
    z = torch.randn(1, unet.config.in_channels, side, side)
    enc = torch.randn(1, TEXT_TOKENS, unet.config.cross_attention_dim, requires_grad=True)
    added = None
    if unet.config.addition_embed_type == "text_time":
        cfg = unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
    live = LiveTensors(list(unet.parameters()) + [z, enc])
    with live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        loss = unet(z, torch.tensor([500]), enc, added_cond_kwargs=added).sample.float()
        loss = loss.square().mean()
    with live:
        loss.backward()
    return live.peak


# ---------------------------------------------------------------------- the estimate
def estimate_memory(cfg: TrainConfig, n_subjects: int, models: Models | None = None
                    ) -> MemoryEstimate:
    """The expected peak GPU memory of ``cfg``'s run on a scene of ``n_subjects``, per phase."""
    from dynasyn.attention import resolve_downsample
    from dynasyn.train import TE_LORA_TARGETS, UNET_LORA_TARGETS

    models = models or empty_models(model_configs(cfg.model))
    unet, tes, vae = models.unet, models.text_encoders, models.vae
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or unet.config.sample_size * vae_factor
    mixed = cfg.mixed_precision != "no"
    rows_added = n_subjects * max(cfg.placeholder_vectors, 1)
    te_params = sum(n_params(t) for t in tes) + rows_added * sum(
        t.get_input_embeddings().weight.shape[1] for t in tes)
    emb_params = sum(t.get_input_embeddings().weight.numel() for t in tes) + rows_added * sum(
        t.get_input_embeddings().weight.shape[1] for t in tes)
    # the UNet of a run that never trains it, stored in the autocast dtype (prior_dtype auto)
    autocast = {"fp16": "float16", "bf16": "bfloat16"}.get(cfg.mixed_precision)
    unet_half = (autocast is not None and (cfg.lora_rank > 0 or cfg.phase2_steps == 0)
                 and cfg.prior_dtype in ("auto", autocast))
    base = stored_bytes(unet, 2 if unet_half else 4) + 4.0 * (te_params + n_params(vae))
    opt_per = 2.0 if cfg.use_8bit_adam else 8.0
    try:
        capture = resolve_downsample(unet, cfg.attention_downsample)
    except ValueError as e:
        raise InputError(str(e)) from None
    # autocast's half copies of the UNet's weights (none when it is stored half; the text
    # encoder runs outside autocast), kept for the backward pass by every block that is not
    # checkpointed
    half_copies = 0.0
    if mixed and not unet_half:
        half_copies = 2.0 * (capture_block_params(unet, capture) if cfg.gradient_checkpointing
                             else n_params(unet))
    notes = [f"{models.kind.upper()} at {resolution} px, batch {cfg.batch_size}, "
             f"{n_subjects} subjects; mixed precision {cfg.mixed_precision}, gradient "
             f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
             f"{'8-bit Adam' if cfg.use_8bit_adam else 'Adam (fp32 states)'}"]
    graphs = cfg.batch_size
    if not cfg.efficient:  # one backward: the L_AUG and prior-preservation graphs stay alive too
        graphs += int(cfg.lambda_aug > 0 and bool(cfg.augmented)) + int(cfg.prior_preservation)

    def phase(p: int, label: str, trained: int, extra_weights: float, prior: float,
              text_ckpt: bool) -> PhaseEstimate:
        est = PhaseEstimate(p, label, trained_params=trained)
        est.rows["weights"] = base + extra_weights
        est.rows["gradients"] = 4.0 * trained
        est.rows["optimizer"] = opt_per * trained
        est.rows["frozen prior"] = prior
        est.rows["half weight copies"] = half_copies
        est.rows["activations"] = activation_bytes(models, resolution, graphs,
                                                   cfg.gradient_checkpointing, mixed, text_ckpt,
                                                   capture)
        return est

    phases = []
    if cfg.phase1_steps > 0:  # the text encoder stays in eval mode: no checkpointing there
        phases.append(phase(1, "embeddings", emb_params, 0.0, 0.0, False))
    if cfg.phase2_steps > 0:
        if cfg.lora_rank > 0:
            lora = lora_parameter_count(unet, UNET_LORA_TARGETS, cfg.lora_rank)
            if cfg.train_text_encoder:
                lora += sum(lora_parameter_count(t, TE_LORA_TARGETS, cfg.lora_rank) for t in tes)
            phases.append(phase(2, f"LoRA r{cfg.lora_rank}", lora + emb_params, 4.0 * lora,
                                0.0, cfg.gradient_checkpointing))
        else:
            trained = n_params(unet) + (te_params if cfg.train_text_encoder else emb_params)
            prior = 0.0
            if cfg.prior_model == "frozen" and (cfg.lambda_ica > 0 or cfg.lambda_aug > 0):
                if cfg.efficient:
                    prior = stored_bytes(unet, _dtype_bytes(cfg),
                                         skip=_dropped_up_blocks(unet, capture))
                else:
                    prior = 4.0 * (n_params(unet) + te_params)
            phases.append(phase(2, "full", trained, 0.0, prior, cfg.gradient_checkpointing))
    if models.kind == "sdxl":
        notes.append("SDXL: the trainer does not train SDXL yet; the figures are for the "
                     "same recipe on its modules (both text encoders' placeholder rows trained)")
    return MemoryEstimate(cfg.model, resolution, phases, notes)


def _dtype_bytes(cfg: TrainConfig) -> int:
    """Bytes per weight of the frozen prior copy (``prior_dtype``; auto follows mixed precision)."""
    name = cfg.prior_dtype
    if name == "auto":
        name = "float32" if cfg.mixed_precision == "no" else "half"
    return 4 if name == "float32" else 2


def format_estimate(est: MemoryEstimate) -> str:
    """The per-phase table of an estimate and its peak (GiB, or MiB below 1 GiB)."""
    unit, scale = ("GiB", GiB) if est.peak >= GiB else ("MiB", 2**20)
    names = list(est.phases[0].rows) if est.phases else []
    heads = [f"phase {p.phase} ({p.label})" for p in est.phases]
    w0 = len("trained parameters")
    widths = [max(len(h), 13) for h in heads]

    def row(name: str, cells: list[str]) -> str:
        return "  ".join([name.ljust(w0)] + [c.rjust(w) for c, w in zip(cells, widths,
                                                                        strict=True)])

    lines = [f"estimated peak GPU memory: {est.peak / scale:.2f} {unit} "
             "(an estimate from the model's configs, not a measurement)"]
    lines += [f"  {n}" for n in est.notes]
    lines.append(row(f"component ({unit})", heads))
    for name in names + ["total"]:
        vals = [p.total if name == "total" else p.rows[name] for p in est.phases]
        lines.append(row(name, [f"{v / scale:.2f}" for v in vals]))
    lines.append(row("trained parameters", [f"{p.trained_params:,}" for p in est.phases]))
    return "\n".join(lines)


def cmd_estimate_memory(args: argparse.Namespace) -> int:
    """``dynasyn train SCENE --estimate-memory``: print the estimate; train and write nothing.

    The scene is read (for its number of subjects) but not copied; the config is built as for
    training, with ``low_vram`` resolved as for a CUDA device."""
    from dynasyn.config import build_config, load_config, parse_set

    if args.resume:
        if not args.out or not (Path(args.out) / "config.yaml").is_file():
            raise InputError("--estimate-memory --resume needs --out RUN with a config.yaml")
        cfg = load_config(Path(args.out) / "config.yaml")
        scene = Path(args.out) / "scene"
    else:
        if not args.scene:
            raise InputError("no scene given: pass a scene directory (or --resume with --out RUN)")
        overrides = parse_set(args.set)
        options = dict(model=args.model, preset=args.preset, augmented=args.augmented,
                       phase1_steps=args.phase1_steps, phase2_steps=args.phase2_steps,
                       lora_rank=args.lora_rank, device=args.device)
        overrides.update({k: v for k, v in options.items() if v is not None})
        cfg = build_config(args.preset or "dynasyn", args.config, overrides, assume_cuda=True)
        scene = Path(args.scene)
    n = _count_subjects(scene, args.classes)
    print(format_estimate(estimate_memory(cfg, n)))
    return 0


def _count_subjects(scene: Path, classes: list[str] | None) -> int:
    """Subjects of a scene directory (validated as training would), or of a photo's --classes."""
    if scene.is_file():
        if not classes:
            raise InputError(f"{scene} is a photo: pass --classes, one noun per subject")
        return len(classes)
    from dynasyn.scene import load_scene

    return len(load_scene(scene, classes=list(classes) if classes else None).subjects)
