"""Class images for Break-a-Scene's prior preservation, rendered by the base model and cached.

The official Break-a-Scene code renders ``num_class_images`` (100) images of its class prompt
("a photo at the beach") with the untouched base pipeline at its default settings (50 steps,
guidance 7.5) into a class-data directory that later runs reuse; missing images are added.
Here image ``j`` starts from the noise of seed ``j`` (batches of 4 images) and is written
atomically as ``NNNN.png``; the directory's ``class_images.json`` names what rendered them.

The default directory is ``$DYNASYN_CACHE/class-images/<key>`` (``DYNASYN_CACHE`` defaults to
``$XDG_CACHE_HOME/dynasyn`` or ``~/.cache/dynasyn``), the key a hash of the model, the prompt,
the resolution and the sampler settings, so runs on one model share them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynasyn.atomic import atomic_file
from dynasyn.errors import InputError

STEPS = 50
GUIDANCE = 7.5
BATCH = 4
MANIFEST = "class_images.json"


def cache_root() -> Path:
    """``$DYNASYN_CACHE``, else ``$XDG_CACHE_HOME/dynasyn``, else ``~/.cache/dynasyn``."""
    env = os.environ.get("DYNASYN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynasyn"


def settings(model_id: str, prompt: str, resolution: int) -> dict:
    """What determines the class images (recorded in the manifest, hashed for the key)."""
    return dict(model=model_id, prompt=prompt, resolution=resolution, steps=STEPS,
                guidance=GUIDANCE, seeds="image j: seed j")


def default_dir(model_id: str, prompt: str, resolution: int) -> Path:
    """The shared cache directory of these settings."""
    key = hashlib.sha256(json.dumps(settings(model_id, prompt, resolution),
                                    sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "class-images" / key


def image_path(directory: Path, j: int) -> Path:
    return directory / f"{j:04d}.png"


def ensure_class_images(pipe, model_id: str, prompt: str, count: int, resolution: int,
                        directory: str | Path | None = None, process: int = 0,
                        num_processes: int = 1, progress: bool = False) -> Path:
    """Render the missing ones of images ``0 … count-1`` with ``pipe`` (the base model) into
    ``directory`` (default :func:`default_dir`); process ``p`` of ``n`` renders every n-th.

    Returns the directory. Images already there are kept (the cache), whatever made them.
    """
    from tqdm.auto import tqdm

    d = Path(directory) if directory else default_dir(model_id, prompt, resolution)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the class-image directory {d} ({e.strerror}); "
                         "set class_data_dir or DYNASYN_CACHE") from None
    missing = [j for j in range(count) if j % num_processes == process
               and not image_path(d, j).is_file()]
    if not missing:
        return d
    if process == 0 and not (d / MANIFEST).is_file():
        with atomic_file(d / MANIFEST) as tmp:
            tmp.write_text(json.dumps(settings(model_id, prompt, resolution), indent=1))
    pipe.set_progress_bar_config(disable=True)
    batches = [missing[i:i + BATCH] for i in range(0, len(missing), BATCH)]
    for batch in tqdm(batches, desc="class images", unit="batch", disable=not progress):
        gens = [torch.Generator().manual_seed(j) for j in batch]
        images = pipe([prompt] * len(batch), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      height=resolution, width=resolution, generator=gens).images
        for j, im in zip(batch, images, strict=True):
            with atomic_file(image_path(d, j)) as tmp:
                im.save(tmp, format="PNG")
    return d


def load_class_images(directory: str | Path, count: int, resolution: int) -> torch.Tensor:
    """Images ``0 … count-1`` of ``directory`` as one (count, 3, R, R) tensor in [-1, 1]."""
    d = Path(directory)
    out = []
    for j in range(count):
        p = image_path(d, j)
        if not p.is_file():
            raise InputError(f"class image {p} is missing; delete {d} to render it again")
        im = Image.open(p).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)
