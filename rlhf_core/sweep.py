"""A sweep over KL coefficients: one PPO run per coefficient, each evaluated along the way, and the gold-vs-KL frontier.

    python -m rlhf_core.sweep --kl-coefs 0.0 0.01 0.05            # params.yaml; needs outputs/{sft,reward}/model
    python -m rlhf_core.sweep --kl-coefs 0 0.05 --set ppo.updates=30 --out outputs/sweep

Each run saves policy snapshots (ppo.snapshot_every, or 6 evenly spaced when that is 0 or above ppo.updates) that
rlhf_core.evaluate turns into (d = sqrt(KL), proxy, gold) points. Gao, Schulman & Hilton 2022 found a KL penalty acts mostly like early stopping:
the runs trace one gold-vs-d curve, stopping at different d. Writes <out>/kl_<coef>/{ppo,evaluate}/, <out>/frontier.csv
(kl_coef, update, d, kl, proxy, gold), <out>/frontier.png, <out>/metrics.json (a fit per run and one over all runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rlhf_core.config import Config
from rlhf_core.evaluate import evaluate, fit_curve, fit_metrics, plot_overopt, proxy_spearman, read_csv, write_csv
from rlhf_core.training import MetricsSink, StageResult, null_sink, write_metrics


def sweep(cfg: Config, kl_coefs: list[float], out_dir: Path, sink: MetricsSink = null_sink, gold=None,
          sft_model: str | None = None, reward_model: str | None = None) -> StageResult:
    """PPO once per KL coefficient into out_dir/kl_<coef>/, each run's snapshots evaluated; best-of-n from SFT once."""
    from rlhf_core.labeler import SimulatedLabeler
    from rlhf_core.ppo import train_ppo

    out_dir, gold = Path(out_dir), gold or SimulatedLabeler()
    sft_model = sft_model or str(cfg.stage_dir("sft") / "model")
    reward_model = reward_model or str(cfg.stage_dir("reward") / "model")
    every = cfg.ppo.snapshot_every if 0 < cfg.ppo.snapshot_every <= cfg.ppo.updates else max(1, cfg.ppo.updates // 6)
    frontier, series, metrics = [], [], {}
    for i, coef in enumerate(kl_coefs):
        tag, run = f"kl_{coef:g}", out_dir / f"kl_{coef:g}"
        # best-of-n does not depend on the coefficient: the first run computes it, the others skip it
        run_cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_coef=coef, snapshot_every=every),
                                      evaluate=dataclasses.replace(cfg.evaluate, bon_n=cfg.evaluate.bon_n * (i == 0)))
        prefixed = _prefixed(sink, f"{tag}/")
        ppo = train_ppo(run_cfg, sft_model, reward_model, run / "ppo", prefixed, gold=gold)
        res = evaluate(run_cfg, sft_model, reward_model, {"policy": ppo.outputs["model"]}, run / "evaluate", prefixed,
                       gold=gold, snapshots=run / "ppo" / "snapshots")
        rows = read_csv(run / "evaluate" / "plots" / "overopt_rl.csv")
        frontier += [{"kl_coef": coef, **r} for r in rows]
        fit = fit_curve(rows, "rl")
        series.append((f"β_KL = {coef:g}", rows, fit))
        metrics.update({f"{tag}/{k.split('/', 1)[1]}": v for k, v in res.metrics.items() if k.startswith("overopt/")})
        metrics.update({f"{tag}/gold_delta": res.metrics["policy/gold_delta"], f"{tag}/kl": res.metrics["policy/kl"],
                        f"{tag}/gold_max": max(r["gold"] for r in rows),
                        f"{tag}/hacking_alarm": res.metrics["hacking_alarm"]})
        if i == 0 and (run / "evaluate" / "plots" / "overopt_bon.csv").exists():
            bon = read_csv(run / "evaluate" / "plots" / "overopt_bon.csv")
            series.append(("best-of-n", bon, fit_curve(bon, "bon")))
    pooled = fit_curve(frontier, "rl")
    metrics.update(fit_metrics("pooled/rl", pooled))
    metrics.update({f"pooled/rl_{k}": v for k, v in proxy_spearman(frontier).items()})
    series.append(("all runs pooled", [], pooled))
    metrics["hacking_alarm"] = int(any(metrics[f"kl_{c:g}/hacking_alarm"] for c in kl_coefs))
    write_csv(out_dir / "frontier.csv", frontier)
    plot_overopt(series, out_dir / "frontier.png", "Gold vs √KL across KL coefficients (relative to SFT)")
    write_metrics(out_dir / "metrics.json", metrics)
    sink(metrics, 0)
    return StageResult({"frontier": out_dir / "frontier.csv", "plot": out_dir / "frontier.png",
                        "metrics": out_dir / "metrics.json", **{f"kl_{c:g}": out_dir / f"kl_{c:g}" for c in kl_coefs}},
                       metrics)


def _prefixed(sink: MetricsSink, prefix: str) -> MetricsSink:
    return lambda metrics, step: sink({prefix + k: v for k, v in metrics.items()}, step)


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.cli import add_config_arguments, config_from_arguments

    ap = argparse.ArgumentParser(prog="python -m rlhf_core.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kl-coefs", type=float, nargs="+", required=True, help="KL coefficients, one PPO run each")
    ap.add_argument("--out", default=None, help="output directory (default: <base.out_dir>/sweep)")
    add_config_arguments(ap)
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    result = sweep(cfg, args.kl_coefs, Path(args.out) if args.out else cfg.stage_dir("sweep"))
    for k, v in sorted(result.metrics.items()):
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
