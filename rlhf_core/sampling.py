"""Sampling completions from a causal LM: left-padded prompts, KV cache, pure temperature sampling.

top_k=0 and top_p=1 (N+ detail 3): the policy's own distribution, so log-probs recomputed later with the same
temperature describe exactly what was sampled. Generation stops at EOS; tokens after the first EOS are padding.
"""

from __future__ import annotations

import torch

from rlhf_core.training import batched


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


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
             max_prompt_tokens: int | None = None, seed: int | None = None, greedy: bool = False) -> list[str]:
    """Sample one completion per prompt; returns the decoded text up to (not including) the first EOS."""
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[str] = []
    for chunk in batched(prompts, batch_size):
        ids, mask = encode_prompts(tok, chunk, max_prompt_tokens, device)
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=not greedy, temperature=temperature if not greedy else None, top_k=0,
                              top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.extend(decode_responses(tok, seqs[:, ids.shape[1]:]))
    model.train(was_training)
    return out


def decode_responses(tok, response_ids: torch.Tensor) -> list[str]:
    """Decode (B, R) response tokens, cutting each after its first EOS (N+ detail 8)."""
    texts = []
    for row in response_ids.tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        texts.append(tok.decode([t for t in row if t != tok.pad_token_id]))
    return texts
