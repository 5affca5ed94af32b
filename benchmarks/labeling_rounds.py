"""Labeling rounds on the embedded default, with the simulated labeler: does labeling the model's own samples pay off,
and does a second round?

    python benchmarks/labeling_rounds.py --out outputs/bench_labeling [--set label.n_prompts=1000 --set ppo.updates=30]

Needs the default pipeline's SFT model (outputs/sft/model) and data (data/). Runs, all from that SFT model:
  own        round 1: label.k samples per prompt of label.prompts from SFT, ranked by the simulated labeler
             (Plackett-Luce on the gold) -> reward model -> PPO -> evaluation (rlhf_core.rounds)
  template   the data generator's template rankings (reward.train_data), cut at the same number of comparisons
             -> reward model -> PPO -> evaluation
  round 2    samples of round 1's policy labeled, reward model on both rounds' rankings -> PPO -> evaluation
Every reward model is scored on two held-out sets: the template rankings (reward.eval_data) and rankings of SFT's
own samples on held-out prompts (evaluate.prompts, labeled the same way): accuracy against the gold ordering.
Prints a table of reward-model accuracy, PPO gold (relative to SFT), win rate against SFT and KL per arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from rlhf_core.cli import add_config_arguments, config_from_arguments
from rlhf_core.label import label_simulated, make_tasks
from rlhf_core.labeler import SimulatedLabeler
from rlhf_core.loaders import load_preferences
from rlhf_core.models import load_reward_model, load_tokenizer
from rlhf_core.reward import held_out_accuracy
from rlhf_core.rounds import labeling_model, round_dir, run_round


def labeled(cfg, model: str, out: Path, round_no: int, prompts: str | None = None, n: int | None = None) -> Path:
    """The simulated labeler's rankings of `model`'s samples (label section; `prompts`/`n` override it)."""
    lab = dataclasses.replace(cfg.label, prompts=prompts or cfg.label.prompts, n_prompts=n or cfg.label.n_prompts)
    lcfg = dataclasses.replace(cfg, label=lab)
    tasks = make_tasks(lcfg, model, out, round_no)
    return label_simulated(lcfg, tasks.outputs["tasks"], out, round_no).outputs["rankings"]


def comparisons(path: Path) -> int:
    return sum(len(g.pairs) for g in load_preferences(path))


def template_cut(cfg, n_comparisons: int, out: Path) -> Path:
    """The first template rankings holding at least `n_comparisons` comparisons."""
    rows, total = [], 0
    for line in Path(cfg.data_path(cfg.reward.train_data)).read_text().splitlines():
        if total >= n_comparisons:
            break
        rows.append(line)
        total += len(load_preferences_line(line))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rankings.jsonl").write_text("\n".join(rows) + "\n")
    return out / "rankings.jsonl"


def load_preferences_line(line: str) -> tuple:
    ranks = json.loads(line)["ranks"]
    return tuple((a, b) for i, a in enumerate(ranks) for b in ranks[i + 1:] if a != b)


def gold_accuracy(cfg, rm_dir: Path, held_out: dict[str, list]) -> dict[str, float]:
    tok, model = load_tokenizer(str(rm_dir)), load_reward_model(str(rm_dir)).eval()
    return {name: held_out_accuracy(model, tok, groups, cfg, False, SimulatedLabeler())["eval/gold_accuracy"]
            for name, groups in held_out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench_labeling")
    ap.add_argument("--held-out", type=int, default=300, help="held-out prompts labeled from SFT's samples")
    ap.add_argument("--arms", default="own,template", help="own (then round 2), template: run in two processes "
                    "with the same --out to halve the wall time; the second to finish prints both")
    add_config_arguments(ap)
    args = ap.parse_args()
    cfg, out = config_from_arguments(args), Path(args.out).resolve()
    sft = str(cfg.stage_dir("sft") / "model")
    if not Path(sft).exists():
        raise SystemExit(f"{sft} not found: run `python -m rlhf_core sft` (or make demo) first")
    t0 = time.perf_counter()

    # 1. rankings: SFT's own samples (round 1), template rankings with as many comparisons, held-out own samples
    own = labeled(cfg, labeling_model(cfg, out / "own", 1), round_dir(out / "own", 1) / "label", 1)
    template = template_cut(cfg, comparisons(own), out / "template")
    held_own = labeled(cfg, sft, out / "held_out_own", 99, prompts=cfg.evaluate.prompts, n=args.held_out)
    held_out = {"template pairs": load_preferences(cfg.data_path(cfg.reward.eval_data)),
                "own-sample pairs": load_preferences(held_own)}
    print(f"comparisons: own {comparisons(own)}, template {comparisons(template)}; held-out groups: "
          f"{ {k: len(v) for k, v in held_out.items()} }  ({time.perf_counter() - t0:.0f} s)", flush=True)

    # 2. one round on each kind of rankings, then a second round on the own-sample arm
    arms = {"1 round, own samples": ("own", out / "own", 1, None), "2 rounds, own samples": ("own", out / "own", 2, None),
            "1 round, templates": ("template", out / "template_arm", 1, template)}
    for name, (group, where, r, rankings) in arms.items():
        if group not in args.arms.split(","):
            continue
        if r == 2:
            labeled(cfg, labeling_model(cfg, where, 2), round_dir(where, 2) / "label", 2)
        result = run_round(cfg, where, r, rankings=rankings)
        result.update(gold_accuracy(cfg, round_dir(where, r) / "reward" / "model", held_out))
        print(name, json.dumps(result), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        (out / "results").mkdir(parents=True, exist_ok=True)
        (out / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))
    results = {name: json.loads((out / "results" / f"{name}.json").read_text()) for name in arms
               if (out / "results" / f"{name}.json").exists()}

    # 3. the table
    cols = [("comparisons", "comparisons", ".0f"), ("template pairs", "RM gold acc (template)", ".3f"),
            ("own-sample pairs", "RM gold acc (own)", ".3f"), ("gold_delta", "PPO gold - SFT", "+.3f"),
            ("win_rate", "win rate vs SFT", ".3f"), ("kl", "KL", ".2f"), ("d_star", "d* (fit)", ".2f")]
    print(f"\n{'arm':<24}" + "".join(f"{title:>24}" for _, title, _ in cols))
    for name, m in results.items():
        print(f"{name:<24}" + "".join(f"{format(m[k], fmt) if k in m else '-':>24}" for k, _, fmt in cols))
    print(f"\n{time.perf_counter() - t0:.0f} s in this process; outputs under {out}")


if __name__ == "__main__":
    main()
