"""Device, precision, seeding and threads: the few torch settings every stage shares.

Precision policy: weights and optimizer state stay fp32 ("master weights"); forwards run under bf16 autocast when
`base.dtype` says so. `auto` picks bf16 on a CUDA device that supports it, and on CPU only when a quick matmul probe
shows bf16 clearly faster than fp32 -- CPUs with AMX/AVX512-BF16 run it ~5x faster, while AVX2-only CPUs emulate it
and run it ~50x slower, so assuming either way would be wrong on some machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time

import numpy as np
import torch

from rlhf_core.config import BaseConfig


def resolve_device(base: BaseConfig) -> torch.device:
    if base.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(base.device)


@functools.cache
def cpu_bf16_speedup(n: int = 256, reps: int = 3) -> float:
    """Measured fp32/bf16 time ratio of an n x n matmul on this CPU (> 1 means bf16 is faster)."""
    def bench(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        return time.perf_counter() - t
    return bench(torch.float32) / bench(torch.bfloat16)


def use_bf16(base: BaseConfig, device: torch.device) -> bool:
    if base.dtype != "auto":
        return base.dtype == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_speedup() > 1.5
    return False


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast around forwards (fp32 master weights stay untouched), or a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(base: BaseConfig) -> None:
    if base.num_threads > 0:
        torch.set_num_threads(base.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
