"""The loss terms of DynASyn as pure tensor functions.

Notation (paper): A_i is the cross-attention map of subject i's placeholder token, Â_i the map
of its class noun from the prior pass, M_i its mask at the attention resolution, s the sampled
subset, g(x) = x / max(x). Maps are (B, K, h, w); ``valid`` (B, K) marks the slots that belong
to the sampled subset of each batch item (padding slots are ignored). Each attention loss is
summed over the subjects of an item and averaged over the batch, as Break-a-Scene normalizes
its attention loss, so the paper's λ apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def normalize_max(x: torch.Tensor) -> torch.Tensor:
    """g(x) = x / max(x), the max taken over each map's pixels (last two dims)."""
    return x / (x.amax(dim=(-2, -1), keepdim=True) + EPS)


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Masks (…, H, W) in {0,1} → (…, size, size): area average, then binarized at 0.5.

    A subject too small to cover half of any cell keeps the cells it touches (a mask never
    becomes empty at latent or attention resolution).
    """
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    small = F.interpolate(flat, size=(size, size), mode="area")
    out = small >= 0.5
    empty = ~out.flatten(1).any(1)
    if empty.any():
        out[empty] = small[empty] > 0
    return out.to(masks.dtype).reshape(*lead, size, size)


def masked_diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, union_mask: torch.Tensor
) -> torch.Tensor:
    """L_MD (the paper's L_MD, Break-a-Scene's masked diffusion loss).

    ``‖M_s ⊙ (ε − ε_θ(z_t, t, γ(c)))‖²`` — or with v and v_θ for v-prediction models — where
    ``union_mask`` (B, 1, h, w) is M_s at latent resolution. Averaged over all latent elements.
    """
    return F.mse_loss(pred.float() * union_mask, target.float() * union_mask, reduction="mean")


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Break-a-Scene's (DreamBooth's) prior preservation loss: ``‖ε − ε_θ(z_t, t, γ(c_class))‖²``
    on a class image rendered by the base model, unmasked, averaged over all latent elements."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _attention_mse(
    attn: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Σ_{i∈s} MSE(g(A_i), target_i), averaged over the batch."""
    per_map = ((normalize_max(attn.float()) - target.float()) ** 2).mean(dim=(-2, -1))  # (B, K)
    return (per_map * valid.float()).sum(dim=1).mean()


def m2a_loss(attn: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_M2A (the paper's L_M2A, Break-a-Scene's masked attention loss).

    ``Σ_{i∈s} ‖A_i / max A_i − M_i‖²`` (mean over pixels), with M_i at attention resolution.
    """
    return _attention_mse(attn, masks, valid)


def ica_target(prior_attn: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The ICA target g(M_i ⊙ Â_i) (the paper's ICA target), with stop-gradient on Â_i."""
    return normalize_max(masks.float() * prior_attn.detach().float())


def ica_loss(
    attn: torch.Tensor, prior_attn: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """L_ICA (the paper's class-specific attention regularization).

    ``Σ_{i∈s} ‖A_i / max A_i − g(M_i ⊙ sg(Â_i))‖²``: the placeholder's map is pulled toward
    the class noun's map from the prior model, restricted to the subject's mask.
    """
    return _attention_mse(attn, ica_target(prior_attn, masks), valid)


def aug_loss(
    attn: torch.Tensor, prior_attn: torch.Tensor, aug_masks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """L_AUG (the paper's L_AUG: the attention loss on an augmented image).

    Same form as L_ICA on an augmented item: ``Σ_i ‖g(A_i) − g(M^a_i ⊙ sg(Â_i))‖²`` where A_i
    comes from the placeholder prompt and Â_i from the class prompt on the same noisy
    augmented latent, and M^a_i are the augmented image's (pseudo) masks. No reconstruction
    term is applied to augmented images.
    """
    return _attention_mse(attn, ica_target(prior_attn, aug_masks), valid)


def total_loss(terms: dict[str, torch.Tensor], lambdas: dict[str, float]) -> torch.Tensor:
    """L = λ_MD L_MD + λ_M2A L_M2A + λ_ICA L_ICA + λ_AUG L_AUG (the paper's total objective)."""
    out = None
    for name, value in terms.items():
        part = lambdas[name] * value
        out = part if out is None else out + part
    if out is None:
        raise ValueError("no loss term is active")
    return out
