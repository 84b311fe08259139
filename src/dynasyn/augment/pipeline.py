"""`dynasyn augment`: the paper's concept-based prompt-and-image augmentation, Steps 1-4.

describe (phrases) → prompts (templates) → per item: draft + class-token attention → pseudo
masks → compose the real subjects into the draft → inpaint the gaps → GSA → write the item.

Items are cached under ``AUG/cache/<key>/`` by a hash of everything that determines them
(model, scene pixels and masks, template, subjects, phrases, seed and settings); a rerun only
renders missing items, and an unchanged rerun loads no model at all. Under
``accelerate launch`` each process renders every N-th item and the main process merges the
index once. The final masks are the pasted subjects' visible pixels (``final_masks="pasted"``,
GSA's class-token maps stored beside each item for inspection), or each subject segmented again
in the image after GSA (``final_masks="resegment"``, :mod:`dynasyn.augment.resegment`; the
pasted mask kept where that segmentation is degenerate, said in the item's record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dynasyn.augment.data import INDEX
from dynasyn.errors import InputError
from dynasyn.scene import Scene, load_scene

log = logging.getLogger("dynasyn")
CACHE_VERSION = 1


@dataclass
class AugmentConfig:
    """Settings of an augmentation run (all part of each item's cache key)."""

    model: str = "micro"
    num_prompts: int = 30
    provider: str = "template"
    describer: str = "scene"
    segmenter: str = "attention"
    inpainter: str = "diffusion"
    strength: float = 0.7
    draft_steps: int = 25
    gsa_steps: int = 50
    gsa_sampler: str = "ddim"
    final_masks: str = "pasted"
    guidance: float = 7.5
    seed: int = 0
    resolution: int | None = None
    sam_model: str | None = None
    inpaint_model: str | None = None
    local_model: str | None = None
    local_vlm: str | None = None

    def validate(self) -> AugmentConfig:
        choices = {"provider": ("template", "micro", "openai", "local"),
                   "describer": ("scene", "openai", "local"),
                   "segmenter": ("attention", "sam"),
                   "inpainter": ("diffusion", "cv2", "sd-inpaint"),
                   "gsa_sampler": ("ddim", "sde"),
                   "final_masks": ("pasted", "resegment")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise InputError(f"--{k.replace('_', '-')} must be one of {', '.join(allowed)} "
                                 f"(got {getattr(self, k)!r})")
        if not 0 < self.strength <= 1:
            raise InputError(f"--strength must be in (0, 1] (got {self.strength})")
        if self.num_prompts < 1:
            raise InputError("--num-prompts must be >= 1")
        if not 1 <= self.gsa_steps <= 1000 or int(self.gsa_steps * self.strength) < 1:
            raise InputError(f"--gsa-steps must be in 1..1000 with at least one step at "
                             f"--strength {self.strength} (got {self.gsa_steps})")
        if self.segmenter == "sam" and not self.sam_model:
            raise InputError("--segmenter sam needs --sam-model PATH (a transformers SamModel)")
        if self.inpainter == "sd-inpaint" and not self.inpaint_model:
            raise InputError("--inpainter sd-inpaint needs --inpaint-model PATH_OR_HUB_ID")
        return self


def _scene_arrays(scene: Scene, resolution: int) -> tuple[Image.Image, list[np.ndarray]]:
    image, masks = scene.tensors(resolution)
    arr = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr), [m.numpy() > 0.5 for m in masks]


def item_key(cfg: AugmentConfig, model_id: str, scene_digest: str, item, phrases, classes) -> str:
    """Hash of every input that determines one augmented item."""
    payload = dict(asdict(cfg), model=model_id, scene=scene_digest, template=item.template,
                   subjects=list(item.subjects), phrases=[phrases[s] for s in item.subjects],
                   classes=[classes[s] for s in item.subjects], version=CACHE_VERSION)
    for k in ("num_prompts", "provider", "describer", "local_model", "local_vlm"):
        payload.pop(k)
    if payload["gsa_sampler"] == "ddim":  # items cached before the option keep their keys
        payload.pop("gsa_sampler")
    if payload["final_masks"] == "pasted":  # likewise for the final masks
        payload.pop("final_masks")
    else:
        from dynasyn.augment.resegment import grabcut_available

        payload["grabcut"] = grabcut_available()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class _Models:
    """Lazily loaded models: nothing is loaded when every item is cached."""

    def __init__(self, cfg: AugmentConfig, device):
        self.cfg, self.device = cfg, device
        self._pipe = self._sam = self._inpaint = None

    @property
    def pipe(self):
        if self._pipe is None:
            from dynasyn.attention import install_attention_capture
            from dynasyn.models import load_pipeline

            self._pipe = load_pipeline(self.cfg.model).to(self.device)
            install_attention_capture(self._pipe.unet)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @property
    def sam(self):
        if self._sam is None:
            from transformers import SamModel, SamProcessor

            try:
                self._sam = (SamModel.from_pretrained(self.cfg.sam_model).to(self.device),
                             SamProcessor.from_pretrained(self.cfg.sam_model))
            except OSError as e:
                raise InputError(f"cannot load SAM from {self.cfg.sam_model} ({e}); "
                                 "pass a local transformers SamModel directory") from None
        return self._sam

    @property
    def inpaint_pipe(self):
        if self._inpaint is None:
            from diffusers import AutoPipelineForInpainting

            from dynasyn.models import resolve_model

            # an SD or SDXL inpainting checkpoint, whichever its model_index.json names
            self._inpaint = AutoPipelineForInpainting.from_pretrained(
                resolve_model(self.cfg.inpaint_model), safety_checker=None,
                requires_safety_checker=False).to(self.device)
        return self._inpaint


def render_item(models: _Models, cfg: AugmentConfig, item, phrases, classes, scene_img, scene_masks,
                seed: int) -> dict:
    """Steps 3-4 for one prompt item: returns images, masks and maps of every stage."""
    from dynasyn.augment.compose import compose, inpaint
    from dynasyn.augment.draft import render_draft
    from dynasyn.augment.gsa import guided_sde_augmentation, inpaint_diffusion
    from dynasyn.augment.masks import attention_masks, attention_prompts, sam_masks

    pipe = models.pipe
    size = scene_img.size[0]
    ph = [phrases[s] for s in item.subjects]
    cl = [classes[s] for s in item.subjects]
    draft, maps = render_draft(pipe, item.template, ph, cl, seed, steps=cfg.draft_steps,
                               guidance=cfg.guidance)
    draft_masks = attention_masks(maps, size)
    if cfg.segmenter == "sam":
        model, processor = models.sam
        draft_masks = sam_masks(draft, attention_prompts(draft_masks, maps), model, processor,
                                fallback=draft_masks)
    res = compose(draft, draft_masks, scene_img, [scene_masks[s] for s in item.subjects])
    if cfg.inpainter == "cv2":
        filled = inpaint(res.image, res.gap_mask, method="cv2")
    else:
        ip = models.inpaint_pipe if cfg.inpainter == "sd-inpaint" else None
        filled = inpaint_diffusion(pipe, res.image, res.gap_mask, item.phrase_prompt(phrases),
                                   seed, steps=cfg.draft_steps, guidance=cfg.guidance,
                                   inpaint_pipe=ip)
    final, gsa_maps = guided_sde_augmentation(pipe, filled, item.template, ph, cl, seed,
                                              strength=cfg.strength, steps=cfg.gsa_steps,
                                              guidance=cfg.guidance, sampler=cfg.gsa_sampler)
    out = dict(draft=draft, draft_masks=draft_masks, composed=filled, final=final,
               pasted_masks=res.pasted_masks, masks=res.pasted_masks, draft_maps=maps,
               gsa_maps=gsa_maps, mask_sources=None)
    if cfg.final_masks == "resegment":
        from dynasyn.augment.resegment import final_image_maps, resegment_masks

        final_maps = final_image_maps(pipe, final, item.template, ph, cl, seed)
        sam = models.sam if cfg.sam_model else None  # SAM whenever one is given
        out["masks"], out["mask_sources"] = resegment_masks(final, final_maps, res.pasted_masks,
                                                            sam=sam)
        out["final_maps"] = final_maps
    return out


def mask_record(final_masks: str, subjects, sources: list[dict] | None) -> dict:
    """What an item's record says about its masks: ``final_masks`` and, when re-segmented,
    ``grabcut`` (refined by GrabCut) and ``mask_sources`` (per subject index: resegmented or
    pasted, and why)."""
    if final_masks == "pasted":
        return {"final_masks": "pasted"}
    from dynasyn.augment.resegment import grabcut_available

    return {"final_masks": final_masks, "grabcut": grabcut_available(),
            "mask_sources": {str(s): src for s, src in zip(subjects, sources or [], strict=True)}}


def _write_cache(entry: Path, out: dict, record: dict) -> None:
    from dynasyn.augment.compose import contact_sheet

    tmp = entry.with_name(f".tmp-{entry.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    out["draft"].save(tmp / "draft.png")
    out["composed"].save(tmp / "composed.png")
    out["final"].save(tmp / "final.png")
    for s, m in zip(record["subjects"], out["masks"], strict=True):
        Image.fromarray(m.astype(np.uint8) * 255, "L").save(tmp / f"mask{s}.png")
    np.save(tmp / "draft_maps.npy", out["draft_maps"])
    np.save(tmp / "gsa_maps.npy", out["gsa_maps"])
    if "final_maps" in out:
        np.save(tmp / "final_maps.npy", out["final_maps"])
    contact_sheet([("draft", out["draft"], out["draft_masks"]),
                   ("composed", out["composed"], out.get("pasted_masks", out["masks"])),
                   ("final", out["final"], out["masks"])]).save(tmp / "sheet.png")
    (tmp / "record.json").write_text(json.dumps(record))
    if entry.exists():
        shutil.rmtree(entry)
    tmp.rename(entry)


def merge_index(out: Path, keys: list[str]) -> None:
    """Write ``NNNN.png``, ``NNNN_mask{i}.png`` and ``prompts.jsonl`` from the cache, atomically."""
    lines = []
    for j, key in enumerate(keys):
        entry = out / "cache" / key
        rec = json.loads((entry / "record.json").read_text())
        item_id = f"{j:04d}"
        shutil.copyfile(entry / "final.png", out / f"{item_id}.png")
        for s in rec["subjects"]:
            shutil.copyfile(entry / f"mask{s}.png", out / f"{item_id}_mask{s}.png")
        rec.update(id=item_id, image=f"{item_id}.png", draft=f"cache/{key}/draft.png",
                   composed=f"cache/{key}/composed.png", sheet=f"cache/{key}/sheet.png")
        lines.append(json.dumps(rec))
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text("".join(x + "\n" for x in lines))
    tmp.replace(out / INDEX)


def augment(scene_dir: str | Path, out: str | Path, cfg: AugmentConfig, client=None,
            progress: bool = True, classes: list[str] | None = None) -> Path:
    """Run Steps 1-4 for a scene into the augmented directory ``out`` (resumable).

    ``classes``: one class noun per mask, overriding the scene's ``scene.json`` (needed
    without one; the command line's ``--classes``).
    """
    from accelerate import PartialState

    from dynasyn.augment.describe import describe_subjects
    from dynasyn.augment.prompts import generate_prompts
    from dynasyn.models import resolve_model

    cfg.validate()
    out = Path(out)
    scene = load_scene(scene_dir, classes=classes)
    model_id = resolve_model(cfg.model)
    classes = scene.classes
    phrases = describe_subjects(scene, provider=cfg.describer, client=client,
                                local_model=cfg.local_vlm)
    items = generate_prompts(classes, phrases, num_prompts=cfg.num_prompts, provider=cfg.provider,
                             seed=cfg.seed, client=client, local_model=cfg.local_model)
    resolution = cfg.resolution or _model_resolution(model_id)
    scene_img, scene_masks = _scene_arrays(scene, resolution)
    digest = hashlib.sha256(scene_img.tobytes() + np.stack(scene_masks).tobytes()).hexdigest()
    keys = [item_key(cfg, model_id, digest, it, phrases, classes) for it in items]
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes need cpu=True
    (out / "cache").mkdir(parents=True, exist_ok=True)
    models = _Models(cfg, state.device)
    mine = [j for j in range(len(items)) if j % state.num_processes == state.process_index]
    todo = [j for j in mine if not (out / "cache" / keys[j] / "record.json").is_file()]
    bar = tqdm(todo, desc="augment", unit="item", disable=not (progress and state.is_main_process))
    if todo:  # load the model before the first item, saying so, rather than sit at 0 silently
        bar.set_postfix_str(f"loading the model {cfg.model}")
        models.pipe  # noqa: B018 - the property loads the pipeline
        bar.set_postfix_str("")
    for j in bar:
        item = items[j]
        seed = int(keys[j][:8], 16) % (2**31)
        result = render_item(models, cfg, item, phrases, classes, scene_img, scene_masks, seed)
        record = dict(item.record(classes, phrases), seed=seed, key=keys[j],
                      **mask_record(cfg.final_masks, item.subjects, result["mask_sources"]))
        _write_cache(out / "cache" / keys[j], result, record)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_index(out, keys)
    state.wait_for_everyone()
    return out


def _model_resolution(model_id: str) -> int:
    """The native resolution of a pipeline directory (UNet sample size × VAE factor)."""
    p = Path(model_id)
    try:
        unet = json.loads((p / "unet" / "config.json").read_text())
        vae = json.loads((p / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError):
        return 512
