"""Load, validate and save a *scene directory*: one photo, one mask per subject, class nouns.

Layout (Break-a-Scene's, plus an optional ``scene.json``; see docs/formats.md)::

    scene/
      img.jpg            # or img.png, image.{jpg,jpeg,png,webp}, or scene.json "image"
      mask0.png          # one per subject, white = subject (channel 0, or L), soft edges allowed
      mask1.png
      scene.json         # optional: {"image": "img.jpg", "subjects": [
                         #   {"mask": "mask0.png", "class": "bowl", "phrase": "green bowl"}, ...]}

Subject ``i`` (mask order) is written ``<asset{i}>`` in prompts. Without ``scene.json`` the class
nouns come from the ``classes`` argument (``--classes bowl seashell panda`` on the command line).

Every problem with a scene is refused with :class:`~dynasyn.errors.InputError` whose message is
one line naming the scene, the offending file and the fix. Loading never writes anything and
needs no model or tokenizer.

Pixels are read as stored: EXIF orientation is *not* applied (the masks are assumed to be
aligned with the image's stored pixel grid, as in Break-a-Scene's examples).
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynasyn.errors import InputError

__all__ = [
    "IMAGE_CANDIDATES",
    "MASK_THRESHOLD",
    "SCENE_JSON",
    "Scene",
    "Subject",
    "load_scene",
    "save_scene",
]

SCENE_JSON = "scene.json"
"""Name of the optional scene description file."""

IMAGE_CANDIDATES: tuple[str, ...] = (
    "img.jpg",
    "img.png",
    "image.jpg",
    "image.jpeg",
    "image.png",
    "image.webp",
)
"""Image file names tried, in order, when ``scene.json`` does not name the image
(matched case-insensitively)."""

MASK_THRESHOLD = 0.5
"""A mask pixel belongs to the subject when its value (in [0, 1]) is >= this."""


def _one_line(text: object) -> str:
    """``str(text)`` with line breaks escaped, so an error message stays on one line."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def _count(n: int, one: str, many: str) -> str:
    """``"1 class"`` / ``"3 classes"``."""
    return f"{n} {one if n == 1 else many}"


def _fail(scene_dir: Path | str, what: str) -> InputError:
    """An :class:`InputError` reading ``scene <dir>: <what>`` (one line)."""
    return InputError(_one_line(f"scene {scene_dir}: {what}"))


@dataclass
class Subject:
    """One subject of a scene.

    Attributes:
        index: position in mask order; the subject's placeholder is ``<asset{index}>``.
        class_noun: the word(s) that replace the placeholder in class prompts, e.g. ``"panda"``
            or ``"teddy bear"``.
        phrase: a short noun phrase describing the subject (e.g. ``"toy panda with a white
            belly"``), or ``None`` when unknown (the augmentation may then ask a
            vision-language model).
        mask_path: the subject's mask file.
    """

    index: int
    class_noun: str
    phrase: str | None
    mask_path: Path

    @property
    def placeholder(self) -> str:
        """The subject's placeholder token, ``"<asset{index}>"``."""
        return f"<asset{self.index}>"


@dataclass(eq=False)
class Scene:
    """A loaded, validated scene.

    Attributes:
        path: the scene directory (as given to :func:`load_scene`).
        image_path: the image file.
        image: the photo, RGB, original size.
        masks: one float32 ``H x W`` array in [0, 1] per subject, original size, soft edges
            kept (binarize with ``>= MASK_THRESHOLD``).
        subjects: one :class:`Subject` per mask, in mask order.
    """

    path: Path
    image_path: Path
    image: Image.Image = field(repr=False)
    masks: list[np.ndarray] = field(repr=False)
    subjects: list[Subject]

    def __len__(self) -> int:
        """Number of subjects (= number of masks)."""
        return len(self.subjects)

    @property
    def classes(self) -> list[str]:
        """Class nouns in mask order."""
        return [s.class_noun for s in self.subjects]

    @property
    def placeholders(self) -> list[str]:
        """Placeholder tokens in mask order: ``["<asset0>", "<asset1>", ...]``."""
        return [s.placeholder for s in self.subjects]

    def tensors(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and masks at ``resolution x resolution``, ready for training.

        Image and masks are resized so that the short side is ``resolution`` (bicubic for the
        image, bilinear for the masks; both antialiased when downsampling) and center-cropped
        together: geometrically this is one resampling of the same central square of the
        original, so image and masks stay pixel-aligned. The masks are then binarized at
        :data:`MASK_THRESHOLD`.

        Args:
            resolution: output side length in pixels (e.g. 512 for SD, 64 for the micro model).

        Returns:
            ``(image, masks)``: ``image`` float32 ``(3, R, R)`` in [-1, 1]; ``masks`` float32
            ``(N, R, R)`` with values in {0, 1}.

        Raises:
            InputError: a mask has no subject pixel left after resizing/cropping (e.g. a thin
                subject at low resolution, or one outside the central square of a non-square
                photo).
            ValueError: ``resolution`` is not a positive integer.
        """
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        w, h = self.image.size
        side = min(w, h)
        left, top = (w - side) / 2.0, (h - side) / 2.0
        box = (left, top, left + side, top + side)
        size = (resolution, resolution)

        img = self.image.resize(size, Image.Resampling.BICUBIC, box=box)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
        image = image.permute(2, 0, 1).div_(127.5).sub_(1.0).contiguous()

        out = []
        for subject, mask in zip(self.subjects, self.masks, strict=True):
            resized = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32), mode="F")
            resized = resized.resize(size, Image.Resampling.BILINEAR, box=box)
            binary = np.asarray(resized, dtype=np.float32) >= MASK_THRESHOLD
            if not binary.any():
                raise _fail(
                    self.path,
                    f"{subject.mask_path.name} has no pixel >= {MASK_THRESHOLD} after resizing "
                    f"{w}x{h} to {resolution}x{resolution} (short side resized, center crop); "
                    "use a higher resolution, a larger mask, or crop the photo so the subject "
                    "is inside its central square",
                )
            out.append(torch.from_numpy(binary.astype(np.float32)))
        masks = torch.stack(out) if out else torch.zeros(0, resolution, resolution)
        return image, masks


# --------------------------------------------------------------------------------------------
# loading


def _read_image(scene_dir: Path, path: Path, shown: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB; any failure becomes an :class:`InputError`."""
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = _one_line(exc) or type(exc).__name__
        raise _fail(
            scene_dir,
            f"cannot read {shown} ({reason}); replace it with a valid PNG or JPEG file",
        ) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new 8-bit RGB copy of ``im`` (16-bit / float grey rescaled to 0..255)."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.rint(_mask_array(im) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return im.convert("RGB")


def _mask_array(im: Image.Image) -> np.ndarray:
    """Channel 0 (or the single channel) of a mask image as float32 in [0, 1]."""
    mode = im.mode
    if mode in ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX"):
        a = np.asarray(im.getchannel(0), dtype=np.float32) / 255.0
    elif mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32) / 65535.0
    elif mode == "I":
        a = np.asarray(im, dtype=np.float32)
        a = a / (65535.0 if a.max(initial=0.0) > 255.0 else 255.0)
    elif mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
    elif mode in ("P", "PA"):
        a = np.asarray(im.convert("RGBA").getchannel(0), dtype=np.float32) / 255.0
    else:  # "1", "CMYK", "YCbCr", "HSV", ...: go through luminance
        a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return np.clip(a, 0.0, 1.0).astype(np.float32, copy=False)


def _read_mask(scene_dir: Path, path: Path, shown: str) -> np.ndarray:
    """Open ``path`` and return channel 0 as float32 in [0, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            return _mask_array(im)
    except Exception as exc:
        reason = _one_line(exc) or type(exc).__name__
        raise _fail(
            scene_dir,
            f"cannot read mask {shown} ({reason}); replace it with a valid PNG "
            "(white subject on black)",
        ) from None


def _find_image(scene_dir: Path) -> Path | None:
    """The first of :data:`IMAGE_CANDIDATES` present in ``scene_dir`` (case-insensitive)."""
    try:
        names = {p.name.lower(): p for p in scene_dir.iterdir() if p.is_file()}
    except OSError:
        return None
    for candidate in IMAGE_CANDIDATES:
        exact = scene_dir / candidate
        if exact.is_file():
            return exact
        if candidate in names:
            return names[candidate]
    return None


def _default_masks(scene_dir: Path) -> list[str]:
    """``mask0.png, mask1.png, ...`` consecutive from 0; a gap in the numbering is refused."""
    names: list[str] = []
    while (scene_dir / f"mask{len(names)}.png").exists():
        names.append(f"mask{len(names)}.png")
    # a later mask after a gap would be silently dropped: refuse instead
    stray = []
    for p in scene_dir.glob("mask*.png"):
        digits = p.stem[4:]
        if digits.isdigit() and p.name not in names:
            stray.append((int(digits), p.name))
    if stray:
        name = min(stray)[1]
        raise _fail(
            scene_dir,
            f"{name} exists but mask{len(names)}.png is missing; name the masks mask0.png, "
            "mask1.png, ... consecutively (one per subject)",
        )
    return names


def _check_text(scene_dir: Path, value: object, what: str, fix: str) -> str:
    """Validate a class noun or phrase: a non-empty one-line string without ``<`` or ``>``."""
    if not isinstance(value, str):
        raise _fail(scene_dir, f"{what} must be a string, got {type(value).__name__}; {fix}")
    text = value.strip()
    if not text:
        raise _fail(scene_dir, f"{what} is empty; {fix}")
    if "<" in text or ">" in text:
        raise _fail(
            scene_dir,
            f"{what} {text!r} contains '<' or '>' (reserved for placeholders like <asset0>); {fix}",
        )
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _fail(scene_dir, f"{what} {text!r} contains a newline or control character; {fix}")
    return text


def _parse_scene_json(scene_dir: Path, classes_given: bool) -> tuple[str | None, list[dict]]:
    """Read and type-check ``scene.json``; returns (image name or None, subject entries)."""
    path = scene_dir / SCENE_JSON
    fix = (
        'expected {"image": "img.jpg", "subjects": [{"mask": "mask0.png", "class": "bowl", '
        '"phrase": "green bowl"}, ...]}'
    )
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise _fail(
            scene_dir,
            f"{SCENE_JSON} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
            f"fix the syntax, {fix}",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(
            scene_dir, f"cannot read {SCENE_JSON} ({_one_line(exc)}); make it a UTF-8 JSON file"
        ) from None
    if not isinstance(data, dict):
        raise _fail(
            scene_dir,
            f'{SCENE_JSON} must be a JSON object {{"image": ..., "subjects": [...]}}, '
            f"got {type(data).__name__}; {fix}",
        )
    image = data.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise _fail(scene_dir, f'{SCENE_JSON} "image" must be a file name string; {fix}')
    if "subjects" not in data:
        raise _fail(
            scene_dir,
            f'{SCENE_JSON} has no "subjects" key; add "subjects": '
            '[{"mask": "mask0.png", "class": "..."}, ...]',
        )
    subjects = data["subjects"]
    if not isinstance(subjects, list) or not subjects:
        raise _fail(
            scene_dir,
            f'{SCENE_JSON} "subjects" must be a non-empty list of '
            '{"mask": ..., "class": ..., "phrase": ...} objects; ' + fix,
        )
    for i, entry in enumerate(subjects):
        where = f"{SCENE_JSON} subjects[{i}]"
        if not isinstance(entry, dict):
            raise _fail(scene_dir, f"{where} must be a JSON object, got {type(entry).__name__}")
        mask = entry.get("mask")
        if not isinstance(mask, str) or not mask.strip():
            raise _fail(
                scene_dir,
                f'{where} needs a "mask" file name string (e.g. "mask{i}.png"); {fix}',
            )
        if "class" not in entry or entry["class"] is None:
            if not classes_given:
                raise _fail(
                    scene_dir,
                    f'{where} has no "class"; add "class": "<noun>" or pass --classes',
                )
        elif not isinstance(entry["class"], str):
            raise _fail(
                scene_dir,
                f'{where} "class" must be a string, got {type(entry["class"]).__name__}; {fix}',
            )
        phrase = entry.get("phrase")
        if phrase is not None and not isinstance(phrase, str):
            raise _fail(
                scene_dir,
                f'{where} "phrase" must be a string or null, got {type(phrase).__name__}',
            )
    return image, subjects


def load_scene(
    path: str | Path,
    classes: Sequence[str] | None = None,
    phrases: Sequence[str | None] | None = None,
) -> Scene:
    """Load and validate a scene directory.

    Args:
        path: the scene directory.
        classes: one class noun per mask, in mask order; overrides ``scene.json``'s ``"class"``
            entries when given (the command line's ``--classes``). Required without
            ``scene.json``.
        phrases: one noun phrase (or ``None``) per mask; overrides ``scene.json``'s
            ``"phrase"`` entries when given.

    Returns:
        The :class:`Scene`; every mask has at least one pixel >= :data:`MASK_THRESHOLD` at the
        original size.

    Raises:
        InputError: the directory is missing; no image; an unreadable image, mask or
            ``scene.json``; no masks; a mask whose size differs from the image's; an empty mask;
            a class count different from the mask count; a bad class noun or phrase.
            The message is one line naming the file and the fix.
    """
    if isinstance(classes, str) or isinstance(phrases, str):
        raise TypeError("classes / phrases must be sequences of strings, not a single string")
    scene_dir = Path(path)
    if not scene_dir.exists():
        raise _fail(
            scene_dir, "directory does not exist; pass a folder with an image and mask0.png, ..."
        )
    if not scene_dir.is_dir():
        raise _fail(
            scene_dir,
            "is not a directory; pass the folder holding the image, mask0.png, ... "
            "(and optionally scene.json)",
        )

    # --- what the scene declares -------------------------------------------------------------
    json_image: str | None = None
    entries: list[dict] | None = None
    if (scene_dir / SCENE_JSON).exists():
        json_image, entries = _parse_scene_json(scene_dir, classes_given=classes is not None)

    # --- image -------------------------------------------------------------------------------
    if json_image is not None:
        image_path = scene_dir / json_image
        image_name = json_image
        if not image_path.is_file():
            raise _fail(
                scene_dir,
                f'{SCENE_JSON} names image "{json_image}" but there is no such file; '
                'fix "image" or add the file',
            )
    else:
        found = _find_image(scene_dir)
        if found is None:
            raise _fail(
                scene_dir,
                "no image found (looked for " + ", ".join(IMAGE_CANDIDATES) + "); add the photo "
                f'as img.jpg or img.png, or name it in {SCENE_JSON} "image"',
            )
        image_path, image_name = found, found.name
    image = _to_rgb(_read_image(scene_dir, image_path, image_name))
    width, height = image.size

    # --- masks -------------------------------------------------------------------------------
    if entries is not None:
        mask_names = [e["mask"] for e in entries]
        for i, name in enumerate(mask_names):
            if name in mask_names[:i]:
                raise _fail(
                    scene_dir,
                    f'{SCENE_JSON} lists mask "{name}" twice; give each subject its own mask',
                )
    else:
        mask_names = _default_masks(scene_dir)
    if not mask_names:
        raise _fail(
            scene_dir,
            "no masks found (expected mask0.png, mask1.png, ...); add one mask per subject, "
            "white subject on black, the same size as the image",
        )
    masks: list[np.ndarray] = []
    for name in mask_names:
        mask_path = scene_dir / name
        if not mask_path.exists():
            raise _fail(
                scene_dir,
                f'{SCENE_JSON} names mask "{name}" but there is no such file; '
                "fix the entry or add the mask",
            )
        mask = _read_mask(scene_dir, mask_path, name)
        mh, mw = mask.shape
        if (mw, mh) != (width, height):
            raise _fail(
                scene_dir,
                f"{name} is {mw}x{mh} but {image_name} is {width}x{height}; "
                "resize the mask to the image size",
            )
        if not (mask >= MASK_THRESHOLD).any():
            raise _fail(
                scene_dir,
                f"{name} is empty (no pixel >= {MASK_THRESHOLD} in channel 0); "
                "paint the subject white on black, or remove the mask",
            )
        masks.append(mask)

    # --- classes and phrases -----------------------------------------------------------------
    n = len(masks)
    mask_list = ", ".join(mask_names)
    if classes is not None:
        class_list = list(classes)
        if len(class_list) != n:
            raise _fail(
                scene_dir,
                f"{_count(len(class_list), 'class', 'classes')} given "
                f"({', '.join(map(str, class_list))}) but the "
                f"scene has {n} masks ({mask_list}); give exactly one class per mask, in mask "
                "order",
            )
        class_fix = "pass one class noun per mask (e.g. --classes bowl panda)"
    elif entries is not None:
        class_list = [e["class"] for e in entries]
        class_fix = f'fix "class" in {SCENE_JSON}'
    else:
        raise _fail(
            scene_dir,
            f"no class nouns: there is no {SCENE_JSON}; pass one class per mask ({mask_list}) "
            f'with --classes, or add {SCENE_JSON} with "subjects": [{{"mask": ..., '
            '"class": ...}]',
        )
    nouns = [
        _check_text(scene_dir, c, f"class for {mask_names[i]}", class_fix)
        for i, c in enumerate(class_list)
    ]

    if phrases is not None:
        phrase_list: list[object] = list(phrases)
        if len(phrase_list) != n:
            raise _fail(
                scene_dir,
                f"{_count(len(phrase_list), 'phrase', 'phrases')} given but the scene has "
                f"{n} masks ({mask_list}); "
                "give exactly one phrase per mask, in mask order",
            )
        phrase_fix = "pass one short noun phrase per mask"
    elif entries is not None:
        phrase_list = [e.get("phrase") for e in entries]
        phrase_fix = f'fix "phrase" in {SCENE_JSON}'
    else:
        phrase_list = [None] * n
        phrase_fix = ""
    phrase_out = [
        None if p is None else _check_text(scene_dir, p, f"phrase for {mask_names[i]}", phrase_fix)
        for i, p in enumerate(phrase_list)
    ]

    subjects = [
        Subject(index=i, class_noun=nouns[i], phrase=phrase_out[i], mask_path=scene_dir / name)
        for i, name in enumerate(mask_names)
    ]
    return Scene(path=scene_dir, image_path=image_path, image=image, masks=masks, subjects=subjects)


# --------------------------------------------------------------------------------------------
# saving


def _mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    """A bool / uint8 (0..255) / float ([0, 1]) mask as uint8 0..255."""
    a = np.asarray(mask)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(a, 0, 255).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_scene(
    scene_dir: str | Path,
    image: Image.Image,
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
    phrases: Sequence[str | None] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a scene directory (``img.png``, ``mask{i}.png`` as 8-bit L, ``scene.json``).

    The scene is written into a temporary directory beside ``scene_dir`` and renamed into
    place, so a reader never sees a half-written scene. The result loads with
    :func:`load_scene` (the arguments are validated with the same rules first).

    Args:
        scene_dir: the directory to create (its parents are created if needed).
        image: the photo (converted to RGB).
        masks: one ``H x W`` mask per subject: float in [0, 1], bool, or uint8 0..255.
        classes: one class noun per mask.
        phrases: optional noun phrase (or ``None``) per mask.
        overwrite: replace ``scene_dir`` if it already exists (otherwise refuse).

    Returns:
        ``Path(scene_dir)``.

    Raises:
        InputError: ``scene_dir`` exists (and not ``overwrite``), or the arguments would not
            make a valid scene (count mismatch, mask size, empty mask, bad class noun).
    """
    if isinstance(classes, str) or isinstance(phrases, str):
        raise TypeError("classes / phrases must be sequences of strings, not a single string")
    target = Path(scene_dir)
    rgb = image.convert("RGB")
    width, height = rgb.size
    arrays = [_mask_to_uint8(m) for m in masks]
    class_list, n = list(classes), len(arrays)
    if n == 0:
        raise _fail(target, "save_scene got no masks; pass one mask per subject")
    if len(class_list) != n:
        raise _fail(
            target, f"save_scene got {len(class_list)} classes for {n} masks; pass one per mask"
        )
    phrase_list = [None] * n if phrases is None else list(phrases)
    if len(phrase_list) != n:
        raise _fail(
            target, f"save_scene got {len(phrase_list)} phrases for {n} masks; pass one per mask"
        )
    fix = "pass a valid class noun"
    nouns = [_check_text(target, c, f"class for mask{i}.png", fix) for i, c in enumerate(classes)]
    texts = [
        None if p is None else _check_text(target, p, f"phrase for mask{i}.png", "fix the phrase")
        for i, p in enumerate(phrase_list)
    ]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape != (height, width):
            raise _fail(
                target,
                f"mask{i}.png has shape {a.shape} but the image is {width}x{height} "
                f"(needs shape ({height}, {width})); resize the mask to the image size",
            )
        if not (a >= 128).any():  # 128/255 >= 0.5 > 127/255
            raise _fail(target, f"mask{i}.png would be empty (no pixel >= 0.5); fix the mask")
    if target.exists() and not overwrite:
        raise _fail(target, "already exists; choose a new directory or pass overwrite=True")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # (not mkdtemp: keep the umask's permissions, mkdtemp would give 0700)
    try:
        rgb.save(tmp / "img.png")
        subjects = []
        for i, a in enumerate(arrays):
            Image.fromarray(np.ascontiguousarray(a), mode="L").save(tmp / f"mask{i}.png")
            entry: dict[str, str] = {"mask": f"mask{i}.png", "class": nouns[i]}
            if texts[i] is not None:
                entry["phrase"] = texts[i]
            subjects.append(entry)
        meta = {"image": "img.png", "subjects": subjects}
        (tmp / SCENE_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # overwrite: move the old one aside, then swap
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
