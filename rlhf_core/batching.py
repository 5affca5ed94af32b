"""Token rows and batches: what every stage feeds its models.

A row is (token ids, loss mask) for one example: prompt + completion + EOS, the mask 1 on completion tokens.
Batches are right-padded (training, scoring); prompt batches for sampling are left-padded (rlhf_core/forwards.py).
Length-sorted chunks keep the compute spent on padding small: each chunk is padded only to its own longest row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Row = tuple[list[int], list[int]]  # (token ids, loss mask: 1 on completion tokens)


def tokenize_example(tok, prompt: str, completion: str, max_length: int) -> Row:
    """prompt + completion + EOS; an over-long example loses the start of its prompt, then the end of its completion."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c = c[:max_length - 1]
    p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p
    return p + c, [0] * len(p) + [1] * len(c)


def pack(rows: list[Row], max_length: int) -> list[Row]:
    """Concatenate examples into rows of exactly max_length tokens (the last row may be shorter).

    Attention crosses example boundaries inside a row (the usual cheap packing); the loss still covers only
    completion tokens, and each example starts after the previous one's EOS.
    """
    ids, mask = [t for r in rows for t in r[0]], [m for r in rows for m in r[1]]
    return [(ids[i:i + max_length], mask[i:i + max_length]) for i in range(0, len(ids), max_length)]


def collate(rows: list[Row], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask, each (B, T)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)], loss_mask[i, :len(m)] = torch.tensor(r), 1, torch.tensor(m)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}


def batched(items: list, size: int, drop_last: bool = False) -> Iterator[list]:
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        if drop_last and len(chunk) < size:
            return
        yield chunk


def by_length(lengths: list[int], chunk: int) -> list[list[int]]:
    """Row indices sorted by length and cut into chunks of `chunk` (0 = one chunk of all): a batch padded to its
    longest row wastes the compute of every pad position; chunks of similar lengths, each padded only to its own
    longest, waste little. Measured on the demo's reward data: 16 prompts x 4 responses in one forward are half
    padding, and length-sorted chunks of 8 cut the forward + backward time of a step in half. Per-row results do not
    depend on the chunking, so callers get the same values in less time."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = chunk if chunk > 0 else max(1, len(order))
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def length_sorted_batches(rows: list[Row], size: int, pad_id: int, device) -> list[tuple[list[int], dict]]:
    """(row indices, collated batch) for length-sorted chunks of `size` rows (by_length), each padded only to its own
    longest row."""
    return [(idx, collate([rows[i] for i in idx], pad_id, device))
            for idx in by_length([len(ids) for ids, _ in rows], size)]
