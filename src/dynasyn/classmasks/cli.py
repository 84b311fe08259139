"""``dynasyn masks PHOTO --classes … --out SCENE`` and photos given to train / augment /
personalize in place of a scene directory (:func:`scene_from_photo`)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from dynasyn.errors import InputError

EXAMPLES = """examples:
  dynasyn masks photo.jpg --classes bear bowl seashell --out scenes/bear
  dynasyn masks photo.jpg --classes cat ring --out scenes/x --model ./my-sd15
  dynasyn masks photo.jpg --classes dog ball --out scenes/y --segmenter detect-sam \\
      --detector-model ./owlv2-base-patch16 --sam-model ./sam-vit-base

Writes SCENE/img.png, mask0.png … (class order), scene.json, overlay.png (the masks tinted on
the photo), maps.png / maps.npz (each class's attention map) and masks.json (how the masks were
made). A class that is not found stops with exit status 2, naming it; its maps are then saved
in SCENE-maps/ for inspection. `dynasyn train / augment / personalize PHOTO --classes …` make
the masks the same way (default method, the command's --model).
"""

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dynasyn masks``."""
    p = sub.add_parser("masks", help="make a scene from a photo and class nouns (masks from "
                       "the model's attention)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photo", help="the photo (JPEG / PNG / WebP)")
    p.add_argument("--classes", nargs="+", metavar="NOUN", required=True,
                   help="one class noun per subject; the masks follow this order")
    p.add_argument("--out", required=True, help="scene directory to write")
    p.add_argument("--model", default="micro",
                   help="diffusers SD or SDXL pipeline whose attention is used (default: micro)")
    p.add_argument("--segmenter", default="attention", choices=["attention", "detect-sam"],
                   help="attention (default, no extra model) or an open-vocabulary detector + "
                   "SAM from local weights")
    p.add_argument("--detector-model", help="transformers OWLv2 directory (--segmenter detect-sam)")
    p.add_argument("--sam-model", help="transformers SAM directory (--segmenter detect-sam)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def is_photo(path: str | Path | None) -> bool:
    """Whether ``path`` names an image file (rather than a scene directory)."""
    return path is not None and Path(path).is_file() and Path(path).suffix.lower() in PHOTO_SUFFIXES


def _read_photo(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types
        raise InputError(f"cannot read photo {path} ({e}); pass a PNG or JPEG file") from None


def make_scene(
    photo: str | Path,
    classes: list[str],
    out: str | Path,
    model: str = "micro",
    *,
    segmenter: str = "attention",
    detector_model: str | None = None,
    sam_model: str | None = None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Make the masks of ``photo`` for ``classes`` and write the scene directory ``out``.

    Raises:
        InputError: unreadable photo, bad classes, ``out`` exists, missing weights, or a class
            not found (then its maps are saved in ``OUT-maps/`` first).
    """
    from dynasyn.classmasks import (
        ClassNotFound,
        MaskParams,
        check_classes,
        class_masks,
        save_maps,
        write_mask_scene,
    )

    out = Path(out)
    classes = check_classes(classes)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose a new --out or pass --overwrite")
    image = _read_photo(photo)
    if segmenter == "detect-sam":
        from dynasyn.classmasks.detect import detect_sam_masks

        result = detect_sam_masks(image, classes, detector_model, sam_model, device=device)
    elif segmenter == "attention":
        from dynasyn.models import load_pipeline, pick_device

        pipe = load_pipeline(model).to(pick_device(device))
        try:
            result = class_masks(pipe, image, classes, MaskParams(seed=seed))
        except ClassNotFound as e:
            maps_dir = out.parent / f"{out.name}-maps"
            save_maps(maps_dir, image, e.maps, classes)
            raise InputError(f"{e} in {photo}; maps saved in {maps_dir} for inspection; check "
                             "the class nouns (one per visible subject) or try --model") from None
        result.record["model"] = model
    else:
        raise InputError(f"unknown segmenter {segmenter!r}; use attention or detect-sam")
    return write_mask_scene(out, image, classes, result, source=str(photo), overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    """``dynasyn masks``."""
    out = make_scene(args.photo, args.classes, args.out, args.model, segmenter=args.segmenter,
                     detector_model=args.detector_model, sam_model=args.sam_model,
                     device=args.device, seed=args.seed, overwrite=args.overwrite)
    print(f"scene written to {out} (masks in class order; preview: {out / 'overlay.png'})")
    print(f"next: dynasyn train {out} --out RUN")
    return 0


def scene_from_photo(args: argparse.Namespace, dest: Path) -> None:
    """When ``args.scene`` is a photo, make its scene in ``dest`` (default method, the
    command's ``--model``) and point ``args.scene`` at it; a scene directory is left alone.

    ``dest`` is a folder inside the run / augmented directory (``RUN/masks``), so the scene the
    masks made stays there as the record of how they were made (``masks.json``).
    """
    if not is_photo(getattr(args, "scene", None)):
        return
    if not args.classes:
        raise InputError(f"{args.scene} is a photo: pass its subjects' class nouns with --classes "
                         "(the masks are made from them), or pass a scene directory")
    if dest.exists():
        shutil.rmtree(dest)
    model = getattr(args, "model", None) or "micro"
    make_scene(args.scene, list(args.classes), dest, model,
               device=getattr(args, "device", None) or "auto")
    print(f"masks made from the class names: {dest} (preview {dest / 'overlay.png'})")
    args.scene = str(dest)


def prepare_photo_run(args: argparse.Namespace, out: Path) -> bool:
    """For ``train`` / ``personalize PHOTO --classes …``: check ``out`` as a new run directory
    (emptied with ``--overwrite``), make the scene in ``RUN/masks`` and point ``args.scene`` at
    it. Returns whether ``args.scene`` was a photo (the run directory then already exists)."""
    from dynasyn.rundir import prepare_run_dir

    if not is_photo(getattr(args, "scene", None)):
        return False
    if not args.classes:
        raise InputError(f"{args.scene} is a photo: pass its subjects' class nouns with --classes "
                         "(the masks are made from them), or pass a scene directory")
    prepare_run_dir(out, args.overwrite, False)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    args.overwrite = False
    scene_from_photo(args, out / "masks")
    return True
