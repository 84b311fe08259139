r"""IMR, the Identity-Motion Reconfigurator (DynamicID's reconfiguration stage).

The ID tokens of a reference carry its identity *and* its motion (in faces: expression and
pose; in the micro world: the action — standing, sleeping, upside down, ...). IMR splits them
into an **identity part** (one vector per token) and a **motion part** (one vector), and
recombines the identity part with a **target motion** taken from text, so the prompt, not the
reference, decides the subject's pose:

- :meth:`IMR.split` — a small transformer over the ID tokens, then two heads.
- :meth:`IMR.text_motion` — the target motion from the pooled text embedding of the prompt
  (placeholders replaced by class nouns), mapped into the motion space.
- :meth:`IMR.recombine` — identity part + motion vector (as a 5th token) through a second small
  transformer -> new ID tokens.

Trained with SAA and the ID encoder frozen (:mod:`dynasyn.dynamicid.train`), on pairs of
renders of one identity in two motions, with the losses:

- :func:`supervised_contrastive_loss` on the identity parts (label = identity: the same
  identity in different motions is pulled together, other identities pushed away) and on the
  motion parts of images *and* texts (label = motion: the same motion across identities is
  pulled together, different motions of one identity pushed apart);
- :func:`feature_loss`: recombining the reference's identity with the target's motion text
  gives the target's ID tokens (the official code's feature-matching term);
- :func:`denoise_consistency_loss`: the UNet's noise prediction with the reconfigured tokens
  matches the prediction with the target's own tokens (the official code's latent term).

The official IMR conditions on facial landmarks and an expression classifier's prompt; the
micro world has neither, so the source motion is not given to :meth:`IMR.split` (it must find
it) and the target motion comes from text only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMR",
    "denoise_consistency_loss",
    "feature_loss",
    "supervised_contrastive_loss",
]


class _Block(nn.Module):
    """Pre-norm transformer block (self-attention + feed-forward) on a few tokens."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class IMR(nn.Module):
    """Identity-Motion Reconfigurator: ``IMR(tokens, text_pooled) -> tokens'``.

    Args:
        token_dim: width of the ID tokens (the UNet's ``cross_attention_dim``).
        text_dim: width of the pooled text embedding (the text encoder's hidden size).
        dim: internal width.
        num_tokens: ID tokens per identity.
        depth: blocks of the splitter and of the recombiner each.
        heads: attention heads.
        embed_dim: width of the contrastive embeddings.
    """

    def __init__(self, token_dim: int, text_dim: int, dim: int = 128, num_tokens: int = 4,
                 depth: int = 2, heads: int = 4, embed_dim: int = 64) -> None:
        super().__init__()
        self.config = dict(token_dim=token_dim, text_dim=text_dim, dim=dim,
                           num_tokens=num_tokens, depth=depth, heads=heads, embed_dim=embed_dim)
        self.num_tokens = num_tokens
        self.norm_in = nn.LayerNorm(token_dim)
        self.proj_in = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens + 1, dim))
        self.motion_query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.splitter = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.identity_head = nn.Linear(dim, dim)
        self.motion_head = nn.Linear(dim, dim)
        self.text_motion_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim),
                                              nn.GELU(), nn.Linear(dim, dim))
        self.recombiner = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, token_dim)
        self.identity_embed = nn.Linear(dim, embed_dim)
        self.motion_embed = nn.Linear(dim, embed_dim)

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ID tokens (B, T, token_dim) -> identity part (B, T, dim), motion part (B, dim).

        A learned motion query joins the tokens; after the splitter blocks, the token outputs
        go through the identity head and the query's output through the motion head.
        """
        b = tokens.shape[0]
        x = self.proj_in(self.norm_in(tokens))
        x = torch.cat([x, self.motion_query.expand(b, -1, -1)], dim=1) + self.pos
        for blk in self.splitter:
            x = blk(x)
        return self.identity_head(x[:, :-1]), self.motion_head(x[:, -1])

    def text_motion(self, text_pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text embedding (B, text_dim) -> a motion vector (B, dim)."""
        return self.text_motion_proj(text_pooled.to(self.proj_in.weight.dtype))

    def recombine(self, identity: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """Identity part (B, T, dim) + motion vector (B, dim) -> ID tokens (B, T, token_dim)."""
        x = torch.cat([identity, motion[:, None]], dim=1) + self.pos
        for blk in self.recombiner:
            x = blk(x)
        return self.proj_out(self.norm_out(x[:, :-1]))

    def forward(self, tokens: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
        """Reconfigure ``tokens`` (B, T, token_dim) to the motion of ``text_pooled``."""
        identity, _ = self.split(tokens)
        return self.recombine(identity, self.text_motion(text_pooled)).to(tokens.dtype)

    def identity_embedding(self, identity: torch.Tensor) -> torch.Tensor:
        """Unit-norm contrastive embedding (B, embed_dim) of an identity part."""
        return F.normalize(self.identity_embed(identity.mean(dim=1)), dim=-1)

    def motion_embedding(self, motion: torch.Tensor) -> torch.Tensor:
        """Unit-norm contrastive embedding (B, embed_dim) of a motion vector."""
        return F.normalize(self.motion_embed(motion), dim=-1)

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments (for saving)."""
        return dict(self.config)


def supervised_contrastive_loss(emb: torch.Tensor, labels: torch.Tensor,
                                temperature: float = 0.1) -> torch.Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020, Eq. 2, "L^sup_out") of unit-norm
    embeddings ``emb`` (N, D) with integer ``labels`` (N,).

    :math:`L = \frac{1}{|A|}\sum_{i \in A} \frac{-1}{|P(i)|} \sum_{p \in P(i)}
    \log \frac{\exp(z_i \cdot z_p / \tau)}{\sum_{a \neq i} \exp(z_i \cdot z_a / \tau)}`,
    where :math:`P(i)` are the other samples with ``i``'s label and :math:`A` the anchors that
    have at least one (0 when none has). IMR uses it for the identity parts (label =
    identity) and for the motion parts (label = motion).
    """
    n = emb.shape[0]
    logits = emb @ emb.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    count = pos.sum(dim=1)
    anchors = count > 0
    if not anchors.any():
        return emb.sum() * 0.0
    per = -(log_prob.masked_fill(~pos, 0.0)).sum(dim=1)[anchors] / count[anchors]
    return per.mean()


def feature_loss(pred_tokens: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Feature matching of the reconfigured tokens (the official IMR training's first term):
    MSE(IMR(reference tokens, target motion), target tokens)."""
    return F.mse_loss(pred_tokens.float(), target_tokens.float())


def denoise_consistency_loss(noise_pred: torch.Tensor, target_noise_pred: torch.Tensor
                             ) -> torch.Tensor:
    """Latent consistency (the official IMR training's second term): MSE between the UNet's
    noise prediction with the reconfigured tokens and, detached, with the target's tokens."""
    return F.mse_loss(noise_pred.float(), target_noise_pred.detach().float())
