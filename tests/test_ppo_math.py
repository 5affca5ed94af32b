"""PPO math against naive loops and hand-computed cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.losses import (
    adaptive_kl_coef,
    compute_gae,
    kl_penalty,
    policy_loss,
    token_rewards,
    truncate_after_eos,
    value_loss,
)


def naive_gae(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over one episode of `length` tokens, by brute force."""
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < length else 0.0) - values[t] for t in range(length)]
    adv = [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, length)) for t in range(length)]
    return adv, [a + v for a, v in zip(adv, values[:length])]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 7), st.floats(0.5, 1.0), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_gae_equals_a_naive_loop_under_masks(batch, width, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(batch, width, generator=g, dtype=torch.float64), torch.randn(batch, width, generator=g,
                                                                                              dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for b in range(batch):
        n = int(lengths[b])
        ref_adv, ref_ret = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(ref_adv, rel=1e-9, abs=1e-9)
        assert ret[b, :n].tolist() == pytest.approx(ref_ret, rel=1e-9, abs=1e-9)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0  # nothing after the episode


def test_gae_hand_computed():
    # one episode of 2 tokens, gamma=1, lam=0.5: delta_1 = 1 - 0.5 = 0.5; delta_0 = 0 + 0.5 - 0.2 = 0.3
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.5]]), torch.ones(1, 2), 1.0, 0.5)
    assert adv.tolist()[0] == pytest.approx([0.3 + 0.5 * 0.5, 0.5])
    assert ret.tolist()[0] == pytest.approx([0.55 + 0.2, 1.0])


def test_policy_loss_clips_on_both_sides():
    one = torch.ones(1, 1)
    lp = lambda r: torch.tensor([[math.log(r)]])
    old = torch.zeros(1, 1)
    # positive advantage, ratio 1.5 > 1 + 0.2: clipped at 1.2 -> loss = -1.2 * A
    loss, s = policy_loss(lp(1.5), old, torch.tensor([[2.0]]), one, 0.2)
    assert loss.item() == pytest.approx(-2.4) and s["clipfrac"].item() == 1.0
    # positive advantage, ratio 0.5 < 0.8: not clipped (max picks the pessimistic unclipped term) -> -0.5 * A
    loss, s = policy_loss(lp(0.5), old, torch.tensor([[2.0]]), one, 0.2)
    assert loss.item() == pytest.approx(-1.0) and s["clipfrac"].item() == 0.0
    # negative advantage, ratio 0.5 < 0.8: clipped at 0.8 -> loss = 0.8 * |A|
    loss, s = policy_loss(lp(0.5), old, torch.tensor([[-2.0]]), one, 0.2)
    assert loss.item() == pytest.approx(1.6) and s["clipfrac"].item() == 1.0
    # negative advantage, ratio 1.5: unclipped -> 1.5 * |A|
    loss, s = policy_loss(lp(1.5), old, torch.tensor([[-2.0]]), one, 0.2)
    assert loss.item() == pytest.approx(3.0) and s["clipfrac"].item() == 0.0
    # approxkl = 0.5 (log r)^2
    assert s["approxkl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)


def test_policy_loss_gradient_is_zero_when_clipped():
    new = torch.tensor([[math.log(1.5)]], requires_grad=True)
    policy_loss(new, torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)[0].backward()
    assert new.grad.item() == 0.0


def test_policy_loss_ignores_masked_tokens():
    new, old = torch.tensor([[0.1, 5.0]]), torch.zeros(1, 2)
    loss, _ = policy_loss(new, old, torch.tensor([[1.0, 100.0]]), torch.tensor([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-math.exp(0.1))


def test_value_loss_hand_computed_and_clipped_on_both_sides():
    m = torch.ones(1, 1)
    # V moved from 0 to 1 (clip 0.2 -> 0.2), return 2: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 0.5*3.24
    loss, frac = value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.tensor([[2.0]]), m, 0.2)
    assert loss.item() == pytest.approx(1.62) and frac.item() == 1.0
    # V moved from 0 to -1 (clipped to -0.2), return -2: unclipped 1, clipped 3.24
    loss, frac = value_loss(torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([[-2.0]]), m, 0.2)
    assert loss.item() == pytest.approx(1.62) and frac.item() == 1.0
    # V moved towards the return within the clip: both terms equal -> 0.5 * (0.1 - 0.5)^2
    loss, frac = value_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.tensor([[0.5]]), m, 0.2)
    assert loss.item() == pytest.approx(0.08) and frac.item() == 0.0


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 with r = pi_ref/pi = 0.5: (0.5 - 1) - log 0.5
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2x")


def test_both_kl_estimators_are_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 400_000, replacement=True)
    for est in ("k1", "k3"):
        mean = kl_penalty(p.log()[x], q.log()[x], est).mean().item()
        assert mean == pytest.approx(true_kl, abs=0.01), est
    assert (kl_penalty(p.log()[x], q.log()[x], "k3") >= 0).all()


def test_truncate_after_eos_and_masks():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 6, 2, 7, 2], [5, 2, 9, 9, 9], [5, 6, 7, 8, 9]])
    cut, mask, has_eos = truncate_after_eos(responses, eos, pad)
    assert cut.tolist() == [[5, 6, 2, 0, 0], [5, 2, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_token_rewards_put_the_score_on_the_last_kept_token():
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = token_rewards(kl, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    assert r.tolist()[0] == pytest.approx([-0.05, 2.0 - 0.05, 0.0])
    assert r.tolist()[1] == pytest.approx([-0.1, -0.1, -1.0 - 0.1])


def test_adaptive_kl_controller_follows_ziegler():
    # KL above target: error clipped to +0.2; n/horizon = 64/10000
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10_000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))
    # KL slightly below target: proportional error -0.1
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 10_000, 64) == pytest.approx(0.1 * (1 - 0.1 * 64 / 10_000))
    # far below: clipped to -0.2
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 10_000, 10_000) == pytest.approx(0.1 * 0.8)
