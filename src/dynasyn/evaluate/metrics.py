"""Evaluation metrics: CLIP-I, CLIP-T, identity-in-region, optional ImageReward and DINO.

- **CLIP-I** (:meth:`ClipScorer.clip_i`): cosine similarity of the CLIP image embeddings of a
  generated image and a reference — the whole reference photo, or one subject of it
  (:func:`subject_reference`: the photo cropped to the subject's mask box, background blanked
  to grey, padded to a square so CLIP's center crop cuts nothing off).
- **CLIP-T** (:meth:`ClipScorer.clip_t`): cosine similarity of a generated image and its prompt
  with the placeholders rendered as class nouns ("panda is throwing the bowl.").
- **Identity-in-region** (:meth:`ClipScorer.identity_in_region`, issue 5 item 5): CLIP-I between
  the subject's reference crop and the *generated* image cropped the same way to the subject's
  own region in it — the placeholder's cross-attention map captured while generating, upsampled
  and thresholded (:func:`attention_regions`, the segmentation of the augmentation's pseudo
  masks; :func:`attention_region` for one map alone); the whole image when the map is empty. Whole-image
  CLIP-I rewards copying the reference's layout and background (a model that overfits the
  photo scores high CLIP-I and low CLIP-T); this score compares only the subject's appearance,
  wherever and however large it is drawn.
- **ImageReward** (:class:`ImageRewardScorer`) when the ``ImageReward`` package and its weights
  are available locally; **DINO** similarity (:class:`DinoScorer`) when a DINO/ViT model
  directory is given. Both optional; :func:`image_reward_available` says why not.

CLIP models load with stock ``transformers.CLIPModel.from_pretrained`` from the bundled micro
CLIP (``"micro"``), a local directory or a hub id. Images are preprocessed here (resize the
short side, center crop, normalize; no torchvision needed), with the sizes and statistics of
the directory's ``preprocessor_config.json`` when it has one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynasyn.errors import InputError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GREY",
    "ClipScorer",
    "DinoScorer",
    "ImageRewardScorer",
    "attention_region",
    "attention_regions",
    "blank_crop",
    "embedding",
    "image_reward_available",
    "mask_box",
    "mean_std",
    "region_crop",
    "bootstrap_interval",
    "wilson_interval",
    "subject_reference",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's normalization mean (used when a model directory has no preprocessor config)."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's normalization std."""

GREY = (128, 128, 128)
"""Fill of blanked backgrounds in subject crops."""

MICRO_FIX = "build it with python -m dynasyn.micro.train or pass --clip-model PATH"

ImageLike = Image.Image | np.ndarray


# --------------------------------------------------------------------------------------------
# images, masks, crops


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def mask_box(mask: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """The box ``(x0, y0, x1, y1)`` (end-exclusive) of the pixels ``>= threshold``; None if none."""
    m = np.asarray(mask, dtype=np.float32) >= threshold
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def blank_crop(image: ImageLike, region: np.ndarray, fill: tuple[int, int, int] = GREY,
               threshold: float = 0.5) -> Image.Image:
    """``image`` cropped to ``region``'s box, pixels outside ``region`` set to ``fill``.

    The crop is centred on a square canvas of ``fill`` (side = the box's longer side), so the
    short-side resize and center crop of CLIP's preprocessing keep the whole subject. A region
    of another size than the image is resized to it (nearest). An empty region gives the
    whole image unchanged.
    """
    img = np.asarray(to_pil(image))
    h, w = img.shape[:2]
    reg = np.asarray(region, dtype=np.float32)
    if reg.shape != (h, w):
        reg = np.asarray(Image.fromarray(reg, mode="F").resize((w, h), Image.NEAREST))
    box = mask_box(reg, threshold)
    if box is None:
        return Image.fromarray(img)
    x0, y0, x1, y1 = box
    keep = reg[y0:y1, x0:x1] >= threshold
    crop = np.where(keep[..., None], img[y0:y1, x0:x1], np.array(fill, np.uint8))
    side = max(x1 - x0, y1 - y0)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[...] = np.array(fill, np.uint8)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    canvas[oy : oy + y1 - y0, ox : ox + x1 - x0] = crop
    return Image.fromarray(canvas)


def subject_reference(image: ImageLike, mask: np.ndarray) -> Image.Image:
    """The reference for one subject: the photo cropped to the mask's box, background grey.

    ``mask`` is the subject's mask at the image's size (values in [0, 1], binarized at 0.5).
    Raises :class:`InputError` for an empty mask.
    """
    if mask_box(mask) is None:
        raise InputError("a subject mask is empty; cannot crop its reference")
    return blank_crop(image, mask)


def attention_region(attn_map: np.ndarray | torch.Tensor, size: tuple[int, int],
                     threshold: float = 0.5) -> np.ndarray | None:
    """A subject's region in a generated image from its cross-attention map.

    The map (h, w) is upsampled bilinearly to ``size`` = (height, width), divided by its
    maximum, and thresholded at ``threshold``. Returns a bool (H, W) array, or None when the
    map is empty (all zero / not finite).
    """
    m = torch.as_tensor(np.asarray(attn_map, dtype=np.float32))
    if m.ndim != 2 or not torch.isfinite(m).all():
        return None
    m = m.clamp(min=0)
    if m.shape != tuple(size):
        m = torch.nn.functional.interpolate(m[None, None], size=tuple(size), mode="bilinear",
                                            align_corners=False)[0, 0]
    top = float(m.max())
    if top <= 0:
        return None
    region = (m / top >= threshold).numpy()
    return region if region.any() else None


def attention_regions(maps: np.ndarray | torch.Tensor, size: int,
                      threshold: float | str = "otsu") -> list[np.ndarray | None]:
    """The subjects' regions in a square generated image from their attention maps (K, h, w).

    The same segmentation as the augmentation's pseudo masks
    (:func:`dynasyn.augment.masks.attention_masks`): per map min-max normalization, bilinear
    upsampling to ``size``, threshold (``"otsu"`` or a fraction in (0, 1)), overlaps between
    subjects resolved by the higher attention, cleaned, largest component. A map that is empty
    (all equal / not finite) gives None.
    """
    from dynasyn.augment.masks import attention_masks

    a = np.asarray(torch.as_tensor(maps).float().cpu().numpy(), dtype=np.float32)
    usable = [bool(np.isfinite(m).all() and m.max() > m.min()) for m in a]
    if not any(usable):
        return [None] * len(a)
    safe = np.where(np.isfinite(a), a, 0.0).clip(min=0)
    regions = attention_masks(safe, size, threshold=threshold)
    return [r if ok and r.any() else None for r, ok in zip(regions, usable, strict=True)]


def region_crop(image: ImageLike, attn_map: np.ndarray | torch.Tensor | None,
                threshold: float = 0.5) -> tuple[Image.Image, bool]:
    """The generated image cropped to the subject's attention region (as the reference crop).

    Returns ``(crop, True)``, or ``(whole image, False)`` when there is no usable map.
    """
    img = to_pil(image)
    region = None
    if attn_map is not None:
        region = attention_region(attn_map, (img.height, img.width), threshold)
    if region is None:
        return img, False
    return blank_crop(img, region), True


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic) and center-crop to ``size``²."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def pixel_values(images: Sequence[ImageLike], size: int, mean: Sequence[float],
                 std: Sequence[float]) -> torch.Tensor:
    """CLIP-style preprocessing: (N, 3, size, size) normalized floats."""
    arr = np.stack([np.asarray(_resize_crop(to_pil(im), size), dtype=np.float32) / 255.0
                    for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def embedding(out: Any, kind: str = "text") -> torch.Tensor:
    """The projected embedding from ``get_text_features`` / ``get_image_features``.

    transformers 4 returns a tensor; transformers 5 an output object whose ``pooler_output``
    holds the projection (``text_embeds`` / ``image_embeds`` on ``CLIPModel`` outputs).
    """
    if torch.is_tensor(out):
        return out
    for name in (f"{kind}_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if torch.is_tensor(value):
            return value
    raise TypeError(f"cannot find the {kind} embedding in a {type(out).__name__}")


def _preprocessor(path: Path) -> dict[str, Any]:
    f = path / "preprocessor_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def _size_from(proc: dict[str, Any], default: int) -> int:
    crop = proc.get("crop_size")
    if isinstance(crop, dict) and "height" in crop:
        return int(crop["height"])
    if isinstance(crop, int):
        return crop
    size = proc.get("size")
    if isinstance(size, dict):
        return int(size.get("shortest_edge") or size.get("height") or default)
    if isinstance(size, int):
        return size
    return default


def _resolve_model_dir(name: str | Path, what: str, fix: str) -> str:
    """A local directory (checked) or a hub id; ``micro`` is resolved by the caller."""
    import re

    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"{what} directory {p} has no config.json; {fix}")
        return str(p)
    if p.exists() or not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", str(name)):
        raise InputError(f"{what} {str(name)!r} is not a model directory nor a hub id; {fix}")
    return str(name)


# --------------------------------------------------------------------------------------------
# CLIP


class ClipScorer:
    """CLIP embeddings and similarities (CLIP-I, CLIP-T, identity-in-region).

    Args:
        model: a ``transformers.CLIPModel`` (put in eval mode, kept on its device).
        tokenizer: its tokenizer.
        image_size: side of the square model input.
        mean, std: per-channel normalization.
        max_length: token limit (default: the text tower's positions).
    """

    def __init__(self, model: Any, tokenizer: Any, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 max_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        positions = getattr(getattr(model.config, "text_config", None),
                            "max_position_embeddings", None)
        limits = [x for x in (max_length, positions, getattr(tokenizer, "model_max_length", None))
                  if isinstance(x, int) and 0 < x < 10**6]
        self.max_length = min(limits) if limits else 77
        self.name = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_name(cls, name: str | Path = "micro", device: str | torch.device = "cpu") -> ClipScorer:
        """Load ``"micro"`` (the bundled micro CLIP), a local directory or a hub id.

        Raises:
            InputError: the micro CLIP is not built, the directory is not a CLIP model, or
                the model cannot be loaded (one line with the fix).
        """
        from transformers import CLIPModel, CLIPTokenizer

        from dynasyn.models import quiet_libraries

        quiet_libraries()
        if str(name) == "micro":
            from dynasyn.micro.models import micro_clip_path

            p = micro_clip_path()
            if not (p / "config.json").is_file():
                raise InputError(f"the bundled micro CLIP is not installed ({p}); {MICRO_FIX}")
            ref = str(p)
        else:
            ref = _resolve_model_dir(name, "CLIP model", "pass a transformers CLIPModel "
                                     "directory or hub id to --clip-model")
        try:
            model = CLIPModel.from_pretrained(ref, dtype=torch.float32)
            tokenizer = CLIPTokenizer.from_pretrained(ref)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"cannot load CLIP model {str(name)!r} ({msg}); pass a "
                             "transformers CLIPModel directory with its tokenizer") from None
        proc = _preprocessor(Path(ref)) if Path(ref).is_dir() else {}
        size = _size_from(proc, int(model.config.vision_config.image_size))
        scorer = cls(model.to(torch.device(device)), tokenizer, size,
                     proc.get("image_mean", CLIP_MEAN), proc.get("image_std", CLIP_STD))
        scorer.name = str(name)
        return scorer

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Model inputs for ``images`` (PIL or uint8 arrays, any size)."""
        return pixel_values(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[ImageLike], batch: int = 32) -> torch.Tensor:
        """L2-normalized image embeddings, (N, D) float32 on the CPU."""
        feats = []
        for i in range(0, len(images), batch):
            x = self.preprocess(images[i : i + batch]).to(self.device)
            feats.append(embedding(self.model.get_image_features(pixel_values=x), "image"))
        return torch.nn.functional.normalize(torch.cat(feats).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """L2-normalized text embeddings, (N, D) float32 on the CPU (long texts truncated)."""
        feats = []
        for i in range(0, len(texts), batch):
            enc = self.tokenizer(list(texts[i : i + batch]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc.input_ids.to(self.device),
                                               attention_mask=enc.attention_mask.to(self.device))
            feats.append(embedding(out, "text"))
        return torch.nn.functional.normalize(torch.cat(feats).float(), dim=-1).cpu()

    def clip_i(self, generated: ImageLike, reference: ImageLike) -> float:
        """CLIP-I: cosine similarity of the two images' embeddings."""
        e = self.image_embeds([generated, reference])
        return float(e[0] @ e[1])

    def clip_t(self, image: ImageLike, text: str) -> float:
        """CLIP-T: cosine similarity of an image and a text (a class-noun rendering)."""
        return float(self.image_embeds([image])[0] @ self.text_embeds([text])[0])

    def identity_in_region(self, generated: ImageLike, attn_map: np.ndarray | torch.Tensor | None,
                           reference_crop: ImageLike, threshold: float = 0.5) -> tuple[float, bool]:
        """CLIP-I of the subject's reference crop and the generated image cropped to the
        subject's attention region; returns ``(score, region_used)`` (False: whole image)."""
        crop, used = region_crop(generated, attn_map, threshold)
        return self.clip_i(crop, reference_crop), used


# --------------------------------------------------------------------------------------------
# optional: ImageReward, DINO


def _image_reward_dir() -> Path:
    env = os.environ.get("DYNASYN_IMAGEREWARD_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ImageReward"


def image_reward_available() -> tuple[bool, str]:
    """Can ImageReward run offline? ``(True, "")`` or ``(False, why)``.

    Needs the ``ImageReward`` package (``pip install image-reward``) and its weights
    ``ImageReward.pt`` + ``med_config.json`` in ``$DYNASYN_IMAGEREWARD_DIR`` or
    ``~/.cache/ImageReward`` (where ``ImageReward.load`` puts them).
    """
    if importlib.util.find_spec("ImageReward") is None:
        return False, "the ImageReward package is not installed (pip install image-reward)"
    root = _image_reward_dir()
    missing = [f for f in ("ImageReward.pt", "med_config.json") if not (root / f).is_file()]
    if missing:
        return False, (f"no local ImageReward weights ({', '.join(missing)} not in {root}; "
                       "set DYNASYN_IMAGEREWARD_DIR)")
    return True, ""


class ImageRewardScorer:
    """ImageReward-v1.0 human-preference scores (optional; see :func:`image_reward_available`)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        ok, why = image_reward_available()
        if not ok:
            raise InputError(f"ImageReward unavailable: {why}")
        import ImageReward as RM  # type: ignore[import-not-found]

        root = _image_reward_dir()
        self.model = RM.load(str(root / "ImageReward.pt"), device=str(device),
                             med_config=str(root / "med_config.json"))

    @torch.no_grad()
    def score(self, prompt: str, images: Sequence[ImageLike]) -> list[float]:
        """One score per image for ``prompt`` (class-noun rendering)."""
        return [float(self.model.score(prompt, to_pil(im))) for im in images]


class DinoScorer:
    """DINO(v2) image similarity: cosine of the CLS tokens of a ``transformers`` vision model."""

    def __init__(self, model: Any, image_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.model = model.eval()
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_name(cls, name: str | Path, device: str | torch.device = "cpu") -> DinoScorer:
        """Load a DINO / DINOv2 / ViT model directory or hub id with ``AutoModel``."""
        from transformers import AutoModel

        ref = _resolve_model_dir(name, "DINO model", "pass a transformers DINO/ViT directory")
        try:
            model = AutoModel.from_pretrained(ref, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot load DINO model {str(name)!r} ({e})") from None
        proc = _preprocessor(Path(ref)) if Path(ref).is_dir() else {}
        size = _size_from(proc, int(getattr(model.config, "image_size", 224)))
        mean = proc.get("image_mean", (0.485, 0.456, 0.406))
        std = proc.get("image_std", (0.229, 0.224, 0.225))
        return cls(model.to(torch.device(device)), size, mean, std)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalized CLS embeddings (N, D) on the CPU."""
        x = pixel_values(images, self.image_size, self.mean, self.std)
        x = x.to(next(self.model.parameters()).device)
        cls_tok = self.model(pixel_values=x).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls_tok.float(), dim=-1).cpu()

    def similarity(self, a: ImageLike, b: ImageLike) -> float:
        """Cosine similarity of two images' DINO embeddings."""
        e = self.image_embeds([a, b])
        return float(e[0] @ e[1])


# --------------------------------------------------------------------------------------------
# aggregation


def mean_std(values: Iterable[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` of the finite values (population std; None when empty)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": round(float(arr.mean()), 6), "std": round(float(arr.std()), 6), "n": len(vals)}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (95 % for the default ``z``):
    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. Raises ValueError for
    ``n < 1`` or ``k`` outside ``[0, n]``."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denom = 1 + z2 / n
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def bootstrap_interval(groups: Sequence[tuple[int, int]], resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a pooled proportion over *groups* (clusters).

    ``groups`` are ``(k, n)`` counts, e.g. one per run (scene x seed); each resample draws as
    many groups with replacement and pools their counts, so the interval reflects how much
    the groups differ, not only how many images there are. None without two groups with data.
    """
    g = np.asarray([(k, n) for k, n in groups if n > 0], dtype=np.float64).reshape(-1, 2)
    if len(g) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(g), size=(resamples, len(g)))
    rates = g[idx, 0].sum(axis=1) / g[idx, 1].sum(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(rates, [a, 1 - a])
    return float(lo), float(hi)
