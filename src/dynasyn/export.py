"""``dynasyn export``: a run's weights as files that A1111, ComfyUI and stock diffusers load.

SD 1.x / 2.x and SDXL runs (``run.json``'s ``architecture``). Formats (``--format``):

- ``a1111`` / ``comfyui``: the same files in each UI's folders (:data:`FOLDERS`):

  * one textual-inversion file per placeholder, named after it (``asset0.safetensors``).
    SD runs: a single tensor of shape ``(vectors, dim)`` under the key ``<asset0>``. A1111 and
    ComfyUI take the one tensor of a single-key file whatever its key and name the embedding
    after the file (prompt word ``asset0`` / ``embedding:asset0``); diffusers'
    ``pipe.load_textual_inversion(path)`` names the token after the key, so the prompt word
    there is the run's own ``<asset0>`` (a multi-vector placeholder is expanded by diffusers
    into ``<asset0> <asset0>_1 …`` as in the run). A key ``emb_params`` (kohya's) would load
    in the UIs too but register the token ``emb_params`` in diffusers.
    SDXL runs: two tensors, ``clip_l`` (the rows in ``text_encoder``, CLIP ViT-L) and
    ``clip_g`` (``text_encoder_2``, OpenCLIP ViT-bigG), ``(vectors, dim)`` each: the A1111 /
    ComfyUI SDXL embedding layout. diffusers (0.42) reads one tensor per call, so it loads
    such a file in two calls, as its SDXL docs show: ``sd = load_file(path)``,
    ``pipe.load_textual_inversion(sd["clip_l"], token="<asset0>",
    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`` and the same with
    ``sd["clip_g"]``, ``pipe.text_encoder_2``, ``pipe.tokenizer_2`` (``load_textual_inversion(path)``
    alone refuses a two-key file);
  * LoRA runs: ``NAME_lora.safetensors`` in the kohya key layout (``lora_unet_…``, text
    encoders ``lora_te_…`` for SD, ``lora_te1_…`` / ``lora_te2_…`` for SDXL, with ``.alpha``),
    made by diffusers' ``convert_state_dict_to_kohya`` from peft's
    ``get_peft_model_state_dict`` of the run's adapters as ``load_lora_weights`` loads them;
    for SD runs diffusers' ``lora_te1_`` is renamed ``lora_te_`` (the SD 1.x/2.x prefix, the
    one A1111 maps for SD 2.x too), SDXL runs keep kohya's SDXL prefixes and get
    ``ss_base_model_version = sdxl_base_v1-0`` in the metadata;
  * full fine-tune runs (or, on request, a LoRA run with its adapters fused): ``NAME.safetensors``
    in the original layout (:mod:`dynasyn.ldm`; SDXL: ``conditioner.embedders.0/1``), which
    ``StableDiffusionPipeline.from_single_file(path, config=BASE)``
    (``StableDiffusionXLPipeline`` for SDXL) loads (``config`` = the run's base model, so no
    network is needed for the component configs).

- ``diffusers``: the personalized pipeline as one folder
  (``StableDiffusionPipeline.from_pretrained(OUT)`` / ``StableDiffusionXLPipeline…`` alone): the
  placeholders in its tokenizer(s) and text encoder(s), LoRA fused into the weights, DDIM sampler.

``OUT/dynasyn-export.json`` (the manifest) names the files, the ``architecture`` and, as
``diffusers_code``, the Python lines that load the export in stock diffusers (printed by the
command too).

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
from dynasyn.rundir import EMBEDS, EMBEDS_2, RUN_INFO, read_run

__all__ = ["FOLDERS", "FORMATS", "MANIFEST", "PARTS", "add_parser", "default_parts",
           "diffusers_code", "embedding_files", "export_run", "kohya_lora", "run"]

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
  embeddings  one file per placeholder: asset0.safetensors, …   (all runs; SDXL: clip_l + clip_g)
  lora        NAME_lora.safetensors, kohya layout              (LoRA runs)
  checkpoint  NAME.safetensors, original SD / SDXL layout      (full runs; LoRA runs: fused)
Prompt words: asset0 (A1111), embedding:asset0 (ComfyUI), <asset0> (diffusers). SD 1.x, 2.x and
SDXL runs; the command prints the stock diffusers code that loads the export. Details and the
folder table: docs/export.md.
"""


# ------------------------------------------------------------------------------ parts


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def embedding_files(run: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """One file's tensors per placeholder of the run, by file stem: SD runs
    ``{token: (vectors, dim)}``; SDXL runs ``{"clip_l": (vectors, dim_1), "clip_g":
    (vectors, dim_2)}`` (the placeholder's rows in the first and second text encoder)."""
    run = Path(run)
    first = load_file(str(run / EMBEDS))
    if read_run(run).get("architecture", "sd") != "sdxl":
        return {token.strip("<>"): {token: _rows(t)} for token, t in first.items()}
    if not (run / EMBEDS_2).is_file():
        raise InputError(f"{run} is an SDXL run without {EMBEDS_2} (the placeholders' rows in "
                         "the second text encoder); it cannot be exported")
    second = load_file(str(run / EMBEDS_2))
    if set(second) != set(first):
        raise InputError(f"{run}: {EMBEDS} and {EMBEDS_2} name different placeholders "
                         f"({sorted(first)} and {sorted(second)})")
    out = {}
    for token, t in first.items():
        clip_l, clip_g = _rows(t), _rows(second[token])
        if clip_l.shape[0] != clip_g.shape[0]:
            raise InputError(f"{run}: {token} has {clip_l.shape[0]} vectors in {EMBEDS} but "
                             f"{clip_g.shape[0]} in {EMBEDS_2}")
        out[token.strip("<>")] = {"clip_l": clip_l, "clip_g": clip_g}
    return out


def _is_xl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def kohya_lora(pipe: Any) -> dict[str, torch.Tensor]:
    """The LoRA adapters loaded into ``pipe`` (``load_lora_weights``) in the kohya layout:
    ``lora_unet_`` and ``lora_te_`` (SD 1.x/2.x) or ``lora_unet_``, ``lora_te1_``,
    ``lora_te2_`` (SDXL)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    models = [("unet", pipe.unet), ("text_encoder", pipe.text_encoder)]
    if _is_xl(pipe):
        models.append(("text_encoder_2", pipe.text_encoder_2))
    peft: dict[str, torch.Tensor] = {}
    for prefix, model in models:
        if not getattr(model, "peft_config", None):
            continue
        (adapter,) = model.peft_config
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items():
            # kohya / A1111 name CLIP's modules from the text_model wrapper transformers 5 drops
            if prefix.startswith("text_encoder") and not k.startswith("text_model."):
                k = f"text_model.{k}"
            peft[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    kohya = convert_state_dict_to_kohya(peft)
    if _is_xl(pipe):  # SDXL keeps diffusers' lora_te1_ / lora_te2_, kohya's own SDXL prefixes
        return {k: v.contiguous() for k, v in kohya.items()}
    return {k.replace("lora_te1_", "lora_te_", 1): v.contiguous() for k, v in kohya.items()}


def _lora_metadata(pipe: Any) -> dict[str, str]:
    cfg = next(iter(pipe.unet.peft_config.values()))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.r),
            "ss_network_alpha": str(cfg.lora_alpha)}
    if _is_xl(pipe):  # kohya's marker of an SDXL LoRA (A1111 sorts LoRAs by it)
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    return meta


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
    xl = _is_xl(pipe)

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
            "architecture": "sdxl" if xl else "sd", "mode": info["mode"], "files": files,
            "prompt_words": words, "classes": info.get("classes", []),
        }
        from dynasyn.models import resolve_model

        base = resolve_model(info["base_model"])
        if fmt != "diffusers" and "checkpoint" in parts:
            # from_single_file(ckpt, config=...) reads the component configs from here
            manifest["single_file_config"] = base
        manifest["diffusers_code"] = diffusers_code(manifest, str(final), base)
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
        if _is_xl(pipe):
            pipe.unload_textual_inversion(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
        _fuse_lora(pipe)
        try:
            sd = pipeline_to_ldm(pipe)
        except ValueError as e:
            raise InputError(f"{run}: {e}") from None
        save("checkpoint", f"{stem}.safetensors", {k: v.contiguous() for k, v in sd.items()})
    return files


def diffusers_code(manifest: dict[str, Any], out: str = "OUT", base: str | None = None) -> list[str]:
    """Python lines that load an export (``manifest``, written to ``out``) in stock diffusers
    (``base``: the base model's folder or hub id, default ``manifest["base_model"]``); the
    prompt words are the placeholders, ``<asset0>`` … SDXL embedding files take two calls each
    (diffusers' documented way: ``load_textual_inversion`` reads one tensor per call)."""
    cls = ("StableDiffusionXLPipeline" if manifest.get("architecture") == "sdxl"
           else "StableDiffusionPipeline")
    if manifest["format"] == "diffusers":
        return [f"pipe = {cls}.from_pretrained({out!r})"]

    def path(f: str) -> str:
        return repr(str(Path(out) / f))

    def part(name: str) -> list[str]:
        folder = FOLDERS[manifest["format"]][name] + "/"
        return [f for f in manifest["files"] if f.startswith(folder)]

    base = base or manifest["base_model"]
    if part("checkpoint"):
        lines = [f"pipe = {cls}.from_single_file({path(part('checkpoint')[0])}, config={base!r})"]
    else:
        lines = [f"pipe = {cls}.from_pretrained({base!r})"]
    if part("embeddings") and cls == "StableDiffusionXLPipeline":
        lines.append("from safetensors.torch import load_file")
    for f in part("embeddings"):
        if cls == "StableDiffusionPipeline":
            lines.append(f"pipe.load_textual_inversion({path(f)})")
            continue
        token = f"<{Path(f).stem}>"
        lines += [f"sd = load_file({path(f)})",
                  f"pipe.load_textual_inversion(sd['clip_l'], token={token!r}, "
                  "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                  f"pipe.load_textual_inversion(sd['clip_g'], token={token!r}, "
                  "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    lines += [f"pipe.load_lora_weights({path(f)})" for f in part("lora")]
    return lines


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
        "(kohya layout) or a single-file checkpoint (original SD / SDXL layout) in the folders of "
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
    arch = "SDXL " if manifest["architecture"] == "sdxl" else ""
    print(f"exported {args.run} ({arch}{manifest['mode']} run) as {args.format} to {args.out}:")
    for f in manifest["files"] if args.format != "diffusers" else []:
        print(f"  {f}")
    print("in stock diffusers:")
    for line in manifest["diffusers_code"]:
        print(f"  {line}")
    if manifest["prompt_words"]:
        print("prompt words: " + ", ".join(f"{w} ({c})" for w, c in zip(
            manifest["prompt_words"].values(), manifest["classes"], strict=False)))
    return 0
