"""PPO's online reward-hacking watch (ppo.stop_on_alarm): gold and proxy along the run, and when to stop.

At each snapshot PPO samples the policy on `ppo.watch_prompts` held-out prompts, scores proxy and gold
(rlhf_core.scoring, the measurement evaluation uses) and adds a point (d = sqrt(KL), proxy, gold relative to SFT) to
the curve that starts at SFT (update 0). The reward-hacking alarm of rlhf_core.overopt (evaluate.alarm_window,
alarm_tolerance, alarm_z) runs on that curve after every point; when it fires the run stops, and the policy PPO
outputs is the snapshot with the highest gold, not the last one -- early stopping at the gold's peak, which is what a
KL penalty mostly buys anyway (Gao et al. 2022).

Sampling uses a private random stream (seeded by base.seed, the same for every point: common random numbers), so
training's stream, and therefore the trained policy, is the same with the watch on or off up to the stop.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rlhf_core import overopt
from rlhf_core.config import Config
from rlhf_core.scoring import Samples, curve_point, sample_and_score


@contextmanager
def private_rng(device: torch.device):
    """Random draws inside leave the global CPU (and this CUDA device's) generator where they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def baseline(ref, rm, tok, prompts: list[str], cfg: Config, gold, bf16: bool = False) -> Samples:
    """SFT's samples of the watch prompts: the origin every point is measured from."""
    with private_rng(next(ref.parameters()).device):
        return sample_and_score(ref, ref, rm, tok, prompts, cfg, gold, cfg.base.seed, bf16)


def point(policy, ref, rm, tok, prompts: list[str], cfg: Config, gold, base: Samples, update: int,
          bf16: bool = False) -> dict[str, float]:
    """{update, d, kl, proxy, gold, gold_se} of the policy now, relative to `base` (SFT) on the same prompts."""
    with private_rng(next(policy.parameters()).device):
        s = sample_and_score(policy, ref, rm, tok, prompts, cfg, gold, cfg.base.seed, bf16)
    row = curve_point(s, base)
    return {"update": update, **{k: row[k] for k in ("d", "kl", "proxy", "gold", "gold_se")}}


def origin() -> dict[str, float]:
    """SFT's own point: the curve starts at (0, 0)."""
    return {"update": 0, "d": 0.0, "kl": 0.0, "proxy": 0.0, "gold": 0.0, "gold_se": 0.0}


def alarm_now(rows: list[dict], cfg: Config) -> bool:
    """Does the reward-hacking alarm fire at the newest point (proxy rising, gold falling beyond its noise)?"""
    e = cfg.evaluate
    fired = overopt.hacking_alarm([r["proxy"] for r in rows], [r["gold"] for r in rows], e.alarm_window,
                                  e.alarm_tolerance, [r["gold_se"] for r in rows], e.alarm_z)["fired"]
    return bool(fired[-1])


def best(rows: list[dict]) -> dict:
    """The snapshot (update > 0) with the highest gold; the earliest of equals."""
    return max((r for r in rows if r["update"] > 0), key=lambda r: r["gold"])
