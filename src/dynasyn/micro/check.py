"""Quality gates of the micro models (issue 4, item 4), printed as a table.

``python -m dynasyn.micro.check [--n N] [--weights DIR] [--strict]`` measures, on held-out
scenes (world seeds ``>= 10**9``; training uses seeds below):

1. **micro CLIP, true caption vs a one-attribute distractor** on ground-truth renders, per
   attribute: class, colour, pattern, action/relation (an action for one subject, a relation
   for two). A scene counts when the true caption scores higher than a caption differing in
   that one attribute (:func:`dynasyn.micro.world.distractor`). Gate: >= 90 % per attribute.
   Attributes a render cannot show are not asked: colour in grayscale, pattern in grayscale or
   sketch (outline only) scenes.
2. **micro SD samples** of held-out captions (full identity phrases, no grayscale scenes;
   DDIM, classifier-free guidance), judged
   - by micro CLIP against one-attribute distractors, every applicable attribute of every
     sample one judgement; gate: >= 60 % overall;
   - by the deterministic parser (:func:`dynasyn.micro.parse.parse_image`): a sample is right
     when every subject of its caption is found with the right colour *and* class; gate:
     >= 60 %.
   The same judges on the ground-truth renders of the same captions are printed beside them
   (what a perfect generator would score), and on those renders after a round trip through
   the micro SD's VAE (encode, decode: what a perfect UNet could score with this decoder).

It reports; the exit status is 0 unless ``--strict`` is given and a gate fails (then 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynasyn.micro.models import micro_weights_path
from dynasyn.micro.train import HELDOUT_SEED, clip_pixels, images_to_tensor
from dynasyn.micro.world import Render, SceneSpec, caption_for, distractor, sample_render

__all__ = [
    "ATTRIBUTES",
    "GATES",
    "CheckResult",
    "clip_accuracy",
    "main",
    "run_check",
    "heldout_captions",
    "samples_figure",
    "sd_accuracy",
    "vae_reconstructions",
]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "class": ("shape",),
    "colour": ("colour",),
    "pattern": ("pattern",),
    "action/relation": ("action", "relation"),
}
"""Reported attribute -> :func:`~dynasyn.micro.world.distractor` attribute(s)."""

GATES: dict[str, float] = {"clip": 0.90, "sd_clip": 0.60, "sd_parser": 0.60}
"""Issue 4's thresholds: micro CLIP per attribute; micro SD judged by CLIP / by the parser."""

_CLIP_SEEDS = HELDOUT_SEED
_SD_SEEDS = HELDOUT_SEED + 500_000_000


def _visible(spec: SceneSpec, attribute: str) -> bool:
    """Can a render of ``spec`` show ``attribute``?"""
    if attribute == "colour":
        return spec.background != "grayscale"
    if attribute == "pattern":
        return spec.background not in ("grayscale", "sketch")
    return True


def _distractor_caption(spec: SceneSpec, attribute: str, seed: int) -> str | None:
    rng = np.random.default_rng([seed, 5])
    for attr in ATTRIBUTES[attribute]:
        if not _visible(spec, attr):
            return None
        d = distractor(spec, attr, rng)
        if d is not None:
            return caption_for(d, "phrase")
    return None


class ClipJudge:
    """Cosine similarity of images and captions under micro CLIP."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """Normalized embeddings of uint8 (N, 64, 64, 3) images."""
        feats = []
        for i in range(0, len(images), 256):
            x = clip_pixels(images_to_tensor(list(images[i : i + 256]))).to(self.device)
            out = self.model.get_image_features(pixel_values=x)
            feats.append(_pooled(out))
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Normalized embeddings of captions."""
        feats = []
        for i in range(0, len(texts), 512):
            ids = self.tokenizer(texts[i : i + 512], padding=True, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            feats.append(_pooled(self.model.get_text_features(input_ids=ids)))
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def prefers_true(self, images: np.ndarray, true: list[str], false: list[str]) -> np.ndarray:
        """For each image, does its ``true`` caption score higher than its ``false`` one?"""
        img = self.image_features(images)
        t = self.text_features(true)
        f = self.text_features(false)
        return ((img * t).sum(-1) > (img * f).sum(-1)).cpu().numpy()


def _pooled(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def _heldout(base: int, n: int, want: Any, **spec_kwargs: Any) -> list[Render]:
    """The first ``n`` held-out renders (seeds from ``base``) for which ``want(render)``."""
    out: list[Render] = []
    seed = base
    while len(out) < n:
        r = sample_render(seed, **spec_kwargs)
        if want(r):
            out.append(r)
        seed += 1
    return out


def clip_accuracy(judge: ClipJudge, n: int) -> dict[str, float]:
    """Per attribute: share of ``n`` held-out renders where micro CLIP prefers the true
    caption over a one-attribute distractor."""
    acc: dict[str, float] = {}
    for k, attribute in enumerate(ATTRIBUTES):
        base = _CLIP_SEEDS + 10_000_000 * k
        renders = _heldout(base, n, lambda r, a=attribute: _distractor_caption(
            r.spec, a, r.seed) is not None)
        false = [_distractor_caption(r.spec, attribute, r.seed) or "" for r in renders]
        true = [r.caption("phrase") for r in renders]
        ok = judge.prefers_true(np.stack([r.image for r in renders]), true, false)
        acc[attribute] = float(ok.mean())
    return acc


def _parser_correct(image: np.ndarray, spec: SceneSpec) -> bool:
    from dynasyn.micro.parse import parse_image

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # the parser on noisy samples
        found = {(s["colour"], s["shape"]) for s in parse_image(image)}
    return all((s.colour, s.shape) in found for s in spec.subjects)


@torch.no_grad()
def sample_images(
    sd_path: Path,
    captions: list[str],
    device: torch.device,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    batch: int = 50,
    progress: bool = True,
) -> np.ndarray:
    """uint8 (N, 64, 64, 3) samples of the micro SD at ``sd_path`` for ``captions``."""
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    pipe = StableDiffusionPipeline.from_pretrained(sd_path, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(captions), batch), desc="sample", disable=not progress):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        imgs = pipe(captions[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                    generator=gen, output_type="np").images
        out.append((np.asarray(imgs) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def vae_reconstructions(sd_path: Path, images: np.ndarray, device: torch.device,
                        batch: int = 100) -> np.ndarray:
    """uint8 decodings of the micro SD VAE's latents (posterior means) of uint8 ``images``:
    the most a sample of this VAE can show of a render."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd_path / "vae", dtype=torch.float32).to(device).eval()
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(list(images[i : i + batch])).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
                   .numpy())
    return np.concatenate(out)


def heldout_captions(n: int) -> list[Render]:
    """The ``n`` held-out scenes whose captions micro SD is sampled for (no grayscale)."""
    return _heldout(_SD_SEEDS, n, lambda r: r.spec.background != "grayscale")


def samples_figure(samples: np.ndarray, renders: list[Render], cols: int = 8,
                   rows: int = 2, scale: int = 2) -> Any:
    """A picture of the first ``cols * rows`` held-out captions: for each, the world's render
    (top) above micro SD's sample (bottom), upscaled ``scale`` times, the caption under them."""
    from PIL import Image, ImageDraw

    from dynasyn.generate import draw_caption

    side = 64 * scale
    cap_h = 4 * 11 + 4
    count = min(len(samples), cols * rows)
    fig = Image.new("RGB", (cols * side, rows * (2 * side + cap_h)), "white")
    draw = ImageDraw.Draw(fig)
    for i in range(count):
        x, y = (i % cols) * side, (i // cols) * (2 * side + cap_h)
        for k, arr in enumerate((renders[i].image, samples[i])):
            tile = Image.fromarray(np.asarray(arr)).resize((side, side), Image.NEAREST)
            fig.paste(tile, (x, y + k * side))
        draw_caption(draw, (x + 2, y + 2 * side + 2), renders[i].caption("phrase"), side, 4)
    return fig


def sd_accuracy(
    judge: ClipJudge,
    sd_path: Path,
    n: int,
    device: torch.device,
    steps: int = 25,
    guidance: float = 5.0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """Micro SD samples of ``n`` held-out captions judged by micro CLIP and by the parser.

    Returns ``({"samples": {...}, "renders": {...}, "reconstructions": {...}}, samples)``: the
    numbers of the samples, of the ground-truth renders of the same captions and of those
    renders passed through the VAE (:func:`vae_reconstructions`), and the uint8 samples (in
    the order of :func:`heldout_captions`).
    """
    renders = heldout_captions(n)
    captions = [r.caption("phrase") for r in renders]
    samples = sample_images(sd_path, captions, device, steps, guidance, progress=progress)
    truth = np.stack([r.image for r in renders])
    recon = vae_reconstructions(sd_path, truth, device)
    result: dict[str, dict[str, float]] = {}
    for name, images in (("samples", samples), ("renders", truth), ("reconstructions", recon)):
        row: dict[str, float] = {}
        hits = total = 0
        for attribute in ATTRIBUTES:
            idx = [i for i, r in enumerate(renders)
                   if _distractor_caption(r.spec, attribute, r.seed) is not None]
            if not idx:
                continue
            false = [_distractor_caption(renders[i].spec, attribute, renders[i].seed) or ""
                     for i in idx]
            ok = judge.prefers_true(images[idx], [captions[i] for i in idx], false)
            row[attribute] = float(ok.mean())
            hits += int(ok.sum())
            total += len(idx)
        row["clip_overall"] = hits / max(total, 1)
        row["parser_class_colour"] = float(np.mean(
            [_parser_correct(im, r.spec) for im, r in zip(images, renders, strict=True)]
        ))
        result[name] = row
    return result, samples


@dataclass
class CheckResult:
    """The measured numbers (fractions) and whether each gate holds."""

    clip: dict[str, float]
    sd: dict[str, float]
    renders: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    reconstructions: dict[str, float] = field(default_factory=dict)
    """The judges on the renders after a VAE round trip (what the decoder can show)."""

    @property
    def gates(self) -> dict[str, bool]:
        """Gate name -> passed."""
        g = {f"clip {a}": self.clip[a] >= GATES["clip"] for a in self.clip}
        if self.sd:
            g["sd clip overall"] = self.sd["clip_overall"] >= GATES["sd_clip"]
            g["sd parser class+colour"] = self.sd["parser_class_colour"] >= GATES["sd_parser"]
        return g

    @property
    def passed(self) -> bool:
        """All gates hold."""
        return all(self.gates.values())

    def table(self) -> str:
        """The report as a plain-text table."""
        s = self.settings
        lines = [
            f"micro CLIP: true caption vs one-attribute distractor "
            f"({s.get('n')} held-out renders per attribute)",
            f"  {'attribute':<26}{'accuracy':>10}{'gate':>9}",
        ]
        for a, v in self.clip.items():
            lines.append(f"  {a:<26}{_pct(v):>10}{_gate(v, GATES['clip']):>9}")
        if self.sd:
            lines += [
                "",
                f"micro SD: {s.get('n')} held-out captions, DDIM {s.get('steps')} steps, "
                f"guidance {s.get('guidance')}",
                f"  {'judge':<26}{'samples':>10}{'renders':>10}{'VAE rec.':>10}{'gate':>9}",
            ]

            def row(label: str, key: str, gate: float | None = None) -> str:
                rec = self.reconstructions.get(key)
                return (f"  {label:<26}{_pct(self.sd[key]):>10}{_pct(self.renders[key]):>10}"
                        f"{'-' if rec is None else _pct(rec):>10}"
                        + ("" if gate is None else f"{_gate(self.sd[key], gate):>9}"))

            lines += [row("CLIP " + a, a) for a in ATTRIBUTES if a in self.sd]
            lines.append(row("CLIP overall", "clip_overall", GATES["sd_clip"]))
            lines.append(row("parser class + colour", "parser_class_colour", GATES["sd_parser"]))
        lines += ["", "all gates hold" if self.passed else
                  "gates failing: " + ", ".join(k for k, ok in self.gates.items() if not ok)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The numbers, settings and gates as JSON-ready data."""
        return {"clip": self.clip, "sd": self.sd, "renders": self.renders,
                "reconstructions": self.reconstructions, "settings": self.settings,
                "gates": self.gates, "passed": self.passed}


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _gate(v: float, g: float) -> str:
    return f">={100 * g:.0f} " + ("ok" if v >= g else "NO")


def run_check(
    n: int = 200,
    weights: Path | None = None,
    device: torch.device | None = None,
    steps: int = 25,
    guidance: float = 5.0,
    sd: bool = True,
    samples_png: Path | None = None,
    progress: bool = True,
) -> CheckResult:
    """Measure the gates with the bundle under ``weights`` (``clip/`` and ``sd/``)."""
    weights = weights or micro_weights_path()
    device = device or torch.device("cpu")
    for sub in ("clip",) + (("sd",) if sd else ()):
        if not (weights / sub).is_dir():
            raise FileNotFoundError(
                f"{weights / sub} does not exist: build the bundle with "
                "`python -m dynasyn.micro.train` or pass --weights DIR"
            )
    judge = ClipJudge(weights / "clip", device)
    clip = clip_accuracy(judge, n)
    sd_row: dict[str, float] = {}
    renders_row: dict[str, float] = {}
    recon_row: dict[str, float] = {}
    if sd:
        res, samples = sd_accuracy(judge, weights / "sd", n, device, steps, guidance, progress)
        sd_row, renders_row, recon_row = res["samples"], res["renders"], res["reconstructions"]
        if samples_png is not None and len(samples):
            samples_figure(samples, heldout_captions(n)).save(samples_png)
    return CheckResult(clip, sd_row, renders_row,
                       {"n": n, "steps": steps, "guidance": guidance, "weights": str(weights)},
                       recon_row)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m dynasyn.micro.check --help``."""
    from dynasyn.models import pick_device, quiet_libraries

    ap = argparse.ArgumentParser(
        prog="python -m dynasyn.micro.check",
        description="Measure the micro models' quality gates on held-out scenes and print them.",
        epilog="examples:\n"
        "  python -m dynasyn.micro.check                  # the bundled weights, n = 200\n"
        "  python -m dynasyn.micro.check --n 50 --weights /tmp/bundle --strict\n"
        "  python -m dynasyn.micro.check --json gates.json --samples-png samples.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--n", type=int, default=200,
                    help="held-out scenes per attribute and SD captions (default 200)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="bundle directory with sd/ and clip/ (default: the package's)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps of the SD samples")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance")
    ap.add_argument("--clip-only", action="store_true", help="skip the SD samples")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--samples-png", type=Path, default=None,
                    help="save the first 16 held-out captions' renders and SD samples here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a gate fails")
    args = ap.parse_args(argv)
    quiet_libraries()
    device = pick_device(args.device)
    if device.type == "mps":
        device = torch.device("cpu")
    try:
        result = run_check(args.n, args.weights, device, args.steps, args.guidance,
                           sd=not args.clip_only, samples_png=args.samples_png)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 1 if args.strict and not result.passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
