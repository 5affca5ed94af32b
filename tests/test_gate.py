"""The champion gate's statistics on constructed score arrays: hand-computed values, scipy's paired t statistic as a
naive reference, and the verdicts the gate exists for (refuse worse beyond noise, accept within noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ttest_rel

from rlhf_core.gate import pair_by_prompt, paired_gate


def test_paired_gate_by_hand():
    g = paired_gate([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], margin=0.0, z=2.0)
    se = math.sqrt(5 / 3) / 2  # D = 0, 1, 2, 3: mean 1.5, sample variance 5/3, N = 4
    assert g["diff"] == pytest.approx(1.5) and g["se"] == pytest.approx(se) and g["n"] == 4
    assert g["upper"] == pytest.approx(1.5 + 2 * se)
    assert g["win_rate"] == pytest.approx(0.875)  # three wins, one tie counted half
    assert g["passed"]


def test_se_is_the_paired_t_statistics_denominator():
    rng = np.random.default_rng(0)
    champ = rng.normal(size=50)
    cand = champ + rng.normal(0.1, 0.3, size=50)
    g = paired_gate(cand, champ)
    assert g["diff"] / g["se"] == pytest.approx(ttest_rel(cand, champ).statistic)


def test_refuses_a_candidate_worse_beyond_noise_and_accepts_one_within_noise():
    rng = np.random.default_rng(1)
    champ = rng.normal(0.5, 1.0, size=300)  # prompts differ a lot in how much gold they allow
    worse = champ - 0.15 + rng.normal(0, 0.3, size=300)       # diff -0.15, SE ~0.017: 8 SE below
    within = champ - 0.02 + rng.normal(0, 0.5, size=300)      # diff ~-0.02, SE ~0.03: inside 2 SE
    refused, accepted = paired_gate(worse, champ), paired_gate(within, champ)
    assert not refused["passed"] and refused["upper"] < 0
    assert accepted["passed"] and accepted["diff"] < 0 < accepted["upper"]
    # a margin says how much worse is still acceptable: 0.15 lower passes with margin 0.2, not with 0.05
    assert paired_gate(worse, champ, margin=0.2)["passed"] and not paired_gate(worse, champ, margin=0.05)["passed"]
    # z = 0 compares the point estimate alone: the within-noise candidate is then refused
    assert not paired_gate(within, champ, z=0.0)["passed"]


def test_pairing_sees_what_an_unpaired_comparison_cannot():
    """The prompts' own spread (sd 1) cancels in the paired difference: a 0.1 deficit with per-prompt noise 0.05 is
    refused, though independent-sample standard errors (~0.08) would call it noise."""
    rng = np.random.default_rng(2)
    champ = rng.normal(0.0, 1.0, size=300)
    cand = champ - 0.1 + rng.normal(0, 0.05, size=300)
    unpaired_se = math.sqrt(cand.var(ddof=1) / 300 + champ.var(ddof=1) / 300)
    assert cand.mean() - champ.mean() + 2 * unpaired_se > 0  # the unpaired upper bound would pass it
    assert not paired_gate(cand, champ)["passed"]


def test_pair_by_prompt_aligns_shared_prompts_only():
    cand = {(0, "a"): 1.0, (1, "b"): 2.0, (2, "c"): 3.0}
    champ = {(2, "c"): 0.5, (0, "a"): 0.0, (3, "d"): 9.0}
    x, y = pair_by_prompt(cand, champ)
    assert x.tolist() == [1.0, 3.0] and y.tolist() == [0.0, 0.5]


@pytest.mark.parametrize("cand, champ, words", [([1.0], [1.0], "at least 2"), ([1.0, 2.0], [1.0], "one length")])
def test_bad_inputs_are_refused(cand, champ, words):
    with pytest.raises(ValueError, match=words):
        paired_gate(cand, champ)
