"""``dynasyn export``: a run's weights as files that A1111, ComfyUI and stock diffusers load.

Formats (``--format``):

- ``a1111`` / ``comfyui``: the same files in each UI's folders (:data:`FOLDERS`):

  * one textual-inversion file per placeholder, named after it (``asset0.safetensors``):
    a single tensor of shape ``(vectors, dim)`` under the key ``<asset0>``. A1111 and ComfyUI
    take the one tensor of a single-key file whatever its key and name the embedding after the
    file (prompt word ``asset0`` / ``embedding:asset0``); diffusers'
    ``pipe.load_textual_inversion(path)`` names the token after the key, so the prompt word
    there is the run's own ``<asset0>`` (a multi-vector placeholder is expanded by diffusers
    into ``<asset0> <asset0>_1 …`` as in the run). A key ``emb_params`` (kohya's) would load
    in the UIs too but register the token ``emb_params`` in diffusers;
  * LoRA runs: ``NAME_lora.safetensors`` in the kohya key layout (``lora_unet_…``,
    ``lora_te_…``, with ``.alpha``), made by diffusers' ``convert_state_dict_to_kohya`` from
    peft's ``get_peft_model_state_dict`` of the run's adapters as ``load_lora_weights`` loads
    them; diffusers names the text encoder ``lora_te1_``, renamed ``lora_te_`` (the SD 1.x/2.x
    prefix, the one A1111 maps for SD 2.x too);
  * full fine-tune runs (or, on request, a LoRA run with its adapters fused): ``NAME.safetensors``
    in the original SD layout (:mod:`dynasyn.ldm`), which
    ``StableDiffusionPipeline.from_single_file(path, config=BASE)`` loads (``config`` = the
    run's base model, so no network is needed for the component configs).

- ``diffusers``: the personalized pipeline as one folder
  (``StableDiffusionPipeline.from_pretrained(OUT)`` alone): the placeholders in its tokenizer
  and text encoder, LoRA fused into the weights, DDIM sampler.

Everything is written into a temporary directory beside ``--out`` and renamed into place when
complete, so a failed export leaves nothing (or the previous export, with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dynasyn.atomic import replace_dir
from dynasyn.errors import InputError
from dynasyn.rundir import EMBEDS, RUN_INFO, read_run

__all__ = ["FOLDERS", "FORMATS", "MANIFEST", "PARTS", "add_parser", "default_parts",
           "embedding_files", "export_run", "kohya_lora", "run"]

FORMATS = ("a1111", "comfyui", "diffusers")
PARTS = ("embeddings", "lora", "checkpoint")
FOLDERS = {
    "a1111": {"embeddings": "embeddings", "lora": "models/Lora",
              "checkpoint": "models/Stable-diffusion"},
    "comfyui": {"embeddings": "models/embeddings", "lora": "models/loras",
                "checkpoint": "models/checkpoints"},
}
"""Where each part goes, relative to the UI's root folder (and to ``--out``)."""
MANIFEST = "dynasyn-export.json"

EXAMPLES = """examples:
  dynasyn export runs/bear --format a1111 --out export/bear      # then copy into the webui folder
  dynasyn export runs/bear --format comfyui --out export/bear-comfy  # then copy models/ over
  dynasyn export runs/lora --format a1111 --only lora --out export/l
  dynasyn export runs/lora --format a1111 --only checkpoint,embeddings --out export/merged  # fused
  dynasyn export runs/bear --format diffusers --out export/bear-pipe   # from_pretrained(folder)

a1111 / comfyui write, under OUT (copy its contents into the UI's folder):
  embeddings  one file per placeholder: asset0.safetensors, …   (all runs)
  lora        NAME_lora.safetensors, kohya layout              (LoRA runs)
  checkpoint  NAME.safetensors, original SD layout             (full runs; LoRA runs: fused)
Prompt words: asset0 (A1111), embedding:asset0 (ComfyUI), <asset0> (diffusers). Details and the
folder table: docs/export.md.
"""


# ------------------------------------------------------------------------------ parts


def embedding_files(run: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{file stem: {token: (vectors, dim) tensor}}``, one per placeholder of the run."""
    out = {}
    for token, t in load_file(str(Path(run) / EMBEDS)).items():
        out[token.strip("<>")] = {token: t.reshape(-1, t.shape[-1]).contiguous()}
    return out


def kohya_lora(pipe: Any) -> dict[str, torch.Tensor]:
    """The LoRA adapters loaded into ``pipe`` (``load_lora_weights``) in the kohya layout."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft: dict[str, torch.Tensor] = {}
    for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        if not getattr(model, "peft_config", None):
            continue
        (adapter,) = model.peft_config
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items():
            # kohya / A1111 name CLIP's modules from the text_model wrapper transformers 5 drops
            if prefix == "text_encoder" and not k.startswith("text_model."):
                k = f"text_model.{k}"
            peft[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    kohya = convert_state_dict_to_kohya(peft)
    return {k.replace("lora_te1_", "lora_te_", 1): v.contiguous() for k, v in kohya.items()}


def _lora_metadata(pipe: Any) -> dict[str, str]:
    cfg = next(iter(pipe.unet.peft_config.values()))
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.r),
            "ss_network_alpha": str(cfg.lora_alpha)}


def _fuse_lora(pipe: Any) -> None:
    """Merge loaded LoRA adapters into the weights and drop the adapter layers."""
    if getattr(pipe.unet, "peft_config", None):
        pipe.fuse_lora()
        pipe.unload_lora_weights()


# ------------------------------------------------------------------------------ export


def _name(run: Path, name: str | None) -> str:
    name = name or run.resolve().name
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    if not clean:
        raise InputError(f"--name {name!r} has no usable character; use letters, digits, . _ -")
    return clean


def _check(run: Path, fmt: str, parts: list[str] | None, out: Path, overwrite: bool) -> dict:
    """Validate everything before any work; returns the run's ``run.json``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not run.is_dir():
        raise InputError(f"run {run} does not exist; pass a run directory written by "
                         "`dynasyn train`")
    info = read_run(run)
    mode = info["mode"]
    if parts is not None:
        if fmt == "diffusers":
            raise InputError("--only applies to --format a1111 / comfyui; --format diffusers "
                             "writes the whole pipeline")
        if not parts:
            raise InputError(f"--only names no part; give some of: {', '.join(PARTS)}")
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise InputError(f"unknown part {unknown[0]!r} in --only; choose from: "
                             f"{', '.join(PARTS)}")
        if "lora" in parts and mode != "lora":
            raise InputError(f"{run} is a{'n' if mode == 'embeddings' else ''} {mode} run: it has "
                             "no LoRA to export; export its "
                             + ("checkpoint (--only checkpoint)" if mode == "full"
                                else "embeddings (--only embeddings)"))
        if "checkpoint" in parts and mode == "embeddings":
            raise InputError(f"{run} trained only embeddings: its model is the unchanged base "
                             "model; export its embeddings (--only embeddings)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory; choose another --out")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise InputError(f"--out {out} is the run or holds it; choose another folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    return info


def default_parts(mode: str) -> list[str]:
    """What an a1111 / comfyui export of a run of ``mode`` holds without ``--only``."""
    return ["embeddings"] + {"lora": ["lora"], "full": ["checkpoint"]}.get(mode, [])


def export_run(run: str | Path, fmt: str, out: str | Path, parts: list[str] | None = None,
               name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export ``run`` as ``fmt`` into ``out`` (see the module docstring); returns the manifest
    written to ``out/dynasyn-export.json``. Bad input raises :class:`InputError` before
    anything is written."""
    run, out = Path(run), Path(out)
    info = _check(run, fmt, parts, out, overwrite)
    stem = _name(run, name)
    from dynasyn.generate import load_run

    pipe = load_run(run, device="cpu")
    if hasattr(pipe, "text_encoder_2"):
        raise InputError(f"{run} is an SDXL run; export supports SD 1.x / 2.x runs")

    if fmt != "diffusers" and parts is None:
        parts = default_parts(info["mode"])
    final = out.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if fmt == "diffusers":
            files, words = _write_diffusers(pipe, tmp), {p: p for p in info["placeholders"]}
        else:
            files = _write_ui(run, pipe, tmp, FOLDERS[fmt], parts, stem)
            words = {p: (p.strip("<>") if fmt == "a1111" else f"embedding:{p.strip('<>')}")
                     for p in info["placeholders"]} if "embeddings" in parts else {}
        manifest = {
            "format": fmt, "run": str(run.resolve()), "base_model": info["base_model"],
            "mode": info["mode"], "files": files, "prompt_words": words,
            "classes": info.get("classes", []),
        }
        if fmt != "diffusers" and "checkpoint" in parts:
            from dynasyn.models import resolve_model

            # from_single_file(ckpt, config=...) reads the component configs from here
            manifest["single_file_config"] = resolve_model(info["base_model"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for f in tmp.rglob("*"):  # safetensors writes 0600; the files are for another program
            if f.is_file():
                f.chmod(0o644)
        if final.exists():
            replace_dir(tmp, final)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_ui(run: Path, pipe: Any, tmp: Path, folders: dict[str, str], parts: list[str],
              stem: str) -> list[str]:
    files = []

    def save(part: str, filename: str, tensors: dict, metadata: dict | None = None) -> None:
        rel = f"{folders[part]}/{filename}"
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / rel), metadata=metadata)
        files.append(rel)

    if "embeddings" in parts:
        for word, tensors in embedding_files(run).items():
            save("embeddings", f"{word}.safetensors", tensors)
    if "lora" in parts:
        save("lora", f"{stem}_lora.safetensors", kohya_lora(pipe), _lora_metadata(pipe))
    if "checkpoint" in parts:
        from dynasyn.ldm import pipeline_to_ldm

        pipe.unload_textual_inversion()  # the checkpoint's text encoder keeps the base vocabulary
        _fuse_lora(pipe)
        try:
            sd = pipeline_to_ldm(pipe)
        except ValueError as e:
            raise InputError(f"{run}: {e}") from None
        save("checkpoint", f"{stem}.safetensors", {k: v.contiguous() for k, v in sd.items()})
    return files


def _write_diffusers(pipe: Any, tmp: Path) -> list[str]:
    _fuse_lora(pipe)
    pipe.save_pretrained(tmp, safe_serialization=True)
    return sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ command line


def add_parser(subparsers: Any) -> None:
    """Add ``dynasyn export`` to the ``dynasyn`` parser's subparsers."""
    p = subparsers.add_parser(
        "export", help="write a run as files A1111 / ComfyUI / stock diffusers load",
        description="Export a finished run: textual-inversion files per placeholder, the LoRA "
        "(kohya layout) or a single-file checkpoint (original SD layout) in the folders of "
        "A1111 or ComfyUI, or a diffusers pipeline folder.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help=f"a finished run directory (with {RUN_INFO})")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output folder (written whole, atomically)")
    p.add_argument("--only", metavar="PART[,PART]",
                   help=f"a1111 / comfyui: which parts, from {', '.join(PARTS)} (default: "
                   "embeddings + the run's LoRA or checkpoint)")
    p.add_argument("--name", help="file name of the LoRA / checkpoint (default: the run "
                   "folder's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out as a whole (export into a folder of its own)")


def run(args: argparse.Namespace) -> int:
    """Run ``dynasyn export``; returns the exit status (bad input raises InputError)."""
    parts = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
    manifest = export_run(args.run, args.format, args.out, parts=parts, name=args.name,
                          overwrite=args.overwrite)
    print(f"exported {args.run} ({manifest['mode']} run) as {args.format} to {args.out}:")
    for f in manifest["files"] if args.format != "diffusers" else []:
        print(f"  {f}")
    if args.format == "diffusers":
        print(f"  load: StableDiffusionPipeline.from_pretrained({str(args.out)!r})")
    if "single_file_config" in manifest:
        print("  diffusers: StableDiffusionPipeline.from_single_file(CHECKPOINT, "
              f"config={manifest['single_file_config']!r})")
    if manifest["prompt_words"]:
        print("prompt words: " + ", ".join(f"{w} ({c})" for w, c in zip(
            manifest["prompt_words"].values(), manifest["classes"], strict=False)))
    return 0
