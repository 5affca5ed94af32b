"""What every training stage shares: optimizer, schedule, batch order, resumable checkpoints, progress, metrics.

Checkpoints hold everything a resumed run needs to end where an uninterrupted one ends: weights (safetensors),
optimizer and scheduler state, the step, and RNG states. They are written atomically, so a kill mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_core import io

MetricsSink = Callable[[dict[str, float], int], None]
"""Receives (metrics, step); MLflow's `log_metrics` fits, so does a list's append wrapper in a notebook."""


@dataclass
class StageResult:
    """What a stage hands on: where its outputs are, and its final metrics."""

    outputs: dict[str, Path]
    metrics: dict[str, float] = field(default_factory=dict)


def null_sink(metrics: dict[str, float], step: int) -> None:
    return None


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with eps=1e-5 (N+ detail 12); no decay on biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one pass over each tensor instead of a dozen foreach ops) where every parameter allows it
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, eps=1e-5, fused=fused or None)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int, shape: str = "cosine"):
    """Linear warmup, then cosine or linear decay to 0 (LR annealed to 0: N+ detail 12), or constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if shape == "constant":
            return 1.0
        return 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) fixed by (seed, epoch), so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` (at least one item) held out, the same on every run."""
    n_eval = max(1, int(len(items) * fraction))
    order = epoch_order(len(items), seed, epoch=-1)
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


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


def progress(total: int, desc: str, initial: int = 0):
    """A progress bar on stderr; quiet when stderr is not a terminal except for periodic lines."""
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, model: nn.Module, opt, sched, state: dict) -> None:
    """Atomically write a resumable checkpoint directory."""
    from safetensors.torch import save_model

    with io.atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_to_saveable()},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def load_checkpoint(path: Path, model: nn.Module, opt, sched) -> dict | None:
    """Restore a checkpoint written by save_checkpoint; returns its state dict, or None when there is none."""
    from safetensors.torch import load_model

    if not (path / "state.json").exists():
        return None
    load_model(model, str(path / "model.safetensors"))
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    _rng_from_saveable(trainer["rng"])
    return json.loads((path / "state.json").read_text())


def _rng_to_saveable() -> dict:
    # weights_only loading accepts tensors and plain containers only: store the numpy/python states as such
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
            np_state[2], np_state[3], np_state[4]], "torch": torch.get_rng_state()}


def _rng_from_saveable(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])


def write_metrics(path: Path, metrics: dict) -> Path:
    return io.write_json(path, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
