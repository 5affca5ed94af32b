"""Reward over-optimization math (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization").

Pure numpy/scipy, no torch, so its tests run instantly. With d = sqrt(KL(pi || pi_init)) and R the gold reward relative
to the initial policy (R(0) = 0):

    best-of-n:  R_bon(d) = d (alpha - beta d)          peak at d* = alpha / (2 beta)
    RL:         R_RL(d)  = d (alpha - beta log d)      peak at d* = exp(alpha / beta - 1)
    KL_bon(n)  = log n - (n - 1) / n                   (an upper bound on the KL of best-of-n; Stiennon et al. 2020)

    from rlhf_core.overopt import fit_rl, kl_bon
    fit = fit_rl(d, gold)        # Fit(alpha, beta, r2, d_star)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln


def kl_bon(n):
    """KL(best-of-n || pi) = log n - (n - 1) / n for n >= 1 (scalar or array)."""
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError("best-of-n needs n >= 1")
    return np.log(n) - (n - 1.0) / n


@dataclass(frozen=True)
class Fit:
    """A fitted Gao et al. curve: R(d) = d (alpha - beta g(d)) with g(d) = d (best-of-n) or log d (RL)."""

    form: str
    """"bon" or "rl\""""
    alpha: float
    """initial slope of the gold reward in d"""
    beta: float
    """strength of the over-optimization term"""
    r2: float
    """coefficient of determination of the fit, in R-space (weighted when the fit was)"""
    d_star: float
    """d at the predicted gold peak: inf when beta <= 0 (no peak), 0 when best-of-n's gold only falls (alpha <= 0)"""

    def predict(self, d) -> np.ndarray:
        d = np.asarray(d, dtype=np.float64)
        return self.alpha * d - self.beta * d * _g(self.form, d)

    @property
    def r_star(self) -> float:
        """The predicted peak gold reward R(d*)."""
        return float(self.predict(self.d_star)) if np.isfinite(self.d_star) else float("inf")


def _g(form: str, d: np.ndarray) -> np.ndarray:
    if form == "bon":
        return d
    if form == "rl":
        return np.log(np.where(d > 0, d, 1.0))  # d log d -> 0 as d -> 0, so g(0) only ever multiplies d = 0
    raise ValueError(f"unknown form {form!r} (bon or rl)")


def _fit(form: str, d, r, sigma=None) -> Fit:
    """Least squares of R = alpha d - beta d g(d) in R-space (linear in alpha, beta), weighted by 1/sigma^2 if given."""
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)                # (P,), (P,)
    if d.shape != r.shape or d.ndim != 1:
        raise ValueError(f"d and r must be 1-D of one length, got {d.shape} and {r.shape}")
    if np.any(d < 0):
        raise ValueError("d = sqrt(KL) must be >= 0")
    if np.count_nonzero(d > 0) < 2:
        raise ValueError("fitting two parameters needs at least two points with d > 0")
    w = np.ones_like(d) if sigma is None else 1.0 / np.maximum(np.asarray(sigma, dtype=np.float64), 1e-12) ** 2
    x = np.stack([d, -d * _g(form, d)], 1)                                                  # (P, 2)
    sw = np.sqrt(w)                                                                         # (P,)
    (alpha, beta), *_ = np.linalg.lstsq(x * sw[:, None], r * sw, rcond=None)
    resid = r - x @ np.array([alpha, beta])                                                 # (P,)
    ss_tot = np.sum(w * (r - np.average(r, weights=w)) ** 2)
    r2 = 1.0 - np.sum(w * resid ** 2) / ss_tot if ss_tot > 0 else float("nan")
    with np.errstate(over="ignore", divide="ignore"):   # beta ~ 0+: a peak too far out to matter is inf
        d_star = np.inf if beta <= 0 else max(alpha / (2 * beta), 0.0) if form == "bon" else np.exp(alpha / beta - 1)
    return Fit(form, float(alpha), float(beta), float(r2), float(d_star))


def fit_bon(d, r, sigma=None) -> Fit:
    """Fit R_bon(d) = d (alpha - beta d) to gold rewards r (relative to the initial policy) at d = sqrt(KL)."""
    return _fit("bon", d, r, sigma)


def fit_rl(d, r, sigma=None) -> Fit:
    """Fit R_RL(d) = d (alpha - beta log d) to gold rewards r (relative to the initial policy) at d = sqrt(KL)."""
    return _fit("rl", d, r, sigma)


def best_of_n(proxy, gold, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected (proxy, gold) of the proxy-best of n samples per prompt, estimated without bias from N >= n samples.

    proxy, gold: (P, N) scores of N samples of each of P prompts -> (P,), (P,). Instead of taking the first n samples, every n-subset
    is averaged: the sample ranked j-th lowest by proxy (1-based) is the best of a uniform n-subset with probability
    C(j-1, n-1) / C(N, n). Lower variance than one draw, same expectation; n = 1 gives the plain sample mean.
    """
    proxy, gold = np.asarray(proxy, dtype=np.float64), np.asarray(gold, dtype=np.float64)  # (P, N)
    big_n = proxy.shape[1]
    if not 1 <= n <= big_n:
        raise ValueError(f"n must be in [1, {big_n}], got {n}")
    order = np.argsort(proxy, axis=1, kind="stable")                                        # (P, N) ascending
    j = np.arange(1, big_n + 1)                                                             # (N,)
    log_w = np.full(big_n, -np.inf)
    ok = j >= n
    log_w[ok] = _log_comb(j[ok] - 1, n - 1) - _log_comb(big_n, n)
    w = np.exp(log_w)                                                                       # (N,) sums to 1
    proxy_best = np.take_along_axis(proxy, order, 1) @ w                                    # (P,)
    gold_best = np.take_along_axis(gold, order, 1) @ w                                      # (P,)
    return proxy_best, gold_best


def _log_comb(a, b):
    return gammaln(np.asarray(a) + 1.0) - gammaln(np.asarray(b) + 1.0) - gammaln(np.asarray(a) - b + 1.0)


def sampled_kl(logprobs, ref_logprobs) -> tuple[float, float]:
    """KL(pi || pi_ref) from responses sampled by pi: mean and standard error of the per-response k1 estimate.

    logprobs, ref_logprobs: (N,) sequence log-probs log pi(y|x), log pi_ref(y|x) of N sampled responses, or (N, T)
    per-token log-probs with 0 on padding (summed over T). k1 = log pi(y|x) - log pi_ref(y|x) has expectation
    KL(pi || pi_ref) under y ~ pi (Schulman 2020, "Approximating KL"); SE = std / sqrt(N).
    """
    lp, ref = np.asarray(logprobs, dtype=np.float64), np.asarray(ref_logprobs, dtype=np.float64)
    if lp.shape != ref.shape:
        raise ValueError(f"shapes differ: {lp.shape} vs {ref.shape}")
    k1 = lp - ref if lp.ndim == 1 else (lp - ref).sum(1)                                    # (N,)
    se = float(k1.std(ddof=1) / np.sqrt(len(k1))) if len(k1) > 1 else float("nan")
    return float(k1.mean()), se


def _slope(y: np.ndarray) -> float:
    """Least-squares slope of y against 0, 1, ..., len(y) - 1."""
    x = np.arange(len(y), dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])


def hacking_alarm(proxy, gold, window: int = 3, tolerance: float = 0.02, gold_se=None, z: float = 2.0) -> dict:
    """Reward-hacking alarm over a sequence of evaluations (e.g. PPO snapshots in update order).

    It fires at point i (i >= window - 1) when, over the last `window` points ending at i, the least-squares slope of
    the proxy is > 0 and that of the gold is < 0, and gold[i] lies more than `tolerance` below the running maximum
    gold[j] = max(gold[:i+1]) -- and, when the standard errors `gold_se` are given, also more than
    z * sqrt(se_i^2 + se_j^2) below it, so sampling noise does not fire it (the two estimates are treated as
    independent; a shared baseline correlates them positively, which makes this conservative).
    Returns {"alarm": fired anywhere, "first": first index where it fired (-1 if none), "fired": per-point flags}.
    """
    proxy, gold = np.asarray(proxy, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    se = np.zeros_like(gold) if gold_se is None else np.asarray(gold_se, dtype=np.float64)
    if proxy.shape != gold.shape or gold.shape != se.shape or proxy.ndim != 1:
        raise ValueError(f"proxy, gold, gold_se must be 1-D of one length, got {proxy.shape}, {gold.shape}, {se.shape}")
    if window < 2:
        raise ValueError(f"a slope needs a window of >= 2 points, got {window}")
    fired = [False] * len(gold)
    for i in range(window - 1, len(gold)):
        lo, j = i - window + 1, int(np.argmax(gold[:i + 1]))
        drop = gold[j] - gold[i]
        fired[i] = bool(_slope(proxy[lo:i + 1]) > 0 and _slope(gold[lo:i + 1]) < 0
                        and drop > tolerance and drop > z * np.hypot(se[i], se[j]))
    first = fired.index(True) if any(fired) else -1
    return {"alarm": first >= 0, "first": first, "fired": fired}
