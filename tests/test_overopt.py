"""Over-optimization math: Gao et al.'s fits recover their parameters, KL_bon, the best-of-n estimator, the sampled-KL
estimator against analytic KLs, and the reward-hacking alarm."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import integrate

from rlhf_core.overopt import Fit, best_of_n, fit_bon, fit_rl, hacking_alarm, kl_bon, sampled_kl

D_BON = np.linspace(0.0, 3.0, 16)
D_RL = np.concatenate([[0.0], np.linspace(0.1, 6.0, 20)])


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_fit_bon_recovers_alpha_beta(noise):
    rng = np.random.default_rng(0)
    r = D_BON * (1.0 - 0.4 * D_BON) + noise * rng.standard_normal(len(D_BON))
    fit = fit_bon(D_BON, r)
    assert fit.alpha == pytest.approx(1.0, rel=0.05) and fit.beta == pytest.approx(0.4, rel=0.05)
    assert fit.r2 > 0.99 and fit.d_star == pytest.approx(1.25, rel=0.05)


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_fit_rl_recovers_alpha_beta(noise):
    rng = np.random.default_rng(1)
    r = D_RL * (0.8 - 0.5 * np.log(np.where(D_RL > 0, D_RL, 1))) + noise * rng.standard_normal(len(D_RL))
    fit = fit_rl(D_RL, r)
    assert fit.alpha == pytest.approx(0.8, rel=0.05) and fit.beta == pytest.approx(0.5, rel=0.05)
    assert fit.r2 > 0.99 and fit.d_star == pytest.approx(np.exp(0.8 / 0.5 - 1), rel=0.05)


def test_the_two_forms_are_told_apart():
    r_bon = D_RL * (1.0 - 0.3 * D_RL)
    r_rl = D_RL * (0.8 - 0.5 * np.log(np.where(D_RL > 0, D_RL, 1)))
    assert fit_bon(D_RL, r_bon).r2 > 0.999 > fit_rl(D_RL, r_bon).r2
    assert fit_rl(D_RL, r_rl).r2 > 0.999 > fit_bon(D_RL, r_rl).r2


@pytest.mark.parametrize("form, alpha, beta", [("bon", 1.0, 0.4), ("rl", 0.8, 0.5), ("rl", 1.2, 0.4)])
def test_d_star_is_the_argmax_of_the_fitted_curve(form, alpha, beta):
    fit = Fit(form, alpha, beta, 1.0, (alpha / (2 * beta)) if form == "bon" else np.exp(alpha / beta - 1))
    grid = np.linspace(1e-4, 50, 500_001)
    assert grid[np.argmax(fit.predict(grid))] == pytest.approx(fit.d_star, rel=1e-3)
    # and the fitting code computes that same d* from the parameters it found
    d = D_BON if form == "bon" else D_RL
    assert (fit_bon if form == "bon" else fit_rl)(d, fit.predict(d)).d_star == pytest.approx(fit.d_star, rel=1e-6)
    assert fit.r_star == pytest.approx(fit.predict(grid).max(), rel=1e-6)


def test_no_peak_when_gold_never_turns_down():
    assert fit_rl(D_RL, 0.5 * D_RL).d_star == np.inf
    assert fit_bon(D_BON, 0.5 * D_BON + 0.1 * D_BON ** 2).d_star == np.inf
    assert fit_bon(D_BON, -0.1 * D_BON - 0.3 * D_BON ** 2).d_star == 0.0   # gold only falls: the best is d = 0


def test_weights_discount_an_uncertain_point():
    r = D_BON * (1.0 - 0.4 * D_BON)
    r[5] += 1.0                                   # a wild point ...
    sigma = np.full(len(r), 0.01)
    sigma[5] = 10.0                               # ... that its standard error says not to trust
    assert abs(fit_bon(D_BON, r).alpha - 1.0) > 0.05
    weighted = fit_bon(D_BON, r, sigma)
    assert weighted.alpha == pytest.approx(1.0, rel=0.01) and weighted.beta == pytest.approx(0.4, rel=0.01)


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match="two points"):
        fit_rl([0.0, 1.0], [0.0, 0.5])


def test_kl_bon_values_and_monotone():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(np.log(2) - 0.5, abs=1e-12)
    ks = kl_bon(np.arange(1, 1001))
    assert np.all(np.diff(ks) > 0)
    with pytest.raises(ValueError):
        kl_bon(0)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_bon_equals_the_integral_for_a_continuous_proxy(n):
    # with a continuous proxy, best-of-n has density n F^(n-1) relative to the base policy (F uniform after the
    # probability integral transform): KL = integral_0^1 n u^(n-1) log(n u^(n-1)) du
    kl, _ = integrate.quad(lambda u: n * u ** (n - 1) * np.log(n * u ** (n - 1)), 0, 1)
    assert kl_bon(n) == pytest.approx(kl, rel=1e-6)


def test_best_of_n_estimator_equals_brute_force_over_subsets():
    rng = np.random.default_rng(2)
    proxy, gold = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    for n in range(1, 7):
        picks = [[g[list(s)][np.argmax(p[list(s)])] for s in itertools.combinations(range(6), n)]
                 for p, g in zip(proxy, gold)]
        np.testing.assert_allclose(best_of_n(proxy, gold, n)[1], [np.mean(row) for row in picks], rtol=1e-9)
    np.testing.assert_allclose(best_of_n(proxy, gold, 1), (proxy.mean(1), gold.mean(1)))
    np.testing.assert_allclose(best_of_n(proxy, gold, 6)[0], proxy.max(1))


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


@pytest.mark.parametrize("p, q", [
    (np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])),
    (np.array([0.9] + [0.1 / 9] * 9), np.full(10, 0.1)),
])
def test_sampled_kl_is_unbiased_with_a_correct_standard_error(p, q):
    rng = np.random.default_rng(3)
    n, t = 200_000, 4                                          # responses of t tokens, each token ~ p independently
    x = rng.choice(len(p), size=(n, t), p=p)
    mean, se = sampled_kl(np.log(p)[x], np.log(q)[x])          # (n, t) per-token log-probs
    truth = t * _kl(p, q)
    assert abs(mean - truth) < 4 * se
    sd = np.sqrt(t * (np.sum(p * np.log(p / q) ** 2) - _kl(p, q) ** 2))   # analytic sd of the per-response k1
    assert se == pytest.approx(sd / np.sqrt(n), rel=0.05)
    # same thing from sequence log-probs (N,), and the SE shrinks like 1/sqrt(N)
    seq = np.log(p)[x].sum(1), np.log(q)[x].sum(1)
    assert sampled_kl(*seq) == pytest.approx((mean, se))
    assert sampled_kl(seq[0][:2000], seq[1][:2000])[1] / se == pytest.approx(10.0, rel=0.1)


def test_hacking_alarm_fires_when_proxy_rises_and_gold_falls():
    proxy = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    gold = [0.0, 0.3, 0.5, 0.55, 0.4, 0.2, 0.0]
    out = hacking_alarm(proxy, gold, window=3, tolerance=0.02)
    assert out["alarm"] and out["first"] == 4     # gold over points 2..4 (0.5, 0.55, 0.4) has a negative slope
    assert not any(out["fired"][:4])
    assert out["fired"][-1]


@pytest.mark.parametrize("proxy, gold", [
    ([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], [0.0, 0.2, 0.4, 0.5, 0.6, 0.65]),          # both rise: fine
    ([3.0, 2.5, 2.0, 1.5, 1.0, 0.5], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]),           # both fall: collapse, not hacking
    ([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], [0.5, 0.505, 0.497, 0.503, 0.495, 0.5]),   # gold noise below the tolerance
])
def test_hacking_alarm_stays_quiet_otherwise(proxy, gold):
    assert not hacking_alarm(proxy, gold, window=3, tolerance=0.02)["alarm"]


def test_hacking_alarm_quiet_on_noise_below_tolerance_at_any_window():
    rng = np.random.default_rng(4)
    proxy = np.linspace(0, 3, 40) + 0.01 * rng.standard_normal(40)
    gold = 0.3 + 0.004 * rng.standard_normal(40)              # |noise| < 0.02 / 2 with overwhelming probability
    for window in (2, 3, 5):
        assert not hacking_alarm(proxy, gold, window=window, tolerance=0.02)["alarm"]
    assert hacking_alarm(proxy, gold, window=3, tolerance=0.0)["alarm"]  # with no tolerance the noise does fire it


def test_hacking_alarm_ignores_a_fall_within_the_standard_errors():
    proxy = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    gold = [0.0, 0.3, 0.5, 0.55, 0.4, 0.2, 0.0]
    assert not hacking_alarm(proxy, gold, 3, 0.02, gold_se=[0.3] * 7, z=2.0)["alarm"]    # falls of <= 0.55 < 2 * 0.42
    # se 0.06: the bar is 2 * 0.06 * sqrt(2) = 0.17; the fall 0.15 at index 4 is under it, 0.35 at index 5 over it
    assert hacking_alarm(proxy, gold, 3, 0.02, gold_se=[0.06] * 7, z=2.0)["first"] == 5
