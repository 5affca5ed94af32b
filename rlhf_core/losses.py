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


# ----------------------------------------------------------------------------------------------------------------------
# PPO for language models (RLHF.md; Ziegler et al. 2019; Ouyang et al. 2022; N+ implementation details)
# R = response tokens.


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """Cut each response after its first EOS (N+ detail 8).

    responses: (B, R) -> (responses with PAD after the first EOS (B, R), mask of kept tokens incl. the EOS (B, R),
    has_eos (B,)).
    """
    is_eos = responses == eos_id                                               # (B, R)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0                      # (B, R) strictly after the first EOS
    mask = ~after                                                              # (B, R)
    return responses.masked_fill(after, pad_id), mask.long(), is_eos.any(1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020, "Approximating KL").

    k1 = log pi - log pi_ref (unbiased, can be negative per token); k3 = (r - 1) - log r with r = pi_ref / pi
    (unbiased, never negative, lower variance). (B, R) -> (B, R).
    """
    logr = ref_logprobs - logprobs                                             # (B, R)
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL on every kept response token, plus the reward-model score on the last kept token.

    kl, mask: (B, R); scores: (B,) -> (B, R), zero where mask is 0.
    """
    rewards = -kl_coef * kl * mask                                             # (B, R)
    last = (mask.sum(1) - 1).clamp(min=0)                                      # (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response, stopping at its last kept token.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = sum_l (gamma lam)^l delta_{t+l};  returns = A + V.
    rewards, values, mask: (B, R) -> advantages, returns: (B, R), zero where mask is 0.
    """
    rewards, values = rewards * mask, values * mask                            # (B, R) nothing after the episode
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])                                  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]              # (B,)
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate against the policy that sampled the batch: max(-A r, -A clip(r, 1-eps, 1+eps)).

    All (B, R). Returns (loss, stats: clipfrac, approxkl = 0.5 E[(log r)^2], ratio mean).
    """
    log_ratio = logprobs - old_logprobs                                        # (B, R)
    ratio = torch.exp(log_ratio)                                               # (B, R)
    unclipped = -advantages * ratio                                            # (B, R)
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask), "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2). All (B, R).

    Returns (loss, fraction of tokens where the clipped term was the larger).
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)   # (B, R)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2               # (B, R)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    return loss, masked_mean((clipped_sq > unclipped_sq).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def adaptive_kl_coef(kl_coef: float, current_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019's proportional controller: beta <- beta (1 + clip(KL/target - 1, -0.2, 0.2) n / horizon),
    with n the episodes (rollouts) seen since the last update."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
