"""Loss terms on small constructed tensors; expected values computed by hand here."""

from __future__ import annotations

import pytest
import torch

from dynasyn.losses import (
    aug_loss,
    ica_loss,
    ica_target,
    m2a_loss,
    masked_diffusion_loss,
    normalize_max,
    resize_masks,
    total_loss,
)


def test_masked_diffusion_averages_over_all_latent_elements():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one of 4 pixels
    # 2 channels × 1 pixel with squared error 1, divided by all 8 elements
    assert masked_diffusion_loss(pred, target, mask).item() == pytest.approx(2 / 8)
    # outside the mask nothing counts
    pred2 = pred.clone()
    pred2[..., 1, 1] = 100.0
    assert masked_diffusion_loss(pred2, target, mask).item() == pytest.approx(2 / 8)


def test_normalize_max_per_map():
    x = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]], [[0.5, 0.5], [0.25, 0.0]]]])
    g = normalize_max(x)
    assert torch.allclose(g[0, 0], torch.tensor([[0.25, 0.5], [1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(g[0, 1], torch.tensor([[1.0, 1.0], [0.5, 0.0]]), atol=1e-6)


def test_m2a_sums_subjects_and_ignores_padding_slots():
    attn = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[9.0, 0.0], [0.0, 9.0]]]])
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    valid = torch.tensor([[1.0, 1.0, 0.0]])
    # slot 0: g(A) = [[1,0],[0,0]] vs [[1,1],[0,0]] → mse 1/4; slot 1: exact → 0; slot 2 padded
    assert m2a_loss(attn, masks, valid).item() == pytest.approx(0.25)
    # batch mean: a second item with loss 0.5 → (0.25 + 0.5) / 2
    # item 2, slot 0 only: g(A) = [[1,0],[0,0]] vs [[0,1],[0,0]] → mse 2/4
    a_b = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]).view(1, 3, 2, 2)
    m_b = torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).view(1, 3, 2, 2)
    attn2, masks2 = torch.cat([attn, a_b]), torch.cat([masks, m_b])
    valid2 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert m2a_loss(attn2, masks2, valid2).item() == pytest.approx((0.25 + 0.5) / 2)


def test_ica_target_is_masked_prior_normalized_and_detached():
    prior = torch.tensor([[[[4.0, 2.0], [1.0, 8.0]]]], requires_grad=True)
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    t = ica_target(prior, mask)
    assert torch.allclose(t, torch.tensor([[[[1.0, 0.5], [0.25, 0.0]]]]))
    assert not t.requires_grad


def test_ica_loss_value_and_gradient_only_through_placeholder_map():
    attn = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]], requires_grad=True)
    prior = torch.tensor([[[[4.0, 2.0], [1.0, 8.0]]]], requires_grad=True)
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    valid = torch.ones(1, 1)
    # g(A) = 1 everywhere; target [[1, .5], [.25, 0]] → ((0)^2 + .5^2 + .75^2 + 1^2) / 4
    expected = (0 + 0.25 + 0.5625 + 1.0) / 4
    loss = ica_loss(attn, prior, mask, valid)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert attn.grad is not None and prior.grad is None
    # L_AUG has the same form on an augmented item
    assert aug_loss(attn, prior, mask, valid).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_weights_terms():
    terms = {"md": torch.tensor(2.0), "m2a": torch.tensor(3.0), "ica": torch.tensor(5.0)}
    lam = {"md": 1.0, "m2a": 1e-2, "ica": 5e-3, "aug": 1e-4}
    assert total_loss(terms, lam).item() == pytest.approx(2 + 0.03 + 0.025)


def test_resize_masks_area_then_threshold_and_small_subjects_survive():
    m = torch.zeros(2, 8, 8)
    m[0, :4, :4] = 1  # exactly the top-left quarter
    m[1, 0, 0] = 1  # one pixel: area 1/16 at 2×2 → would vanish at 0.5
    r = resize_masks(m, 2)
    assert r[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert r[1].sum() >= 1  # never empty: falls back to "any coverage"
