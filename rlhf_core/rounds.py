"""Iterated labeling rounds: label -> reward model on all rounds' comparisons so far -> PPO -> label the new policy ...

    python -m rlhf_core.rounds                                # label.rounds rounds; needs outputs/sft/model
    python -m rlhf_core.rounds --rounds 2 --set label.n_prompts=500 --out outputs/rounds

Round r samples label.k responses per prompt from the SFT model (r = 1) or from round r-1's policy, has them ranked
(`rlhf_core.label`), trains a reward model from SFT on the rankings of rounds 1..r (reward.eval_data stays the
held-out set), runs PPO from SFT against it and evaluates the policy (gold, win rate and KL against SFT, and the
over-optimization fit from PPO snapshots). Anthropic's HH data was collected this way, in weekly online rounds (Bai et
al. 2022, sec. 4.5). Writes <out>/round_<r>/{label,reward,ppo,evaluate}/ and <out>/rounds.csv + metrics.json, one
row per round, so a team sees whether another round paid off. People label through the Prefect flow
(flows/labeling.py), which pauses between `rlhf_core.label.make_tasks` and `import_labels`; `run_round` takes the
round's rankings file either way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from pathlib import Path

from rlhf_core import io
from rlhf_core.config import Config
from rlhf_core.evaluate import evaluate
from rlhf_core.label import label_simulated, make_tasks
from rlhf_core.labeler import SimulatedLabeler
from rlhf_core.loaders import load_preferences
from rlhf_core.models import base_model_path
from rlhf_core.ppo import train_ppo
from rlhf_core.reward import train_reward
from rlhf_core.training import MetricsSink, StageResult, null_sink, write_metrics

SUMMARY = {"rm_gold_accuracy": "reward/eval/gold_accuracy", "rm_accuracy": "reward/eval/accuracy",
           "gold_delta": "evaluate/policy/gold_delta", "win_rate": "evaluate/policy/win_rate",
           "kl": "evaluate/policy/kl", "d_star": "evaluate/overopt/rl_d_star",
           "gold_star": "evaluate/overopt/rl_gold_star", "hacking_alarm": "evaluate/hacking_alarm"}
"""one row per round in rounds.csv and MLflow: the name there <- the stage metric it comes from"""


def round_dir(out_dir: Path, round_no: int) -> Path:
    return Path(out_dir) / f"round_{round_no}"


def labeling_model(cfg: Config, out_dir: Path, round_no: int) -> str:
    """Round 1 labels the SFT model's samples; round r the policy of round r-1."""
    if round_no == 1:
        return str(cfg.stage_dir("sft") / "model")
    return str(round_dir(out_dir, round_no - 1) / "ppo" / "model")


def all_rankings(out_dir: Path, round_no: int) -> Path:
    """The rankings of rounds 1..round_no in one file (the reward model of round r learns from all of them)."""
    lines = [line for r in range(1, round_no + 1)
             for line in (round_dir(out_dir, r) / "label" / "rankings.jsonl").read_text().splitlines() if line]
    return io.write_text(round_dir(out_dir, round_no) / "rankings_all.jsonl", "\n".join(lines) + "\n")


def run_round(cfg: Config, out_dir: Path, round_no: int, sink: MetricsSink = null_sink, gold=None,
              rankings: Path | None = None) -> dict[str, float]:
    """Reward model on rounds 1..r's rankings (or on `rankings`), PPO against it, evaluation: the round's summary
    (SUMMARY keys)."""
    gold, here = gold or SimulatedLabeler(), round_dir(out_dir, round_no)
    sft = str(cfg.stage_dir("sft") / "model")
    rankings = rankings or all_rankings(out_dir, round_no)
    every = cfg.ppo.snapshot_every or max(1, cfg.ppo.updates // 6)  # the over-optimization point needs snapshots
    rcfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, train_data=str(rankings.resolve())),
                               ppo=dataclasses.replace(cfg.ppo, snapshot_every=every))
    prefixed = _prefixed(sink, f"round_{round_no}/")
    init = {"sft": sft, "base": base_model_path(cfg)}.get(cfg.reward.init_from, cfg.reward.init_from)
    rm = train_reward(rcfg, init, sft, here / "reward", prefixed, gold=gold if cfg.reward.gold_eval else None)
    ppo = train_ppo(rcfg, sft, str(rm.outputs["model"]), here / "ppo", prefixed, gold=gold)
    ev = evaluate(rcfg, sft, str(rm.outputs["model"]), {"policy": ppo.outputs["model"]}, here / "evaluate", prefixed,
                  gold=gold, snapshots=here / "ppo" / "snapshots")
    found = {**{f"reward/{k}": v for k, v in rm.metrics.items()}, **{f"evaluate/{k}": v for k, v in ev.metrics.items()}}
    summary = {name: float(found[key]) for name, key in SUMMARY.items() if key in found}
    summary["comparisons"] = float(sum(len(g.pairs) for g in load_preferences(rankings)))  # pairs trained on
    write_metrics(here / "metrics.json", summary)
    return summary


def write_summary(out_dir: Path, rows: list[dict]) -> StageResult:
    """rounds.csv (one row per round) and metrics.json (round_<r>/<name>)."""
    columns = ["round", *dict.fromkeys(k for r in rows for k in r if k != "round")]
    with io.atomic_path(Path(out_dir) / "rounds.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    metrics = {f"round_{r['round']}/{k}": v for r in rows for k, v in r.items()
               if k != "round" and isinstance(v, float) and math.isfinite(v)}
    write_metrics(Path(out_dir) / "metrics.json", metrics)
    return StageResult({"rounds": Path(out_dir) / "rounds.csv", "metrics": Path(out_dir) / "metrics.json"}, metrics)


def rounds(cfg: Config, n_rounds: int, out_dir: Path, sink: MetricsSink = null_sink, gold=None) -> StageResult:
    """`n_rounds` rounds labeled by the simulated labeler (people: flows/labeling.py)."""
    rows = []
    for r in range(1, n_rounds + 1):
        here = round_dir(out_dir, r) / "label"
        tasks = make_tasks(cfg, labeling_model(cfg, out_dir, r), here, r)
        labels = label_simulated(cfg, tasks.outputs["tasks"], here, r)
        summary = run_round(cfg, out_dir, r, sink, gold)
        rows.append({"round": r, **tasks.metrics, **labels.metrics, **summary})
        sink({f"rounds/{k}": v for k, v in rows[-1].items() if k != "round"}, r)
    return write_summary(out_dir, rows)


def _prefixed(sink: MetricsSink, prefix: str) -> MetricsSink:
    return lambda metrics, step: sink({prefix + k: v for k, v in metrics.items()}, step)


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.cli import add_config_arguments, config_from_arguments

    ap = argparse.ArgumentParser(prog="python -m rlhf_core.rounds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="labeling rounds (default: label.rounds)")
    ap.add_argument("--out", default=None, help="output directory (default: <base.out_dir>/rounds)")
    add_config_arguments(ap)
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    result = rounds(cfg, args.rounds or cfg.label.rounds, Path(args.out) if args.out else cfg.stage_dir("rounds"))
    for k, v in sorted(result.metrics.items()):
        print(f"{k}: {v:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
