"""Does `base.dtype: auto` give one answer on this host under load? The host decision against the old per-stage probe.

    python benchmarks/precision_probe.py                   # 100 calls each, a pure-Python spinner on the last core
    python benchmarks/precision_probe.py --load matmul     # the load is a 1-thread fp32 matmul loop (memory traffic too)
    python benchmarks/precision_probe.py --load none --calls 20

Each round runs one call of each probe, back to back, so both see the same load:
  new  `runtime.host_precision()` with its cache file deleted first, so every call really measures
       (1024^2 matmuls on 1 thread, 7 interleaved fp32/bf16 pairs, median ratio, bf16 iff >= 1.3);
  old  the probe of the previous runtime.py, called by each stage: fp32/bf16 time of three 256^2 matmuls, bf16 iff > 1.5.
Prints the host's CPU model and flags, the load, each probe's fp32/bf16 ratio (min / median / max) and its distinct
answers with counts. The load process is this script's own child and is stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhf_core import runtime

LOADS = {
    "spin": "while True: pass",
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True: a @ a",
}


def old_probe(n: int = 256, reps: int = 3) -> float:
    """`cpu_bf16_speedup` as it was (git show a123be9:rlhf_core/runtime.py), without its per-process cache."""
    def bench(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        return time.perf_counter() - t
    return bench(torch.float32) / bench(torch.bfloat16)


def start_load(kind: str) -> subprocess.Popen | None:
    """A CPU-burning child pinned to the last core (the other core, on the 2-core hosts this was written for)."""
    if kind == "none":
        return None
    proc = subprocess.Popen([sys.executable, "-c", LOADS[kind]])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, {max(os.sched_getaffinity(0))})
    time.sleep(1.0)  # let it reach full speed
    return proc


def summary(name: str, ratios: list[float], answers: list[str], seconds: float) -> None:
    counts = dict(collections.Counter(answers).most_common())
    print(f"{name}: ratio min {min(ratios):.3g} / median {statistics.median(ratios):.3g} / max {max(ratios):.3g}; "
          f"answers {counts}; {seconds / len(ratios) * 1000:.0f} ms a call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--load", choices=["spin", "matmul", "none"], default="spin")
    args = parser.parse_args()

    model, flags = runtime.cpu_info()
    print(f"host: {model}; cores {os.cpu_count()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"flags: {' '.join(sorted(flags & runtime.HOST_FLAGS)) or '(no avx512f, no native bf16)'}")
    cache = Path(tempfile.mkdtemp(prefix="rlhf-precision-probe-"))
    os.environ["RLHF_CACHE_DIR"] = str(cache)  # never touch the real per-host cache
    load = start_load(args.load)
    print(f"load: {args.load}{f' (pid {load.pid}, pinned to the last core)' if load else ''}; "
          f"loadavg at start {os.getloadavg()[0]:.2f}")
    new, old, t_new, t_old = [], [], 0.0, 0.0
    try:
        for _ in range(args.calls):
            for f in cache.glob("precision-*.json"):
                f.unlink()
            t = time.perf_counter()
            decision = runtime.host_precision()
            t_new += time.perf_counter() - t
            new.append((decision["bf16_speedup"], decision["precision"], decision["source"]))
            t = time.perf_counter()
            ratio = old_probe()
            t_old += time.perf_counter() - t
            old.append((ratio, "bf16" if ratio > 1.5 else "fp32"))
    finally:
        if load:
            load.kill()
            load.wait()
    print(f"loadavg at end {os.getloadavg()[0]:.2f}; {args.calls} calls of each probe")
    if new[0][0] is None:
        print(f"new: no native bf16 flag: fp32 without timing, {len(new)} of {len(new)} calls ({new[0][2]})")
    else:
        summary("new (host_precision, 1024^2, 1 thread, median of 7 pairs, >= 1.3)", [r for r, _, _ in new],
                [a for _, a, _ in new], t_new)
    summary("old (cpu_bf16_speedup, 256^2, 3 reps, > 1.5)", [r for r, _ in old], [a for _, a in old], t_old)


if __name__ == "__main__":
    main()
