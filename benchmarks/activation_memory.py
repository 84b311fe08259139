"""Check the activation estimate of ``--estimate-memory`` against a CPU count.

    python benchmarks/activation_memory.py [--models sd21 sdxl] [--resolution 512] [--modes ...]

For each model (random weights from its bundled config: no download), one training pass of
its UNet as the trainer runs it (capture processors at latent/4, gradient checkpointing off /
on with the capture blocks unchecked) is run on the CPU while
:class:`dynasyn.memory.LiveTensors` counts the bytes of the tensors it creates that are alive
at once. Printed beside it: the estimate's activations plus its half weight copies. Modes:
``fp32``; ``bf16`` (autocast, UNet stored in fp32: a full fine-tune); ``bf16-half`` (autocast,
UNet's linear/conv weights stored in bf16: a LoRA run under ``low_vram``). CPU bf16 autocast
keeps a little less in fp32 than CUDA's does. SDXL at 1024 px needs about 16 GB of RAM.
"""

from __future__ import annotations

import argparse
import time

import torch

from dynasyn.attention import (
    install_attention_capture,
    keep_capture_layers_unchecked,
    store_weights_as,
)
from dynasyn.known_models import KNOWN_MODELS
from dynasyn.memory import (
    Models,
    activation_bytes,
    capture_block_params,
    empty_models,
    measure_unet_pass,
    n_params,
)

MODELS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
          "sd21": "stabilityai/stable-diffusion-2-1-base",
          "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
MiB = 2**20


def rows(key: str, resolution: int, modes: list[str]) -> list[str]:
    """One table row per (mode, checkpointing) of one model."""
    from diffusers import UNet2DConditionModel

    configs = KNOWN_MODELS[MODELS[key]]
    out = []
    for mode in modes:
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(configs["unet"]).requires_grad_(False)
        install_attention_capture(unet, None)
        if mode == "bf16-half":
            store_weights_as(unet, torch.bfloat16)
        models = Models(configs.get("kind", "sd"), unet, [], empty_models(configs).vae)
        mixed = mode != "fp32"
        for ckpt in (False, True):
            if ckpt:
                unet.enable_gradient_checkpointing()
                keep_capture_layers_unchecked(unet)
            t = time.perf_counter()
            measured = measure_unet_pass(unet, resolution, mixed)
            est = activation_bytes(models, resolution, 1, ckpt, mixed, capture=4)
            if mode == "bf16":
                est += 2 * (capture_block_params(unet, 4) if ckpt else n_params(unet))
            out.append(f"| {key} | {resolution} | {mode} | {'on' if ckpt else 'off'} | "
                       f"{measured / MiB:.0f} | {est / MiB:.0f} | {est / measured:.2f} |")
            print(out[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
        del unet, models
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sd21"], choices=sorted(MODELS))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16-half"],
                    choices=["fp32", "bf16", "bf16-half"])
    args = ap.parse_args()
    print("| model | px | mode | checkpointing | counted MiB | estimate MiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for key in args.models:
        rows(key, args.resolution, args.modes)


if __name__ == "__main__":
    main()
