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


def test_aug_loss_value_on_a_two_subject_item():
    # slot 0: the prior's mass outside the item mask is cut; slot 1: a padding slot
    attn = torch.tensor([[[[2.0, 2.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]], requires_grad=True)
    prior = torch.tensor([[[[2.0, 1.0], [9.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]]], requires_grad=True)
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    # slot 0: g(A) = [[1, 1], [1, 0]]; g(M ⊙ Â) = [[.5, .25], [0, 1]] → (.25 + .5625 + 1 + 1) / 4
    slot0 = (0.25 + 0.5625 + 1.0 + 1.0) / 4
    loss = aug_loss(attn, prior, masks, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(slot0, rel=1e-6)
    # both slots: slot 1 has g(A) = [[1, 0], [0, 0]] against all ones → 3/4, summed over slots
    both = aug_loss(attn, prior, masks, torch.ones(1, 2))
    assert both.item() == pytest.approx(slot0 + 0.75, rel=1e-6)
    both.backward()
    assert attn.grad is not None and prior.grad is None  # sg(Â): only the placeholder learns


def test_aug_loss_follows_the_item_masks():
    """The same maps under another mask give another value (the masks are an input that
    matters), and prior mass outside the mask never does."""
    attn = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    prior = torch.tensor([[[[4.0, 2.0], [8.0, 8.0]]]])
    valid = torch.ones(1, 1)
    top = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    bottom = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    assert aug_loss(attn, prior, top, valid).item() == pytest.approx(0.0, abs=1e-7)
    assert aug_loss(attn, prior, bottom, valid).item() == pytest.approx((1 + 0.25 + 1 + 1) / 4)
    outside = prior.clone()
    outside[..., 1, :] = 1000.0
    assert aug_loss(attn, outside, top, valid).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("loss", ["m2a", "ica", "aug"])
def test_attention_losses_max_normalize_the_placeholder_map(loss):
    """g is applied to the placeholder's own map too (docs/decisions.md): scaling A_i by any
    positive factor changes nothing; a map proportional to its target has zero loss."""
    prior = torch.tensor([[[[4.0, 2.0], [1.0, 8.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    valid = torch.ones(1, 1)
    target = mask if loss == "m2a" else ica_target(prior, mask)

    def f(a):
        if loss == "m2a":
            return m2a_loss(a, mask, valid)
        return (ica_loss if loss == "ica" else aug_loss)(a, prior, mask, valid)

    assert f(0.03 * target).item() == pytest.approx(0.0, abs=1e-9)  # softmax-sized values
    attn = torch.tensor([[[[0.02, 0.05], [0.01, 0.04]]]])
    assert f(attn).item() > 0.1
    assert f(attn).item() == pytest.approx(f(17.0 * attn).item(), rel=1e-6)


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
