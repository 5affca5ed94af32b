"""The math, as small pure functions over tensors (imports only torch, so its tests run instantly).

Shapes: B = batch, T = tokens, N = responses in a batch, P = comparison pairs in a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all dims, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked positions (Bessel-corrected by default, like numpy's ddof=1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked positions; with shift_mean=False the mean is added back (reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label) under softmax(logits / temperature), without materialising a (B, T, V) log-softmax copy.

    logits: (B, T, V), labels: (B, T) -> (B, T).
    """
    logits = logits.float() / temperature                                      # (B, T, V)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)               # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)                            # (B, T)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on positions where loss_mask is 1 (completion tokens in SFT).

    logits: (B, T, V) for inputs; labels, loss_mask: (B, T) aligned with the inputs (shifted here).
    Returns (mean loss over masked tokens, number of masked tokens).
    """
    logp = token_logprobs(logits[:, :-1], labels[:, 1:])                      # (B, T-1)
    mask = loss_mask[:, 1:].to(logp.dtype)                                     # (B, T-1)
    n = mask.sum()
    return -(logp * mask).sum() / n.clamp(min=1), n


def pairwise_loss(r_w: torch.Tensor, r_l: torch.Tensor, margin: float = 0.0,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_w - r_l - margin), a weighted sum when weights are given, else a mean.

    r_w, r_l: (P,) rewards of the preferred and the rejected response; weights: (P,).
    InstructGPT: with K ranked responses, weights = 1/C(K,2) / n_prompts so each prompt counts once.
    Check: r_w=0.8, r_l=0.2 -> 0.4375; r_w=0.2, r_l=0.8 -> 1.0375.
    """
    losses = -F.logsigmoid(r_w - r_l - margin)                                  # (P,)
    if weights is None:
        return losses.mean()
    return (losses * weights).sum()


def ranking_loss(rewards: torch.Tensor, pairs: torch.Tensor, group: torch.Tensor, margin: float = 0.0,
                 center_coef: float = 0.0) -> torch.Tensor:
    """InstructGPT's K-wise reward-model loss from one forward per response.

    rewards: (N,) one scalar per response; pairs: (P, 2) (winner, loser) indices into rewards; group: (P,) the prompt
    each pair belongs to. Every pair of a prompt is weighted 1/C(K,2) = 1/(pairs of that prompt), and prompts are
    averaged, so a prompt with K=9 responses does not outweigh one with K=2.
    """
    n_groups = int(group.max()) + 1 if group.numel() else 1
    pairs_per_group = torch.bincount(group, minlength=n_groups).to(rewards.dtype)     # (G,)
    weights = 1.0 / (pairs_per_group[group] * n_groups)                                # (P,)
    r_w, r_l = rewards[pairs[:, 0]], rewards[pairs[:, 1]]                             # (P,)
    loss = pairwise_loss(r_w, r_l, margin, weights)
    if center_coef > 0:
        # keeps rewards near 0 (Eisenstein et al. 2023; TRL's center_rewards_coefficient)
        loss = loss + center_coef * ((r_w + r_l) ** 2 * weights).sum()
    return loss
