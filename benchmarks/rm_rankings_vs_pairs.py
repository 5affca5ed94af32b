"""Reward model: K-wise rankings trained InstructGPT's way vs the same comparisons as independent pairs.

    python benchmarks/rm_rankings_vs_pairs.py [--set reward.epochs=1 ...]

Needs the default pipeline's SFT model (outputs/sft/model) and data (data/). Trains three reward models from it:
  grouped         all C(K,2) pairs of a prompt in one batch, one forward per response (K forwards per prompt)
  pairs, equal    each comparison as its own example (2 forwards per pair), stopped at the grouped run's number
                  of forwarded sequences: equal compute
  pairs, full     the same pairs for the full epochs (C(K,2)*2/K = 3x the compute at K=4)
and prints held-out accuracy against the labels and against the simulated labeler's gold ordering.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

from rlhf_core.cli import add_config_arguments, config_from_arguments
from rlhf_core.labeler import SimulatedLabeler
from rlhf_core.reward import train_reward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    cfg = config_from_arguments(ap.parse_args())
    sft = str(cfg.stage_dir("sft") / "model")
    if not Path(sft).exists():
        raise SystemExit(f"{sft} not found: run `python -m rlhf_core sft` (or make demo) first")
    r = cfg.reward
    k = cfg.data.k
    # pairs mode forwards 2 sequences per pair; give it as many sequences per step as grouped mode forwards
    pair_batch = r.batch_size * k // 2
    with open(cfg.data_path(r.train_data), encoding="utf-8") as f:
        n_prompts = sum(1 for _ in f)
    grouped_steps = (n_prompts // r.batch_size) * r.epochs
    variants = {
        "grouped": dict(ranking_mode="grouped"),
        "pairs, equal compute": dict(ranking_mode="pairs", batch_size=pair_batch, micro_batch_size=pair_batch // 2,
                                     max_steps=grouped_steps),
        "pairs, full epochs": dict(ranking_mode="pairs", batch_size=pair_batch, micro_batch_size=pair_batch // 2),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in variants.items():
            vcfg = dataclasses.replace(cfg, reward=dataclasses.replace(r, normalize_samples=0, eval_every=10**6,
                                                                       **changes))
            t0 = time.perf_counter()
            res = train_reward(vcfg, sft, None, Path(tmp) / name.replace(" ", "_"), gold=SimulatedLabeler())
            m = res.metrics
            rows.append((name, m["train/comparisons"], m["train/sequences"], m["eval/accuracy"],
                         m["eval/gold_accuracy"], time.perf_counter() - t0))
    print(f"\nK = {k}, {n_prompts} ranked prompts = {n_prompts * math.comb(k, 2)} comparisons, epochs = {r.epochs}")
    print(f"{'variant':<24}{'examples':>10}{'sequences':>11}{'acc (labels)':>14}{'acc (gold)':>12}{'seconds':>9}")
    for name, n, seqs, acc, gold, sec in rows:
        print(f"{name:<24}{n:>10}{seqs:>11}{acc:>14.4f}{gold:>12.4f}{sec:>9.0f}")


if __name__ == "__main__":
    main()
