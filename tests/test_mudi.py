"""MuDI on this trainer: Seg-Mix compositions, the `mudi` preset's batches, and the
mean-shifted initial noise of `dynasyn generate --mean-shift`."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.cli import build_parser, main
from dynasyn.config import build_config
from dynasyn.generate import generate_images, mean_shifted_latents
from dynasyn.losses import resize_masks
from dynasyn.models import load_pipeline
from dynasyn.sampling import step_generator, step_rng
from dynasyn.scene import load_scene
from dynasyn.segmix import SCALE_RANGE, seg_mix
from dynasyn.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def _scene_tensors(size=64):
    """Three solid-colour rectangles on grey, one mask each."""
    image = torch.zeros(3, size, size)
    masks = torch.zeros(3, size, size)
    for i, (y, x, h, w) in enumerate([(4, 4, 20, 12), (30, 20, 10, 30), (40, 50, 20, 10)]):
        masks[i, y:y + h, x:x + w] = 1
        image[:, y:y + h, x:x + w] = COLOURS[i][:, None, None]
    return image, masks


@pytest.mark.parametrize("subjects", [[0, 1], [2, 0, 1], [1]])
def test_seg_mix_repastes_the_subjects_apart_on_white(subjects):
    image, masks = _scene_tensors()
    layouts = set()
    for seed in range(6):
        canvas, pasted = seg_mix(image, masks, subjects, random.Random(seed))
        assert canvas.shape == image.shape and pasted.shape == (len(subjects), 64, 64)
        assert pasted.sum(0).max() <= 1  # no two subjects overlap
        for slot, s in enumerate(subjects):
            m = pasted[slot] > 0
            assert m.any()
            # the subject's own pixels, nothing of the others
            assert torch.allclose(canvas[:, m], COLOURS[s][:, None].expand(3, int(m.sum())),
                                  atol=1e-5)
            # its scale: 0.75-1 of the largest that fits a 1/k slot (full height)
            ys, xs = torch.nonzero(m, as_tuple=True)
            h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
            oh, ow = int(masks[s].any(1).sum()), int(masks[s].any(0).sum())
            fit = min(64 / oh, (64 // len(subjects)) / ow)
            assert SCALE_RANGE[0] * fit - 0.1 <= max(h / oh, w / ow) <= fit + 0.1
        assert torch.all(canvas[:, pasted.sum(0) == 0] == 1.0)  # a fresh, white background
        layouts.add(tuple(int(v) for v in pasted.flatten().nonzero()[:3].flatten()))
    assert len(layouts) > 1  # positions change with the draw


def _trainer(model, scene, out, **kw):
    cfg = build_config("mudi", overrides=dict(model=str(model), scene=str(scene),
                                              phase1_steps=1, phase2_steps=1, **kw))
    return Trainer(cfg, out, progress=False)


def test_mudi_batches_train_on_the_seg_mix_composition(tiny_model, scene2, tmp_path, monkeypatch):
    import dynasyn.train as T

    calls = []

    def spy(image, masks, subjects, rng):
        out = seg_mix(image, masks, subjects, rng)
        calls.append((subjects, out))
        return out

    monkeypatch.setattr(T, "seg_mix", spy)
    tr = _trainer(tiny_model, scene2, tmp_path / "run", segmix_prob=1.0)
    assert (tr.lambdas["ica"], tr.lambdas["aug"], tr.lambdas["m2a"]) == (0.0, 0.0, 1e-2)
    batch = tr.scene_batch(step_rng(0, 0), step_generator(0, 0))
    (subjects, (canvas, pasted)), = calls
    assert subjects == batch["subsets"][0]
    k = len(subjects)
    # the losses' masks are the pasted subjects', not the scene's
    assert torch.equal(batch["masks"][0, :k], resize_masks(pasted, tr.att_size))
    assert torch.equal(batch["union"][0, 0], resize_masks(pasted, tr.latent_size).amax(0))
    assert not torch.equal(batch["union"][0, 0], tr.masks_lat[False][subjects].amax(0))
    # the noisy latent is the composition's: z = √ᾱ x0 + √(1-ᾱ) ε with x0 = E(canvas)
    lat = tr._encode(canvas)
    g = step_generator(0, 0)
    eps = torch.randn(lat.mean.shape, generator=g)
    x0 = (lat.mean + lat.std * eps) * tr.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    assert torch.allclose(batch["z"], tr.noise_scheduler.add_noise(x0, noise, t), atol=1e-5)
    # segmix_prob 0: the md preset's batch, draw for draw
    plain = _trainer(tiny_model, scene2, tmp_path / "plain", segmix_prob=0.0)
    md = Trainer(build_config("md", overrides=dict(model=str(tiny_model), scene=str(scene2),
                                                   phase1_steps=1, phase2_steps=1)),
                 tmp_path / "md", progress=False)
    a = plain.scene_batch(step_rng(0, 3), step_generator(0, 3))
    b = md.scene_batch(step_rng(0, 3), step_generator(0, 3))
    assert a["subsets"] == b["subsets"] and torch.equal(a["z"], b["z"])
    assert torch.equal(a["union"], b["union"])


def test_train_help_lists_mudi_and_segmix_prob_is_checked(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "mudi" in capsys.readouterr().out
    with pytest.raises(Exception, match="segmix_prob must be in"):
        build_config("mudi", overrides={"segmix_prob": 1.5})


def test_mean_shifted_noise_moves_the_mean_toward_the_composition(tiny_model, scene2, tmp_path):
    pipe = load_pipeline(str(tiny_model))
    scene = load_scene(scene2)
    plain = mean_shifted_latents(pipe, scene, [0, 1], 0.0, seed=5)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(plain, torch.randn(plain.shape, generator=g))  # γ 0: the usual noise
    shifted = mean_shifted_latents(pipe, scene, [0, 1], 2.0, seed=5)
    from dynasyn.segmix import compose_subjects

    image, masks = scene.tensors(64)
    canvas, _ = compose_subjects(image, masks, [0, 1], 5)
    z = pipe.vae.encode(canvas[None]).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(shifted - plain, 2.0 * z, atol=1e-5)
    assert torch.equal(mean_shifted_latents(pipe, scene, [], 2.0, seed=5), plain)
    # in generate: γ changes the images of prompts naming subjects, not the others
    pipe.set_progress_bar_config(disable=True)
    kw = dict(n=1, steps=2, progress=False, scene=scene)
    a = generate_images(pipe, ["a photo of a panda"], tmp_path / "a", **kw)
    b = generate_images(pipe, ["a photo of a panda"], tmp_path / "b", mean_shift=2.0, **kw)
    assert np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(b[0])))


def test_generate_mean_shift_on_a_run(tiny_model, scene2, tmp_path):
    run = tmp_path / "run"
    train(build_config("mudi", overrides=dict(model=str(tiny_model), scene=str(scene2),
                                              phase1_steps=1, phase2_steps=0)), run,
          progress=False)
    prompt = "<asset0> and <asset1>"
    outs = []
    for shift in ("0", "3"):
        out = tmp_path / f"gen{shift}"
        assert main(["generate", str(run), prompt, "-n", "1", "--steps", "2", "--out", str(out),
                     "--mean-shift", shift, "--no-progress", "--device", "cpu"]) == 0
        outs.append(np.asarray(Image.open(next(out.glob("*_0.png")))))
    assert not np.array_equal(*outs)
