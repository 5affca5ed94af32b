"""One policy's completions of held-out prompts, scored: the measurement evaluation and PPO's online watch share.

    s = sample_and_score(policy, ref, rm, tok, prompts, cfg, gold, seed=cfg.base.seed)
    point = curve_point(s, sft_samples)    # d = sqrt(KL), proxy and gold relative to SFT on the same prompts

Every model samples one response per prompt exactly as PPO samples (rlhf_core.forwards.sample_as_ppo) from a stream
seeded by `seed`, so two models scored with one seed share their random numbers and differences of their means are
less noisy than their own spreads. Gold and proxy of a curve point are relative to SFT (R(0) = 0, Gao et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_core import overopt, runtime
from rlhf_core.batching import batched
from rlhf_core.config import Config
from rlhf_core.forwards import decode_responses, ppo_proxy, response_logprobs, sample_as_ppo
from rlhf_core.losses import token_logprobs


@dataclass
class Samples:
    """One model's completions of N evaluation prompts, one each, with their scores."""

    texts: list[str]            # N responses, cut before the first EOS
    proxy: np.ndarray           # (N,) reward-model score at the last kept token, after PPO's no-EOS rule
    gold: np.ndarray            # (N,) gold reward
    logprobs: np.ndarray        # (N,) log pi(y|x) of the whole response at the sampling temperature
    ref_logprobs: np.ndarray    # (N,) log pi_SFT(y|x), same temperature
    lengths: np.ndarray         # (N,) response tokens kept, up to and including the first EOS
    has_eos: np.ndarray         # (N,) the response ended with EOS within response_length

    def head(self, n: int) -> Samples:
        """The first n prompts' samples (all of them when there are fewer)."""
        return Samples(self.texts[:n], *(getattr(self, k)[:n] for k in
                                         ("proxy", "gold", "logprobs", "ref_logprobs", "lengths", "has_eos")))


@torch.no_grad()
def sample_and_score(model, ref, rm, tok, prompts: list[str], cfg: Config, gold, seed: int,
                     bf16: bool = False) -> Samples:
    """1. sample one response per prompt as PPO does, 2. log-probs under the model and SFT, 3. proxy and gold; the
    forwards at the run's precision (bf16 autocast or not), as in PPO."""
    p, device = cfg.ppo, next(model.parameters()).device
    torch.manual_seed(seed)
    model.eval()
    texts, cols = [], {k: [] for k in ("proxy", "logprobs", "ref_logprobs", "lengths", "has_eos")}
    for chunk in batched(prompts, cfg.evaluate.batch_size):
        with runtime.autocast(device, bf16):
            c = sample_as_ppo(model, tok, chunk, p, keep_logits=True)
        rmask, q = c.response_mask, c.queries.shape[1]
        logp = (token_logprobs(c.logits, c.responses, p.temperature) * rmask).sum(1)          # (B,) from the sampler
        c.logits = None
        with runtime.autocast(device, bf16):
            ref_logp = logp if ref is model else (response_logprobs(ref, c.input_ids, c.attention_mask, q,
                                                                     c.responses, p.temperature) * rmask).sum(1)
            proxy = ppo_proxy(rm, c, p)                                                       # (B,)
        for k, v in (("proxy", proxy), ("logprobs", logp), ("ref_logprobs", ref_logp),
                     ("lengths", rmask.sum(1)), ("has_eos", c.has_eos)):
            cols[k].append(v.cpu())
        texts.extend(decode_responses(tok, c.responses))
    arrays = {k: torch.cat(v).double().numpy() for k, v in cols.items()}
    return Samples(texts, gold=np.array(gold.score_batch(prompts, texts), dtype=np.float64), **arrays)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (std / sqrt(N), ddof=1; nan for one value) of a 1-D array."""
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def curve_point(s: Samples, base: Samples) -> dict[str, float]:
    """(d, kl, proxy, gold) of a policy, proxy and gold relative to SFT on the same prompts (R(0) = 0)."""
    kl, kl_se = overopt.sampled_kl(s.logprobs, s.ref_logprobs)
    gold, gold_se = mean_se(s.gold - base.gold)
    return {"d": math.sqrt(max(kl, 0.0)), "kl": kl, "kl_se": kl_se, "proxy": float((s.proxy - base.proxy).mean()),
            "gold": gold, "gold_se": gold_se}
