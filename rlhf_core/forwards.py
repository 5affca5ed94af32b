"""The policy and the reward model as functions: prompts in; samples, log-probs and scores out.

One sampler and one reward reader, used by every stage, evaluation and report:
- `sample`: top_k=0, top_p=1 temperature sampling with a KV cache from left-padded prompts (N+ details 2-3), cut
  after the first EOS (N+ detail 8). The sampler's own logits give log-probs at the sampling temperature, equal to
  a fresh forward to ~1e-6, so PPO needs no second policy forward.
- `proxy_scores`: the reward model read at the last kept token of a sampled response (N+ detail 5), clipped if asked,
  with the no-EOS rule (N+ detail 8). This number is "the proxy" everywhere: PPO's reward, the sample tables,
  evaluation, the reward model's centring offset.
- `score_rows` / `score_texts`: the same reader on text rows (prompt + response + EOS), the reward model's training
  interface; comparisons from a data set are scored this way (they end with EOS by construction).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_core import runtime
from rlhf_core.batching import Row, length_sorted_batches, tokenize_example
from rlhf_core.losses import token_logprobs, truncate_after_eos
from rlhf_core.models import score_head


def encode_prompts(tok, prompts: list[str], max_prompt_tokens: int | None = None, device="cpu"):
    """Left-padded prompt batch: (input_ids, attention_mask), both (B, T). Long prompts keep their end."""
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens:
        rows = [r[-max_prompt_tokens:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the mask, so a left-padded row starts at position 0 (N+ detail 2). (B, T) -> (B, T)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def decode_responses(tok, response_ids: torch.Tensor) -> list[str]:
    """Decode (B, R) response tokens, cutting each after its first EOS (N+ detail 8)."""
    texts = []
    for row in response_ids.tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        texts.append(tok.decode([t for t in row if t != tok.pad_token_id]))
    return texts


# ----------------------------------------------------------------------------------------------------------------------
# the policy


@dataclass
class Completions:
    """Sampled responses to a batch of prompts. B = prompts, Q = prompt tokens (left-padded), R = response tokens."""

    queries: torch.Tensor        # (B, Q) prompt ids, left-padded with PAD
    query_mask: torch.Tensor     # (B, Q) 1 on real prompt tokens
    responses: torch.Tensor      # (B, R) sampled ids, PAD after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 on kept tokens, up to and including the first EOS
    has_eos: torch.Tensor        # (B,) the response ended with EOS within the length limit
    logits: torch.Tensor | None  # (B, R, V) the sampler's raw logits (before temperature), when asked for

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], 1)                  # (B, Q + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], 1)           # (B, Q + R)

    @property
    def last(self) -> torch.Tensor:
        """Index of each row's last kept token in input_ids: (B,)."""
        return self.queries.shape[1] + self.response_mask.sum(1) - 1


@torch.no_grad()
def sample(model: nn.Module, tok, prompts: list[str], *, temperature: float, max_new_tokens: int,
           max_prompt_tokens: int | None = None, stop_at_eos: bool = True, keep_logits: bool = False) -> Completions:
    """Sample one response per prompt (see sample_tokens); long prompts keep their last max_prompt_tokens tokens."""
    queries, qmask = encode_prompts(tok, prompts, max_prompt_tokens, next(model.parameters()).device)
    return sample_tokens(model, queries, qmask, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         temperature=temperature, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                         keep_logits=keep_logits)


@torch.no_grad()
def sample_tokens(model: nn.Module, queries: torch.Tensor, qmask: torch.Tensor, *, eos_id: int, pad_id: int,
                  temperature: float, max_new_tokens: int, stop_at_eos: bool = True,
                  keep_logits: bool = False) -> Completions:
    """The sampler: top_k=0, top_p=1 at `temperature` (KV cache) from left-padded (B, Q) prompts, cut after the first
    EOS; `stop_at_eos=False` samples exactly `max_new_tokens` tokens, none cut (TRL's stop_token=None).
    `keep_logits` keeps the sampler's logits: log-probs at the sampling temperature with no second forward."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           pad_token_id=pad_id, eos_token_id=eos_id if stop_at_eos else None,
                           output_logits=keep_logits, return_dict_in_generate=True)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=queries, attention_mask=qmask, generation_config=gen)
    model.train(was_training)
    responses = out.sequences[:, queries.shape[1]:]                           # (B, R)
    logits = torch.stack(out.logits, 1).float() if keep_logits else None      # (B, R, V) raw, before temperature
    if not stop_at_eos:
        ones = torch.ones_like(responses)
        return Completions(queries, qmask, responses, ones, ones[:, 0].bool(), logits)
    responses, rmask, has_eos = truncate_after_eos(responses, eos_id, pad_id)
    return Completions(queries, qmask, responses, rmask, has_eos, logits)


def sample_as_ppo(model: nn.Module, tok, prompts: list[str], p, keep_logits: bool = False) -> Completions:
    """`sample` the way PPO samples: the ppo section `p`'s temperature, response length, prompt truncation and EOS
    rule (rollouts, sample tables, evaluation, the reward model's centring offset)."""
    return sample(model, tok, prompts, temperature=p.temperature, max_new_tokens=p.response_length,
                  max_prompt_tokens=p.max_prompt_tokens, stop_at_eos=p.stop_at_eos, keep_logits=keep_logits)


def lm_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, context: int, **kw):
    """A causal LM forward whose LM head runs only where logits are needed: positions context-1 ... T-1 (R + 1 rows;
    the last predicts past the response and is dropped by callers). The vocabulary projection is the largest matmul
    of a small model, and prompt positions need none."""
    if _accepts_logits_to_keep(type(model)):
        kw["logits_to_keep"] = ids.shape[1] - context + 1
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, **kw)


@functools.cache
def _accepts_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def response_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, context: int, responses: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """log p(a_t | s_t) of the R response tokens after `context` under a fresh forward of `model`, at the sampling
    temperature (N+ detail 3): (B, R)."""
    logits = lm_forward(model, ids, mask, context).logits[:, :-1]             # (B, R, V)
    return token_logprobs(logits.float(), responses, temperature)


# ----------------------------------------------------------------------------------------------------------------------
# the reward model (and the value model, which has the same shape)


def scalar_outputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position output of a scalar-head model (reward or value model): (B, T) -> (B, T)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                              use_cache=False).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()                      # (B, T)


def read_scores(rm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The reward model's score of each row, read at index `last` (the last real token, EOS when there is one; N+
    detail 5). ids, mask: (B, T); last: (B,) -> (B,)."""
    return scalar_outputs(rm, ids, mask)[torch.arange(len(ids), device=ids.device), last]


def proxy_scores(rm: nn.Module, c: Completions, *, reward_clip: float = 0.0, missing_eos: str = "replace",
                 missing_eos_penalty: float = 1.0) -> torch.Tensor:
    """The proxy reward of sampled responses: the reward model at the last kept token, clipped to ±reward_clip when
    > 0, then the no-EOS rule: "replace" gives a response without EOS the score -penalty (N+), "subtract" subtracts
    the penalty (TRL), "none" leaves it. (B,)."""
    scores = read_scores(rm, c.input_ids, c.attention_mask, c.last)            # (B,)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    if missing_eos == "replace":
        scores = torch.where(c.has_eos, scores, torch.full_like(scores, -missing_eos_penalty))
    elif missing_eos == "subtract":
        scores = scores - missing_eos_penalty * (~c.has_eos).float()
    return scores


def ppo_proxy(rm: nn.Module, c: Completions, p) -> torch.Tensor:
    """`proxy_scores` with the ppo section `p`'s clip and no-EOS rule: the score PPO optimises. (B,)."""
    return proxy_scores(rm, c, reward_clip=p.reward_clip, missing_eos=p.missing_eos,
                        missing_eos_penalty=p.missing_eos_penalty)


def score_rows(rm: nn.Module, rows: list[Row], pad_id: int, device, rows_per_forward: int,
               bf16: bool = False) -> torch.Tensor:
    """Rewards of token rows (prompt + response + EOS, batching.tokenize_example), in the rows' order: (N,). Forwards
    run over length-sorted chunks of `rows_per_forward` rows (each padded only to its own longest), so little compute
    goes to padding; each reward equals the one-forward value, and the autograd graph covers every chunk when grad is
    on (reward-model training uses this). `bf16`: forwards under bf16 autocast."""
    order, parts = [], []
    for idx, b in length_sorted_batches(rows, rows_per_forward, pad_id, device):
        last = b["attention_mask"].sum(1) - 1                                   # (b,) right-padded: last real token
        with runtime.autocast(device, bf16):
            parts.append(read_scores(rm, b["input_ids"], b["attention_mask"], last))
        order.extend(idx)
    return torch.cat(parts)[torch.argsort(torch.tensor(order, device=device))]


@torch.no_grad()
def score_texts(rm: nn.Module, tok, prompts: list[str], responses: list[str], max_length: int,
                rows_per_forward: int = 64, bf16: bool = False) -> list[float]:
    """Rewards of (prompt, response) texts as the reward model was trained to read them (EOS appended)."""
    if not prompts:
        return []
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    rows = [tokenize_example(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    out = score_rows(rm, rows, tok.pad_token_id, device, rows_per_forward, bf16).tolist()
    rm.train(was_training)
    return out

