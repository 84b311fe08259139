"""``dynasyn zeroshot``: render a scene's subjects in new prompts with no training (DynamicID).

Wired into the ``dynasyn`` command by ``dynasyn.cli`` through :func:`add_parser` and
:func:`run`. Every check of the input (scene, prompts, references, boxes, weights and their fit
to the model) runs before anything is written; bad input raises
:class:`~dynasyn.errors.InputError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dynasyn.errors import InputError

__all__ = ["EXAMPLES", "add_parser", "parse_box", "run"]

EXAMPLES = """examples:
  dynasyn zeroshot scene/ "<asset0> is sleeping" "<asset0> is on top of <asset1>" \\
      --out zs --weights runs/dynamicid-train/weights -n 4
  dynasyn zeroshot scene/ "<asset1> is jumping" --refs star.png ball.png --out zs --weights W
  dynasyn zeroshot scene/ "<asset0> is next to <asset1>" --boxes 4,20,30,60 34,20,60,60 \\
      --out zs --weights W                # one box per subject, pixels of the output image

The scene directory (photo + one mask per subject + scene.json with class nouns, as for
`dynasyn train`) gives each subject's reference crop and class noun; <asset0>, <asset1>, ...
name the subjects in mask order and are replaced by their class nouns in the text, while the
ID tokens of the crops say which subject it is. --boxes auto (default) takes the subjects'
boxes from the prompt's layout in the micro world (vertical slices for other prompts);
--boxes none switches the confinement off. Images are written as `dynasyn generate` writes
them: OUT/<prompt-slug>_<seed>.png and OUT/<prompt-slug>_grid.png.
"""


def add_parser(subparsers: Any, add_scene_args: Any = None) -> None:
    """Add the ``zeroshot`` subcommand to the ``dynasyn`` parser's subparsers.

    ``add_scene_args(parser)`` adds the positional scene and the scene options every
    scene-taking command of ``dynasyn`` shares; without it, a plain scene and ``--classes``.
    """
    p = subparsers.add_parser(
        "zeroshot", help="render a scene's subjects in new prompts with no training (DynamicID)",
        description="Zero-shot multi-subject personalization (DynamicID: SAA + IMR): the "
        "scene's subjects, given by reference crops, rendered by the prompts with no "
        "per-scene training.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_scene_args is not None:  # the dynasyn CLI's shared scene options
        add_scene_args(p)
    else:
        p.add_argument("scene", help="scene directory (image, mask0.png..., scene.json)")
        p.add_argument("--classes", nargs="+", help="class noun per mask (overrides scene.json)")
    p.add_argument("prompts", nargs="+", help="prompts using <asset0>, <asset1>, ...")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (4)")
    p.add_argument("--seed", type=int, default=0, help="first seed (images use seed..seed+n-1)")
    p.add_argument("--model", default="micro",
                   help="base pipeline: micro (bundled, default), a local directory or hub id")
    p.add_argument("--weights", help="DynamicID weights directory (from `python -m "
                   "dynasyn.dynamicid.train`; default: the bundled one, when there is one)")
    p.add_argument("--boxes", nargs="+", metavar="auto|none|X0,Y0,X1,Y1",
                   help="auto (default): from the prompt's layout; none: no confinement; or one "
                   "box per subject in mask order, pixels of the output image")
    p.add_argument("--refs", nargs="+", metavar="IMAGE",
                   help="one reference image per subject (mask order) instead of the scene's "
                   "crops")
    p.add_argument("--steps", type=int, help="DDIM steps (default 25 for micro, else 50)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance (default 5 for micro, else 7.5)")
    p.add_argument("--id-scale", type=float, default=1.0, help="weight of the ID branch (1)")
    p.add_argument("--no-gate", action="store_true",
                   help="ablation: no activation gate (plain decoupled attention)")
    p.add_argument("--no-imr", action="store_true", help="ablation: do not reconfigure motion")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_box(text: str, width: int, height: int) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` in pixels of a ``width`` x ``height`` image -> a normalized box.

    Raises InputError for a malformed box, an empty one, or one outside the image.
    """
    parts = text.split(",")
    try:
        x0, y0, x1, y1 = (float(v) for v in parts)
    except ValueError:
        raise InputError(f"box {text!r} is not x0,y0,x1,y1 (four numbers, pixels of the "
                         f"{width}x{height} output image)") from None
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"box {text!r} is empty: it needs x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(f"box {text!r} is outside the {width}x{height} image; keep "
                         f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def _weights_dir(args: argparse.Namespace) -> Path:
    from dynasyn.dynamicid.train import default_out

    if args.weights is None:
        bundled = default_out()
        if args.model == "micro" and (bundled / "dynamicid.json").is_file():
            return bundled
        raise InputError(
            "no DynamicID weights are bundled yet: train them with `python -m "
            "dynasyn.dynamicid.train --out DIR` and pass --weights DIR"
            if args.model == "micro" else
            f"pass --weights DIR trained for --model {args.model} (python -m "
            "dynasyn.dynamicid.train --model ... --out DIR)")
    p = Path(args.weights)
    if p.is_file():
        raise InputError(
            f"--weights {p} is a file (an official SAA checkpoint has no ID encoder); pass a "
            "weights directory from `python -m dynasyn.dynamicid.train`, or load official "
            "checkpoints in Python with dynasyn.dynamicid.load(pipe, file)")
    if not p.is_dir():
        raise InputError(f"--weights {p} does not exist; check the path")
    return p


def _read_refs(paths: list[str]) -> list[Any]:
    from PIL import Image

    out = []
    for f in paths:
        try:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise InputError(f"--refs {f}: cannot read the image ({type(e).__name__}); pass "
                             "PNG / JPEG files") from None
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``dynasyn zeroshot``; returns the exit status (bad input raises InputError)."""
    import torch

    from dynasyn.dynamicid.pipeline import load, prompt_identities
    from dynasyn.dynamicid.weights import read_weights
    from dynasyn.generate import make_grid, slug
    from dynasyn.models import load_pipeline, pick_device
    from dynasyn.scene import MASK_THRESHOLD, load_scene

    if args.num_images < 1:
        raise InputError("-n must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise InputError("--steps must be >= 1")
    if args.id_scale < 0:
        raise InputError("--id-scale must be >= 0")
    scene = load_scene(args.scene, classes=args.classes)
    k = len(scene)
    for prompt in args.prompts:
        for i in prompt_identities(prompt):
            if i >= k:
                raise InputError(
                    f"prompt {prompt!r} names <asset{i}> but scene {args.scene} has {k} "
                    f"subject{'s' if k != 1 else ''} ({', '.join(scene.placeholders)}); use "
                    "one of those")
    if args.refs is not None:
        if len(args.refs) != k:
            raise InputError(f"--refs gives {len(args.refs)} images but the scene has {k} "
                             "subjects; give one reference per subject, in mask order")
        refs = _read_refs(args.refs)
        masks: list[Any] = [None] * k
    else:
        refs = [scene.image] * k
        masks = [(m >= MASK_THRESHOLD) for m in scene.masks]
    boxes_arg = args.boxes or ["auto"]
    if len(boxes_arg) == 1 and boxes_arg[0] in ("auto", "none"):
        mode = boxes_arg[0]
    elif any(b in ("auto", "none") for b in boxes_arg):
        raise InputError("--boxes takes auto, none, or one x0,y0,x1,y1 box per subject")
    else:
        mode = "explicit"
        if len(boxes_arg) != k:
            raise InputError(f"--boxes gives {len(boxes_arg)} boxes but the scene has {k} "
                             "subjects; give one x0,y0,x1,y1 per subject, in mask order")
    wdir = _weights_dir(args)
    read_weights(wdir)  # refuses a directory that is not DynamicID weights
    micro = args.model == "micro"
    steps = args.steps or (25 if micro else 50)
    guidance = args.guidance if args.guidance is not None else (5.0 if micro else 7.5)
    base = load_pipeline(args.model)
    from diffusers import DDIMScheduler

    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    size_h = size_w = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
    boxes: Any = None
    if mode == "explicit":
        boxes = [parse_box(b, size_w, size_h) for b in boxes_arg]
    elif mode == "auto":
        boxes = "auto"
    pipe = load(base, wdir, classes=scene.classes)  # InputError when the layout does not fit
    pipe.to(pick_device(args.device))
    base.set_progress_bar_config(disable=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    t0 = time.perf_counter()
    count = 0
    from tqdm.auto import tqdm

    for prompt in tqdm(args.prompts, desc="zeroshot", disable=args.no_progress):
        images = []
        for j in range(args.num_images):
            g = torch.Generator(device="cpu").manual_seed(args.seed + j)
            im = pipe(prompt, id_images=refs, id_masks=masks, id_boxes=boxes,
                      id_scale=args.id_scale, gate=not args.no_gate, use_imr=not args.no_imr,
                      num_inference_steps=steps, guidance_scale=guidance,
                      generator=g).images[0]
            images.append(im)
            count += 1
            p = out / f"{slug(prompt)}_{args.seed + j}.png"
            _save_png(im, p)
            written.append(p)
        grid = out / f"{slug(prompt)}_grid.png"
        _save_png(make_grid(images), grid)
    seconds = time.perf_counter() - t0
    info = {"scene": str(args.scene), "prompts": args.prompts, "model": args.model,
            "weights": str(wdir), "n": args.num_images, "seed": args.seed, "steps": steps,
            "guidance": guidance, "boxes": boxes if not isinstance(boxes, list) else
            [list(b) for b in boxes], "refs": args.refs, "id_scale": args.id_scale,
            "gate": not args.no_gate, "imr": not args.no_imr and pipe.imr is not None,
            "seconds": round(seconds, 2), "seconds_per_image": round(seconds / max(count, 1), 3)}
    tmp = out / ".zeroshot.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "zeroshot.json")
    print(f"wrote {len(written)} images and {len(args.prompts)} grid(s) to {out} "
          f"({seconds / max(count, 1):.2f} s per image)")
    return 0


def _save_png(im: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    tmp.replace(path)
