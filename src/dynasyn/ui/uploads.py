"""Uploaded photos and masks: size and format checks, and the scene directory they make.

Every check fails with :class:`~dynasyn.errors.InputError` (one line, shown inline on the
page). The scene itself is validated by :func:`dynasyn.scene.load_scene`, so its messages are
the command line's, naming the files as they were uploaded (``small.png is 32x32 but
photo.png is 64x64; resize the mask to the image size``).
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dynasyn.atomic import replace_dir
from dynasyn.errors import InputError
from dynasyn.scene import SCENE_JSON, Scene, load_scene, save_scene

MAX_UPLOAD_MB = 20
"""Largest upload accepted (also Gradio's ``max_file_size``, which refuses larger files before
they reach the server)."""
MAX_SIDE = 4096
"""Largest photo / mask side, in pixels."""
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF"}
"""Image formats accepted (PIL's names), by content, not by file name."""
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def upload_name(path: str | Path) -> str:
    """The name of an uploaded file as the user knows it (Gradio keeps the original name)."""
    return Path(str(path)).name


def check_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open an uploaded image after checking its size, format and dimensions.

    Raises:
        InputError: missing, larger than :data:`MAX_UPLOAD_MB`, not an image, a format outside
            :data:`FORMATS`, or a side above :data:`MAX_SIDE`.
    """
    p = Path(str(path))
    name = upload_name(p)
    if not p.is_file():
        raise InputError(f"{what} {name} was not received; upload it again")
    mb = p.stat().st_size / 2**20
    if mb > MAX_UPLOAD_MB:
        raise InputError(f"{what} {name} is {mb:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    try:
        im = Image.open(p)
        fmt = im.format
        size = im.size
    except Exception as e:  # PIL raises many types
        raise InputError(f"{what} {name} is not an image ({type(e).__name__}); upload a PNG, "
                         "JPEG or WebP file") from None
    if fmt not in FORMATS:
        raise InputError(f"{what} {name} is {fmt}, not a supported format; upload "
                         f"{', '.join(FORMATS.values())}")
    if max(size) > MAX_SIDE:
        raise InputError(f"{what} {name} is {size[0]}x{size[1]}; the largest side allowed is "
                         f"{MAX_SIDE} pixels, scale it down")
    try:
        im.load()
    except Exception as e:
        raise InputError(f"{what} {name} cannot be decoded ({type(e).__name__}: {e}); upload "
                         "the file again or re-save it") from None
    return im


def parse_classes(text: str | None) -> list[str]:
    """Class nouns typed in one box: comma-separated, or space-separated when there is no comma
    (``star ball`` / ``teddy bear, bowl``)."""
    text = (text or "").strip()
    parts = text.split(",") if "," in text else text.split()
    return [p.strip() for p in parts if p.strip()]


def parse_phrases(text: str | None) -> list[str] | None:
    """Optional noun phrases, comma-separated, one per subject (None when the box is empty)."""
    parts = [p.strip() for p in (text or "").split(",")]
    return parts if any(parts) else None


def _natural_key(path: str | Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", upload_name(path))]


def _safe_names(paths: Sequence[str | Path], formats: Sequence[str]) -> list[str]:
    """Distinct file names for the uploads inside the staged scene: the user's names where they
    are safe, with the suffix of the file's real format."""
    out: list[str] = []
    for p, fmt in zip(paths, formats, strict=True):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(upload_name(p)).stem).strip("._") or "file"
        name, k = f"{stem}{_SUFFIX[fmt]}", 1
        while name.lower() in {n.lower() for n in out} or name == SCENE_JSON:
            k += 1
            name = f"{stem}_{k}{_SUFFIX[fmt]}"
        out.append(name)
    return out


def _strip_scene(msg: str, staged: Path) -> str:
    prefix = f"scene {staged}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def scene_from_uploads(photo: str | Path | None, masks: Sequence[str | Path] | None,
                       classes: Sequence[str], dest: str | Path,
                       phrases: Sequence[str] | None = None) -> Scene:
    """Check the uploaded photo and masks (masks in file-name order: ``mask0``, ``mask1``, …),
    validate them as a scene with ``classes`` (and optional noun ``phrases``) and write the
    scene directory ``dest`` (replacing an earlier one). Returns the loaded scene.

    Raises:
        InputError: a failed upload check or any scene problem, with the command line's message.
    """
    if not photo:
        raise InputError("no photo: upload one (PNG, JPEG or WebP) or pick an example")
    if not masks:
        raise InputError("no masks: upload one mask per subject (white subject on black), draw "
                         "them, or make them from the class names")
    if not classes:
        raise InputError("no class nouns: type one per mask, in mask order (e.g. star ball)")
    masks = sorted(masks, key=_natural_key)
    files = [Path(str(photo)), *(Path(str(m)) for m in masks)]
    formats = [check_image(files[0], "photo").format]
    formats += [check_image(m, "mask").format for m in files[1:]]
    names = _safe_names(files, formats)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.parent / f".{dest.name}.upload-{uuid.uuid4().hex[:8]}"
    staged.mkdir()
    try:
        for src, name in zip(files, names, strict=True):
            shutil.copyfile(src, staged / name)
        meta = {"image": names[0], "subjects": [{"mask": n} for n in names[1:]]}
        (staged / SCENE_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            scene = load_scene(staged, classes=list(classes), phrases=phrases)
        except InputError as e:
            raise InputError(_strip_scene(str(e), staged)) from None
        for entry, subject in zip(meta["subjects"], scene.subjects, strict=True):
            entry["class"] = subject.class_noun
            if subject.phrase is not None:
                entry["phrase"] = subject.phrase
        (staged / SCENE_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(staged, dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return load_scene(dest)


def layer_masks(editor: dict[str, Any] | None) -> list[np.ndarray]:
    """One mask per brush layer of a Gradio ``ImageEditor`` value: the pixels painted (alpha
    > 0) on that layer, at the background photo's size. Empty layers are skipped.

    Raises:
        InputError: no photo in the editor, no painted layer, or a layer of another size.
    """
    if not editor or editor.get("background") is None:
        raise InputError("the brush editor has no photo: upload a photo first, then paint one "
                         "layer per subject")
    bg = np.asarray(editor["background"])
    h, w = bg.shape[:2]
    out = []
    for i, layer in enumerate(editor.get("layers") or []):
        a = np.asarray(layer)
        if a.shape[:2] != (h, w):
            raise InputError(f"brush layer {i + 1} is {a.shape[1]}x{a.shape[0]} but the photo "
                             f"is {w}x{h}; reload the photo into the editor")
        painted = a[..., 3] > 0 if a.ndim == 3 and a.shape[2] == 4 else a.reshape(h, w, -1).max(-1) > 0
        if painted.any():
            out.append(painted)
    if not out:
        raise InputError("no brush strokes: paint each subject on its own layer (add a layer per "
                         "subject), white or any colour")
    return out


def scene_from_arrays(photo: str | Path, masks: Sequence[np.ndarray], classes: Sequence[str],
                      dest: str | Path) -> Scene:
    """Write the scene of ``photo`` (an uploaded file) and painted ``masks`` into ``dest``
    with :func:`dynasyn.scene.save_scene` (replacing an earlier one); returns it loaded."""
    im = check_image(photo, "photo").convert("RGB")
    if len(masks) != len(classes):
        raise InputError(f"{len(classes)} class nouns for {len(masks)} painted layers; give one "
                         "class per layer, in layer order")
    for i, m in enumerate(masks):
        if m.shape != (im.height, im.width):
            raise InputError(f"layer {i + 1} is {m.shape[1]}x{m.shape[0]} but the photo is "
                             f"{im.width}x{im.height}; reload the photo into the editor")
    save_scene(dest, im, list(masks), list(classes), overwrite=True)
    return load_scene(dest)
