"""The math against hand-computed values and naive references."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.losses import lm_loss, masked_mean, masked_whiten, pairwise_loss, ranking_loss, token_logprobs


def test_pairwise_loss_matches_rlhf_md_check_values():
    assert pairwise_loss(torch.tensor([0.8]), torch.tensor([0.2])).item() == pytest.approx(0.4375, abs=5e-5)
    assert pairwise_loss(torch.tensor([0.2]), torch.tensor([0.8])).item() == pytest.approx(1.0375, abs=5e-5)
    # both at once: the mean, and never the tutorial's -sigmoid(r_w - r_l).mean()
    both = pairwise_loss(torch.tensor([0.8, 0.2]), torch.tensor([0.2, 0.8])).item()
    assert both == pytest.approx((0.43749 + 1.03749) / 2, abs=1e-4)
    assert both != pytest.approx(-torch.sigmoid(torch.tensor([0.6, -0.6])).mean().item(), abs=1e-2)


def test_margin_enters_inside_the_sigmoid():
    got = pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=0.5).item()
    assert got == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)


def naive_ranking_loss(rewards, groups):
    """-1/C(K,2) * sum over pairs of log sigmoid(r_w - r_l), averaged over prompts: a plain loop."""
    total = 0.0
    for members, ranks in groups:
        k = len(members)
        pairs = [(a, b) for a, b in itertools.permutations(range(k), 2) if ranks[a] < ranks[b]]
        s = sum(-math.log(1 / (1 + math.exp(-(rewards[members[a]] - rewards[members[b]])))) for a, b in pairs)
        total += s / math.comb(k, 2)
    return total / len(groups)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 6), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_ranking_loss_equals_a_naive_loop_over_pairs(ks, rnd):
    rewards, groups, pairs, group_ids = [], [], [], []
    for g, k in enumerate(ks):
        members = list(range(len(rewards), len(rewards) + k))
        rewards += [rnd.uniform(-3, 3) for _ in range(k)]
        ranks = list(range(1, k + 1))
        rnd.shuffle(ranks)
        groups.append((members, ranks))
        for a, b in itertools.combinations(range(k), 2):
            w, lo = (a, b) if ranks[a] < ranks[b] else (b, a)
            pairs.append((members[w], members[lo]))
            group_ids.append(g)
    got = ranking_loss(torch.tensor(rewards, dtype=torch.float64), torch.tensor(pairs), torch.tensor(group_ids))
    assert got.item() == pytest.approx(naive_ranking_loss(rewards, groups), rel=1e-9)


def test_ranking_loss_with_one_pair_per_group_is_the_mean_pairwise_loss():
    r = torch.tensor([0.8, 0.2, 0.2, 0.8])
    got = ranking_loss(r, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]))
    assert got.item() == pytest.approx((0.4375 + 1.0375) / 2, abs=1e-4)


def test_center_rewards_term():
    r = torch.tensor([1.0, 3.0])
    plain = ranking_loss(r, torch.tensor([[1, 0]]), torch.tensor([0]))
    centred = ranking_loss(r, torch.tensor([[1, 0]]), torch.tensor([0]), center_coef=0.01)
    assert (centred - plain).item() == pytest.approx(0.01 * 16.0)


def test_token_logprobs_equals_gather_of_log_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(token_logprobs(logits, labels, temperature), ref)


def test_lm_loss_counts_only_masked_next_tokens():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    loss, n = lm_loss(logits, ids, mask)
    picks = [(0, 1, 2), (0, 2, 3), (1, 0, 1), (1, 1, 2)]  # (row, position predicting, target position)
    ref = -sum(torch.log_softmax(logits[b, t], -1)[ids[b, u]] for b, t, u in picks) / 4
    assert n.item() == 4 and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].std().item() == pytest.approx(1.0, abs=1e-4)
    assert masked_mean(masked_whiten(x, m, shift_mean=False), m).item() == pytest.approx(2.0, abs=1e-5)
