"""L_AUG's wiring in the trainer, pinned against a value computed here from first principles.

For one augmented item the trainer must use: the item's own masks (not the scene's), the
placeholder prompt in the student pass (the pass that trains), and the class prompt in the
stop-gradient prior pass. Each test also checks that every one of those three mistakes would
give a clearly different value, so the test cannot pass with the wiring broken.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.attention import capturing, get_store
from dynasyn.augment.data import write_item
from dynasyn.config import build_config
from dynasyn.losses import aug_loss, resize_masks
from dynasyn.sampling import step_generator, step_rng
from dynasyn.tokens import encode_template, placeholder, token_weights
from dynasyn.train import Trainer

TEMPLATE = "{0} is throwing the {1}"
SUBJECTS = [1, 0]  # slot 0 is subject 1: slot order differs from subject order


@pytest.fixture
def aug_dir(tmp_path):
    """One two-subject item whose masks lie where the scene's subjects are not.

    The scene (``scene2``) has subject 0 top-left and subject 1 top-right; here subject 1
    (slot 0) is bottom-left and subject 0 (slot 1) bottom-right.
    """
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    m1, m0 = np.zeros((64, 64)), np.zeros((64, 64))
    m1[36:60, 4:28] = 1
    m0[36:60, 36:60] = 1
    write_item(tmp_path / "aug", "0000", img, [m1, m0], {
        "template": TEMPLATE, "subjects": SUBJECTS, "seed": 0, "phrase_prompt": TEMPLATE,
        "class_prompt": TEMPLATE, "placeholder_prompt": TEMPLATE})
    return str(tmp_path / "aug")


def _trainer(model, scene, aug, out, phase, **kw) -> Trainer:
    cfg = build_config("dynasyn", overrides=dict(
        model=str(model), scene=str(scene), augmented=aug, phase1_steps=2, phase2_steps=2,
        lambda_aug=1.0, **kw))
    tr = Trainer(cfg, out, progress=False)
    # placeholders start as their class nouns' embeddings: move them away, or the placeholder
    # and class prompts would give the same maps and a swap could not be seen
    with torch.no_grad():
        rows = tr.embedding[tr.orig_vocab:]
        g = torch.Generator().manual_seed(7)
        rows.copy_(torch.randn(rows.shape, generator=g) * tr.embedding[: tr.orig_vocab].std())
    tr.keep_original_rows()
    tr._setup_phase(phase)
    return tr


def _maps(tr: Trainer, unet, text_encoder, fills: list[str], z, t, grad: bool) -> torch.Tensor:
    """One UNet pass on ``TEMPLATE`` filled with ``fills``: the slots' cross-attention maps
    (stopped after the last capture layer, as the frozen prior copy holds nothing later)."""
    p = encode_template(tr.tokenizer, TEMPLATE, fills)
    with torch.set_grad_enabled(grad):
        enc = text_encoder(p.input_ids[None])[0]
        with capturing(get_store(unet), token_weights([p], len(fills)), stop_early=True) as maps:
            unet(z, t, enc)
    return maps[0]


def _reference(tr: Trainer, z, t) -> dict[str, torch.Tensor]:
    """L_AUG as the paper defines it, and as it would be under each wiring mistake."""
    ph = [placeholder(s) for s in SUBJECTS]
    cl = [tr.classes[s] for s in SUBJECTS]
    with tr._prior() as (prior_unet, prior_te):
        te = prior_te[0] if prior_te is not None else tr.text_encoder
        prior_cl = _maps(tr, prior_unet, te, cl, z, t, grad=False)
        prior_ph = _maps(tr, prior_unet, te, ph, z, t, grad=False)
    student_ph = _maps(tr, tr.unet, tr.text_encoder, ph, z, t, grad=True)
    student_cl = _maps(tr, tr.unet, tr.text_encoder, cl, z, t, grad=False)
    item_masks = resize_masks(tr.aug[0].masks, tr.att_size)[None]
    scene_masks = tr.masks_att[False][SUBJECTS][None]
    valid = torch.ones(1, 2)
    return {
        "right": aug_loss(student_ph, prior_cl, item_masks, valid),
        "scene masks": aug_loss(student_ph, prior_cl, scene_masks, valid),
        "class prompt in the student pass": aug_loss(student_cl, prior_cl, item_masks, valid),
        "placeholder prompt in the prior pass": aug_loss(student_ph, prior_ph, item_masks, valid),
    }


def _drawn_latent(tr: Trainer, gstep: int):
    """The noisy latent and timestep the trainer draws for the augmented item at ``gstep``."""
    rng, gen = step_rng(tr.cfg.seed, gstep, 0), step_generator(tr.cfg.seed, gstep, 0)
    tr.scene_batch(rng, gen)
    aug = tr.aug_batch(rng, gen)
    return aug["z"], aug["t"]


@pytest.mark.parametrize(("phase", "lambda_ica"), [(1, 5e-3), (1, 0.0), (2, 5e-3), (2, 0.0)])
def test_aug_term_uses_item_masks_placeholder_student_and_class_prior(
        phase, lambda_ica, tiny_model, scene2, aug_dir, tmp_path, one_thread):
    """lambda_ica > 0: the prior pass is shared with the scene's (joint); 0: its own pass (and
    L_AUG is the only term, so the gradients are L_AUG's alone). Phase 2 (full): the frozen
    prior copy and the cached class-prompt embeddings."""
    tr = _trainer(tiny_model, scene2, aug_dir, tmp_path / "run", phase, lambda_ica=lambda_ica,
                  lambda_md=0.0, lambda_m2a=0.0)
    z, t = _drawn_latent(tr, 0)
    ref = _reference(tr, z, t)
    right = float(ref["right"].detach())
    assert right > 0
    for mistake, value in ref.items():
        if mistake != "right":  # each mistake is 100x the tolerance below away from it
            assert abs(float(value.detach()) - right) > 1e-3 * right, mistake
    ref["right"].backward()  # the gradient flows through the student pass only
    expected = [None if p.grad is None else p.grad.clone() for p in tr.params]
    tr.optimizer.zero_grad(set_to_none=True)

    logs = tr.compute_gradients(0)
    assert logs["aug"] == pytest.approx(right, rel=1e-5)
    if lambda_ica > 0:
        return  # the gradients hold L_ICA's too
    assert tr.embedding.grad[tr.orig_vocab:].abs().sum() > 0  # the placeholders learn
    for p, want in zip(tr.params, expected, strict=True):
        assert (p.grad is None) == (want is None)
        if want is not None:
            assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-9)
