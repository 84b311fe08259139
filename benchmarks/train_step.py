"""Training-step cost per preset: median step time and peak memory, as ratios to Break-a-Scene.

    python benchmarks/train_step.py                 # all tables (≈ 16 min on 2 CPU cores)
    python benchmarks/train_step.py --models tiny --no-scaling --rounds 1   # quick look

Every measurement runs in its own subprocess (so peak memory is not polluted by earlier runs)
on the same model and inputs: a two-subject scene and a two-item augmented directory. Phase 2
(full fine-tuning) is measured for every preset except `textual-inversion` (phase 1, its only
phase). ``dynasyn (naive)`` is the straightforward implementation of the same losses
(``efficient: false``: every pass runs the whole UNet, latents and class prompts are encoded
at every step, one backward), shown so the gain of the optimizations is visible.
``dynasyn (bf16 prior)`` keeps the frozen prior in bfloat16 under fp32 training
(``prior_dtype: bfloat16``: approximate prior maps, about half the prior's memory). With
``--precisions no,bf16`` (the default) Break-a-Scene and DynASyn are measured again under bf16
mixed precision, where the frozen prior is stored in bf16 by default and is exact.

Time: the median step time of a cell; every cell is measured ``--rounds`` times (default 2)
in round-robin order and the fastest round is reported, so that a slow spell of a shared
machine does not land on one preset only.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the measured steps; on CPU the
peak resident set size sampled every millisecond during the measured steps. "step MB" is that peak
minus the memory held before the steps (weights, optimizer state, caches): the memory a step
itself needs. "total MB" is the whole peak, weights included.

Models: ``tiny`` (dynasyn.tiny, 64 px), ``micro`` (the bundled micro model, when built) and
``sd21`` (SD 2.1's UNet block structure — 4 blocks, linear projections, per-block heads,
cross-attention in the first three — at quarter width, 256 px / 32×32 latents, random weights;
a full-size SD 2.1 step does not fit a 2-core CPU budget).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PRESETS = ["break-a-scene", "dynasyn", "dynasyn (naive)", "dynasyn (bf16 prior)", "md",
           "md+app", "md+act", "dreambooth", "textual-inversion"]
MIXED_PRESETS = ["break-a-scene", "dynasyn", "dynasyn (naive)"]
"""Measured again under mixed precision (``--precisions``)."""
VARIANTS = {"naive": {"efficient": False}, "bf16 prior": {"prior_dtype": "bfloat16"}}
"""Row-name suffixes ``preset (variant)``: the config values that variant changes."""


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def save_sd21_shaped(path: Path) -> Path:
    """SD 2.1's UNet layout at quarter width, with a small CLIP text encoder (random weights)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dynasyn.bpe import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(80, 160, 320, 320), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
        cross_attention_dim=256, norm_num_groups=16,
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
                        sample_size=256)
    tok = clip_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024,
                                      num_attention_heads=4, num_hidden_layers=4,
                                      vocab_size=len(tok), max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def make_inputs(root: Path, n_subjects: int = 2, size: int = 256) -> tuple[Path, Path]:
    """A synthetic scene with n subjects and a two-item augmented directory."""
    from PIL import Image

    from dynasyn.augment.data import write_item
    from dynasyn.tiny import synthetic_scene

    rng = np.random.default_rng(0)
    classes = ["panda", "bowl", "ball", "cat", "dog", "cup"][:n_subjects]
    scene = synthetic_scene(root / f"scene{n_subjects}", n_subjects, size, classes, margin=4)
    masks = [np.asarray(Image.open(scene / f"mask{i}.png")) > 127 for i in range(n_subjects)]
    aug = root / f"aug{n_subjects}"
    if not (aug / "prompts.jsonl").exists():
        for j, (tpl, subj) in enumerate([("{0} is throwing the {1}", [0, 1]),
                                         ("{0} is jumping", [0])]):
            subj = [s for s in subj if s < n_subjects] or [0]
            tpl = tpl if len(subj) == 2 else "{0} is jumping"
            im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            ms = [masks[s] for s in subj]
            write_item(aug, f"{j:04d}", im, ms, {"template": tpl, "subjects": subj, "seed": j})
    return scene, aug


def worker(args: argparse.Namespace) -> dict:
    import torch

    from dynasyn.config import build_config
    from dynasyn.models import quiet_libraries
    from dynasyn.train import Trainer

    quiet_libraries()
    torch.manual_seed(0)
    preset, _, variant = args.preset.partition(" (")
    over = dict(model=args.model, scene=args.scene, augmented=args.aug,
                mixed_precision=args.mixed_precision, **VARIANTS.get(variant.rstrip(")"), {}))
    if args.resolution:
        over["resolution"] = args.resolution
    cfg = build_config(preset, overrides=over)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp, progress=False)
        tr.orig_rows = tr.embedding[: tr.orig_vocab].detach().clone()
        phase = 1 if cfg.phase2_steps == 0 else 2
        tr._setup_phase(phase)
        cuda = tr.device.type == "cuda"
        for s in range(args.warmup):
            tr.step(s)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = _rss_mb()
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_mb())
                time.sleep(0.001)

        th = None if cuda else threading.Thread(target=sample, daemon=True)
        if th:
            th.start()
        times = []
        for s in range(args.warmup, args.warmup + args.steps):
            t = time.perf_counter()
            tr.step(s)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        stop.set()
        if th:
            th.join()
        if cuda:
            peak[0] = torch.cuda.max_memory_allocated() / 2**20
        return {"time": statistics.median(times), "step_mb": peak[0] - base,
                "total_mb": peak[0], "phase": phase, "device": str(tr.device)}


def run_one(model: str, preset: str, scene: Path, aug: Path, steps: int, warmup: int,
            resolution: int | None = None, mixed_precision: str = "no") -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--preset", preset,
           "--scene", str(scene), "--aug", str(aug), "--steps", str(steps),
           "--warmup", str(warmup), "--mixed-precision", mixed_precision]
    if resolution:
        cmd += ["--resolution", str(resolution)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{model} {preset} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """One cell from its rounds: the fastest median time, the largest memory figures."""
    best = dict(min(runs, key=lambda r: r["time"]))
    best.update(step_mb=max(r["step_mb"] for r in runs), total_mb=max(r["total_mb"] for r in runs))
    return best


def table(title: str, rows: list[tuple[str, dict]], ref: dict | None) -> str:
    lines = [f"### {title}", "",
             "| preset | phase | step s | × BaS time | step MB | × BaS step mem | total MB | × BaS total |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        rt = r["time"] / ref["time"] if ref else float("nan")
        rm = r["step_mb"] / ref["step_mb"] if ref and ref["step_mb"] > 0 else float("nan")
        rtot = r["total_mb"] / ref["total_mb"] if ref else float("nan")
        lines.append(f"| {name} | {r['phase']} | {r['time']:.3f} | {rt:.2f} | "
                     f"{r['step_mb']:.0f} | {rm:.2f} | {r['total_mb']:.0f} | {rtot:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model")
    p.add_argument("--preset")
    p.add_argument("--scene")
    p.add_argument("--aug")
    p.add_argument("--resolution", type=int)
    p.add_argument("--steps", type=int, default=10, help="measured steps per cell (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default="tiny,micro,sd21")
    p.add_argument("--rounds", type=int, default=2,
                   help="measure every cell this many times, round-robin; report the fastest")
    p.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    p.add_argument("--precisions", default="no,bf16",
                   help="mixed-precision settings to measure (no = fp32; bf16 / fp16 repeat "
                        f"{', '.join(MIXED_PRESETS)} with that autocast)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling tables")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from dynasyn.models import micro_model_path
    from dynasyn.tiny import save_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="dynasyn-bench-"))
    models: dict[str, tuple[str, int]] = {}
    for name in args.models.split(","):
        if name == "tiny":
            models["tiny"] = (str(save_tiny_pipeline(root / "tiny")), 64)
        elif name == "micro":
            if (micro_model_path() / "model_index.json").exists():
                models["micro"] = ("micro", 64)
            else:
                print("(micro model not built yet: skipped)\n")
        elif name == "sd21":
            models["sd21 (¼ width, 256 px)"] = (str(save_sd21_shaped(root / "sd21")), 256)
    for label, (model, size) in models.items():
        scene, aug = make_inputs(root / label.split()[0], 2, size)
        for mp in args.precisions.split(","):
            presets = PRESETS if mp == "no" else MIXED_PRESETS
            runs: dict[str, list[dict]] = {p: [] for p in presets}
            for r in range(args.rounds):  # round-robin: a slow spell of the machine hits
                for preset in presets:    # one round of a cell, not all of them
                    runs[preset].append(run_one(model, preset, scene, aug, args.steps,
                                                args.warmup, mixed_precision=mp))
                    print(f"  {label} ({mp}, round {r + 1}): {preset} done", file=sys.stderr)
            rows = [(p, best_of(runs[p])) for p in presets]
            ref = dict(rows)["break-a-scene"]
            what = "fp32" if mp == "no" else f"mixed precision {mp}"
            print(table(f"{label}, {what} — device {rows[0][1]['device']}", rows, ref) + "\n",
                  flush=True)
    if args.no_scaling or "tiny" not in models:
        return
    tiny, _ = models["tiny"]
    rows = []
    for n in range(1, 7):
        scene, aug = make_inputs(root / "scaling", n, 64)
        rows.append((f"dynasyn, {n} subject(s)", run_one(tiny, "dynasyn", scene, aug,
                                                          args.steps, args.warmup)))
    print(table("tiny: dynasyn vs number of subjects (ratios to 1 subject)", rows,
                rows[0][1]) + "\n")
    rows = []
    scene, aug = make_inputs(root / "scaling", 2, 256)
    for res in (64, 128, 256):
        rows.append((f"dynasyn, {res} px", run_one(tiny, "dynasyn", scene, aug, args.steps,
                                                    args.warmup, resolution=res)))
    print(table("tiny: dynasyn vs resolution (ratios to 64 px)", rows, rows[0][1]))


if __name__ == "__main__":
    main()
