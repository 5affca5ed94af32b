"""What every training stage shares: set-up, optimizer, schedule, batch order, guarded steps, resumable checkpoints,
progress, metrics.

Checkpoints hold everything a resumed run needs to end where an uninterrupted one ends: weights (safetensors),
optimizer and scheduler state, the step, RNG states and the metric history. They also hold a fingerprint of what
they were made with (the stage's params, its upstream models and data, the precision): a rerun resumes only when
the fingerprint matches, and otherwise starts afresh and says why. They are written atomically, so a kill mid-save
leaves the previous checkpoint intact. A non-finite loss or gradient stops the stage before the optimizer step, so
neither a checkpoint nor an output ever holds NaN weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_core import io, runtime
from rlhf_core.config import Config

MetricsSink = Callable[[dict[str, float], int], None]
"""Receives (metrics, step); MLflow's `log_metrics` fits, so does a list's append wrapper in a notebook. A sink
with a `set_total(total)` method is told how many steps the stage will take (progress bars in the flow)."""


@dataclass
class StageResult:
    """What a stage hands on: where its outputs are, and its final metrics."""

    outputs: dict[str, Path]
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight that is NaN or infinite: the stage stops before it reaches a checkpoint."""


def null_sink(metrics: dict[str, float], step: int) -> None:
    return None


def setup_stage(cfg: Config, out_dir: Path) -> tuple[torch.device, bool]:
    """Seed, threads, device and precision (bf16 autocast or not) for a stage; creates its output directory."""
    runtime.seed_everything(cfg.base.seed)
    runtime.set_threads(cfg.base)
    device = runtime.resolve_device(cfg.base)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return device, runtime.use_bf16(cfg.base, device)


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


# ----------------------------------------------------------------------------------------------------------------------
# the epoch loop SFT and the reward model share


def plan_steps(n_items: int, c, stage: str) -> tuple[int, int]:
    """(steps per epoch, total steps) for `n_items` examples and a config section with batch_size, epochs and
    max_steps (0 = every epoch)."""
    per_epoch = n_items // c.batch_size
    if per_epoch == 0:
        raise ValueError(f"{stage}: {n_items} training examples are fewer than one batch of {c.batch_size}")
    return per_epoch, min(per_epoch * c.epochs, c.max_steps or per_epoch * c.epochs)


def epoch_batches(n_items: int, batch_size: int, seed: int, per_epoch: int, total: int,
                  start: int) -> Iterator[tuple[int, list[int]]]:
    """(step, example indices) for steps start ... total-1: whole batches of a seeded order per epoch
    (epoch_order), so a run resumed at `start` sees exactly the batches an uninterrupted run sees."""
    order, order_epoch = [], None
    for step in range(start, total):
        epoch, i = divmod(step, per_epoch)
        if epoch != order_epoch:  # one permutation per epoch, not per step
            order, order_epoch = epoch_order(n_items, seed, epoch), epoch
        yield step, order[i * batch_size:(i + 1) * batch_size]


def optimizer_step(params, opt, sched, max_grad_norm: float, loss: float, where: str) -> float:
    """Clip, check, step: a non-finite loss or gradient raises NonFiniteError *before* the weights change, so the
    weights (and every checkpoint) stay the last good ones. Returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"{where}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                             f"(loss {loss}, gradient norm {grad_norm}); stopped before the optimizer step, the last "
                             "good checkpoint is kept. Lower the learning rate (or check the data) and rerun.")
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    return grad_norm


def check_finite(model: nn.Module, where: str) -> None:
    """Raise NonFiniteError when any weight is NaN or infinite (before it is saved anywhere)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"{where}: non-finite weights in {len(bad)} tensors (first: {bad[0]}); not saved")


def progress(total: int, desc: str, initial: int = 0, sink: MetricsSink | None = None):
    """A progress bar on stderr (periodic lines when stderr is not a terminal); tells the sink the total."""
    if sink is not None and hasattr(sink, "set_total"):
        sink.set_total(total)
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 15.0)


def recording(sink: MetricsSink, history: list[dict]) -> MetricsSink:
    """A sink that also appends {"step", **metrics} to `history` (kept in checkpoints: a resumed run replays it, so
    its metric history is the uninterrupted run's)."""
    def record(metrics: dict[str, float], step: int) -> None:
        history.append({"step": step, **metrics})
        sink(metrics, step)
    if hasattr(sink, "set_total"):
        record.set_total = sink.set_total  # type: ignore[attr-defined]
    return record


def replay(sink: MetricsSink, history: list[dict]) -> None:
    """Hand a restored history to the sink again (a resumed run's tracking then shows every step)."""
    for row in history:
        sink({k: v for k, v in row.items() if k != "step"}, row["step"])


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def content_hash(path: str | Path) -> str:
    """sha256 over a file, or over a directory's files (relative names and contents); a name that is not a local path
    (a hub model) hashes as the name itself."""
    path, h = Path(path), hashlib.sha256()
    if not path.exists():
        return f"name:{path}"
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def fingerprint(cfg: Config, section: str, upstream: dict[str, str | Path], bf16: bool,
                extra: tuple[str, ...] = ()) -> dict:
    """What a checkpoint was made with: the stage's params (base's seed/model/tokenizer/dtype, its own section and the
    dotted `extra` keys it reads from other sections), the content of its upstream models and data files, and the
    precision it ran at."""
    keys = [f"base.{k}" for k in ("seed", "model", "tokenizer", "dtype")] + list(extra)
    params = {**{k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in keys},
              **{f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, section)).items()}}
    return {"params": json.loads(json.dumps(params, default=str)),
            "upstream": {k: content_hash(v) for k, v in sorted(upstream.items())}, "bf16": bool(bf16)}


def _differences(old: dict, new: dict) -> list[str]:
    out = [f"{k}: {old['params'].get(k)!r} -> {v!r}" for k, v in new["params"].items() if old["params"].get(k) != v]
    out += [f"{k} changed" for k, v in new["upstream"].items() if old["upstream"].get(k) != v]
    return out + (["precision changed"] if old.get("bf16") != new["bf16"] else [])


def save_checkpoint(path: Path, model: nn.Module, opt, sched, state: dict) -> None:
    """Atomically write a resumable checkpoint directory (weights checked finite first)."""
    from safetensors.torch import save_model

    check_finite(model, f"checkpoint {path}")
    with io.atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_to_saveable()},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, allow_nan=False))


def load_checkpoint(path: Path, model: nn.Module, opt, sched, expected: dict) -> dict | None:
    """Restore a checkpoint written by save_checkpoint when its fingerprint equals `expected`; returns its state, or
    None (start afresh) when there is none, when it was made with other settings, or when it cannot be read -- the
    last two are said on stderr and the stale checkpoint is removed."""
    from safetensors.torch import load_model

    io.recover(path)
    if not (path / "state.json").exists():
        return None
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("fingerprint") != expected:
            why = _differences(state.get("fingerprint") or {"params": {}, "upstream": {}}, expected)
            return _discard(path, f"it was made with other settings ({'; '.join(why[:6]) or 'unknown'})")
        load_model(model, str(path / "model.safetensors"))
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        opt.load_state_dict(trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        _rng_from_saveable(trainer["rng"])
    except Exception as e:  # a truncated or corrupt checkpoint: resuming is an optimisation, starting over is safe
        return _discard(path, f"it cannot be read ({type(e).__name__}: {str(e)[:200]})")
    print(f"resuming from {path} at {state.get('step', state.get('update'))}", file=sys.stderr)
    return state


def _discard(path: Path, why: str) -> None:
    print(f"not resuming from the checkpoint {path}: {why}; starting afresh", file=sys.stderr)
    shutil.rmtree(path, ignore_errors=True)
    return None


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
    """metrics.json: floats rounded to 6 digits; a non-finite value is an error, never bare NaN in a JSON file."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{path}: non-finite metrics {bad}; not written")
    return io.write_json(path, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
