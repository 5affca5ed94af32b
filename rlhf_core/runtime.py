"""Device, precision, seeding and threads: the few torch settings every stage shares.

Precision policy: weights and optimizer state stay fp32 ("master weights"); forwards run under bf16 autocast when
`base.dtype` says so. An explicit `bf16` or `fp32` always wins. `auto` on CUDA follows `torch.cuda.is_bf16_supported()`.
`auto` on CPU is decided once per host and cached, so every stage and every process of a run gets the same answer:

    python -m rlhf_core.runtime             # print this host's decision as JSON (measures once, then reads the cache)
    python -m rlhf_core.runtime --refresh   # measure again

Why (measured on 2-core hosts, ../shared/STACK.md): AVX2-only CPUs emulate bf16 matmuls ~100x slower than fp32, so
without a native bf16 flag (avx512_bf16, amx_bf16; ARM `bf16`) the answer is fp32 with no timing at all. CPUs with
avx512_bf16 run a 1024^2 bf16 matmul 2-5x faster than fp32. The old probe (three 256^2 matmuls per dtype, per stage)
ranged 0.05-207 under load and picked fp32 for pretrain, then bf16 for SFT in the same run; the probe here times
1024^2 matmuls on one thread in interleaved fp32/bf16 pairs, takes the median ratio of 7 pairs and picks bf16 only
when that clears 1.3x (benchmarks/precision_probe.py: 100 calls under load, one answer).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rlhf_core import io
from rlhf_core.config import BaseConfig

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, and ARM's `Features: ... bf16`
HOST_FLAGS = NATIVE_BF16_FLAGS | {"avx512f"}  # the flags that identify a host's precision behaviour
BF16_MARGIN = 1.3  # bf16 only when clearly faster: a ratio near 1 is noise, and fp32 is the safe default
PROBE_N, PROBE_PAIRS = 1024, 7


def resolve_device(base: BaseConfig) -> torch.device:
    if base.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(base.device)


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this CPU from /proc/cpuinfo; (machine, no flags) where there is none (macOS)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return platform.machine() or "unknown", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        name, _, value = (s.strip() for s in line.partition(":"))
        if name == "model name" and not model:
            model = value
        elif name in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model or platform.machine() or "unknown", flags


def host_key(model: str, flags: frozenset[str]) -> str:
    """Short stable id of (CPU model, bf16-relevant flags, torch version): what the precision decision depends on."""
    ident = f"{model}|{','.join(sorted(flags & HOST_FLAGS))}|torch {torch.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """`$RLHF_CACHE_DIR`, else `$XDG_CACHE_HOME/rlhf-pipeline`, else `~/.cache/rlhf-pipeline`."""
    if os.environ.get("RLHF_CACHE_DIR"):
        return Path(os.environ["RLHF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf-pipeline"


def measure_bf16_speedup(n: int = PROBE_N, pairs: int = PROBE_PAIRS) -> list[float]:
    """fp32-time / bf16-time of one n x n matmul on one thread, for `pairs` back-to-back pairs (> 1: bf16 faster).

    One thread: a multi-threaded matmul waits for its slowest thread, so one preempted thread skews the whole timing
    (with 2 threads under load the median of 7 ratios fell to 1.1 once in 100 calls; on 1 thread never below 2.0).
    Pairs alternate which dtype runs first, and each ratio compares two adjacent timings, so load that comes and goes
    hits both sides of a ratio; the caller takes the median, which ignores the pairs a burst of load did skew."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def seconds(a, b):
        t = time.perf_counter()
        a @ b
        return time.perf_counter() - t

    threads, ratios = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        seconds(a32, b32), seconds(a16, b16)  # warm-up: the first call of each dtype picks and loads its kernels
        for i in range(pairs):
            if i % 2:
                t16, t32 = seconds(a16, b16), seconds(a32, b32)
            else:
                t32, t16 = seconds(a32, b32), seconds(a16, b16)
            ratios.append(t32 / t16)
    finally:
        torch.set_num_threads(threads)
    return ratios


@contextlib.contextmanager
def _waiting_lock(path: Path):
    """Blocking flock: two processes deciding at once measure once (io.exclusive_lock refuses instead of waiting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_cache(path: Path, key: str) -> dict | None:
    """The cached decision for host `key`, or None when missing, unreadable or not a decision for this host."""
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
        if cached["host_key"] == key and cached["precision"] in ("bf16", "fp32"):
            float(cached["bf16_speedup"])
            return cached
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"unreadable precision cache {path} ({e!r}); measuring again", stacklevel=3)
    return None


def host_precision(refresh: bool = False) -> dict:
    """This host's CPU precision decision: bf16 or fp32 for `base.dtype: auto`, measured once and cached.

    Returns the host (host_key, cpu_model, cpu_flags, torch), the decision (precision, bf16_speedup: median
    fp32/bf16 time ratio or None when not timed, bf16_speedup_range, measured_at) and `source`:
    "cpu-flags" (no native bf16: fp32 without timing), "host-cache" or "measured". `refresh` measures again."""
    model, flags = cpu_info()
    key = host_key(model, flags)
    host = {"host_key": key, "cpu_model": model, "cpu_flags": sorted(flags & HOST_FLAGS), "torch": torch.__version__}
    if not flags & NATIVE_BF16_FLAGS:
        return {**host, "precision": "fp32", "bf16_speedup": None, "source": "cpu-flags"}
    path = cache_dir() / f"precision-{key}.json"
    with _waiting_lock(path.with_suffix(".lock")):
        if not refresh and (cached := _read_cache(path, key)):
            return {**cached, "source": "host-cache"}
        ratios = measure_bf16_speedup()
        speedup = statistics.median(ratios)
        decision = {**host, "precision": "bf16" if speedup >= BF16_MARGIN else "fp32",
                    "bf16_speedup": round(speedup, 3), "bf16_speedup_range": [round(min(ratios), 3),
                                                                              round(max(ratios), 3)],
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        io.write_json(path, decision)
    return {**decision, "source": "measured"}


def precision_record(base: BaseConfig, device: torch.device) -> dict:
    """What a stage used and why, for its metrics and tags: precision ("bf16"|"fp32"), precision_source ("params",
    "cuda", "cpu-flags", "host-cache", "measured" or "device"), cpu_bf16_native, bf16_speedup (None unless the
    host decision was timed) and host_key."""
    model, flags = cpu_info()
    host = host_precision() if base.dtype == "auto" and device.type == "cpu" else None
    if base.dtype != "auto":
        precision, source = base.dtype, "params"
    elif device.type == "cuda":
        precision, source = ("bf16" if torch.cuda.is_bf16_supported() else "fp32"), "cuda"
    elif host is not None:
        precision, source = host["precision"], host["source"]
    else:
        precision, source = "fp32", "device"  # mps and others: bf16 autocast support varies, fp32 is safe
    return {"precision": precision, "precision_source": source, "cpu_bf16_native": bool(flags & NATIVE_BF16_FLAGS),
            "bf16_speedup": host["bf16_speedup"] if host else None, "host_key": host_key(model, flags)}


def use_bf16(base: BaseConfig, device: torch.device) -> bool:
    return precision_record(base, device)["precision"] == "bf16"


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rlhf_core.runtime", description="Print this host's CPU precision "
                                     "decision as JSON (measured once per host, then read from the cache).")
    parser.add_argument("--refresh", action="store_true", help="measure again and overwrite the cached decision")
    json.dump(host_precision(refresh=parser.parse_args().refresh), sys.stdout, indent=2, sort_keys=True)
    print()
