"""The champion gate's statistics: is a candidate policy worse than the champion beyond noise?

Pure numpy, no MLflow: flows/registry.py feeds it the per-prompt gold rewards of both policies on the same held-out
prompts (each evaluation's completions.csv) and acts on the verdict.

Paired comparison (each prompt is its own control, so the prompts' own spread cancels): with D_i = gold_cand_i −
gold_champ_i over N shared prompts, mean D and SE = std(D) / sqrt(N). The gate is a non-inferiority test: it refuses
the candidate only when even the upper end of the interval, mean D + z·SE, lies below −margin -- the candidate is worse
than the margin by more than noise explains. A candidate within noise of the champion (or better) passes.

    from rlhf_core.gate import paired_gate
    paired_gate(candidate_gold, champion_gold, margin=0.0, z=2.0)   # {"diff", "se", "n", "upper", "passed", ...}
"""

from __future__ import annotations

import math

import numpy as np


def paired_gate(candidate, champion, margin: float = 0.0, z: float = 2.0) -> dict:
    """Non-inferiority of `candidate` to `champion`: (N,) scores of the same N prompts, in the same order.

    Returns diff (mean of candidate − champion), se, n, upper (= diff + z·se), the candidate's win rate against the
    champion (ties half) and passed (upper >= −margin)."""
    cand, champ = np.asarray(candidate, dtype=np.float64), np.asarray(champion, dtype=np.float64)  # (N,), (N,)
    if cand.shape != champ.shape or cand.ndim != 1:
        raise ValueError(f"paired scores must be 1-D of one length, got {cand.shape} and {champ.shape}")
    if len(cand) < 2:
        raise ValueError(f"a standard error needs at least 2 paired prompts, got {len(cand)}")
    if margin < 0 or z < 0:
        raise ValueError(f"margin and z must be >= 0, got {margin} and {z}")
    d = cand - champ                                                                               # (N,)
    diff, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    tie = np.isclose(d, 0.0, rtol=0, atol=1e-9)                                                    # (N,)
    win_rate = float(np.mean((d > 0) & ~tie) + 0.5 * np.mean(tie))
    upper = diff + z * se
    return {"diff": diff, "se": se, "n": len(d), "upper": upper, "margin": float(margin), "z": float(z),
            "win_rate": win_rate, "passed": bool(upper >= -margin)}


def pair_by_prompt(candidate: dict, champion: dict) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the prompts both evaluations share, aligned: {prompt key: score} twice -> (N,), (N,)."""
    shared = [k for k in candidate if k in champion]
    return (np.array([candidate[k] for k in shared], dtype=np.float64),
            np.array([champion[k] for k in shared], dtype=np.float64))
