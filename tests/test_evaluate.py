"""The evaluation stage and the KL sweep on the tiny pipeline: outputs exist, and the numbers agree with each other and
with independent recomputation (gold re-scored, SFT against itself, the last snapshot against the final policy)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml

from rlhf_core.config import load_config
from rlhf_core.evaluate import evaluate, text_stats
from rlhf_core.forwards import Completions, encode_prompts, ppo_proxy, response_logprobs, scalar_outputs
from rlhf_core.labeler import SimulatedLabeler
from rlhf_core.losses import truncate_after_eos
from rlhf_core.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf_core.overopt import kl_bon

from .conftest import tiny_params

TINY_PPO = {"updates": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1,
            "response_length": 8, "snapshot_every": 1, "lr": 2e-3}
TINY_EVAL = {"bon_n": 4, "bon_prompts": 8, "batch_size": 16, "n_side_by_side": 3}


@pytest.fixture(scope="module")
def ppo_run(tiny_run, tmp_path_factory):
    """A params file whose out_dir holds the tiny SFT and reward models (linked) and a 3-update PPO run with snapshots."""
    from rlhf_core.ppo import train_ppo

    cfg0, results = tiny_run
    tmp = tmp_path_factory.mktemp("evaluate")
    params = tiny_params(tmp) | {"ppo": TINY_PPO, "evaluate": TINY_EVAL}
    params["base"]["data_dir"] = cfg0.base.data_dir
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    cfg = load_config(params_file)
    for stage in ("sft", "reward"):
        cfg.stage_dir(stage).mkdir(parents=True)
        (cfg.stage_dir(stage) / "model").symlink_to(results[stage].outputs["model"].resolve())
    train_ppo(cfg, str(cfg.stage_dir("sft") / "model"), str(cfg.stage_dir("reward") / "model"), cfg.stage_dir("ppo"),
              gold=SimulatedLabeler())
    return cfg, params_file


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_consistent_metrics_report_and_curves(ppo_run, tmp_path):
    cfg, _ = ppo_run
    sft, ppo = cfg.stage_dir("sft") / "model", cfg.stage_dir("ppo")
    res = evaluate(cfg, str(sft), str(cfg.stage_dir("reward") / "model"), {"policy": ppo / "model", "sft_copy": sft},
                   tmp_path, snapshots=ppo / "snapshots")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m == pytest.approx(res.metrics, abs=1e-6)

    # SFT loaded a second time as a "policy": the same samples from the same random stream (KL 0, no gold difference),
    # and against an independent SFT sample it wins half the time
    assert abs(m["sft_copy/kl"]) < 1e-4 and m["sft_copy/gold_delta"] == 0.0 and m["sft/kl"] == 0.0
    assert abs(m["sft_copy/win_rate"] - 0.5) < 3 * m["sft_copy/win_rate_se"]
    assert m["sft_copy/win_rate"] == m["sft/win_rate"] and 0 < m["sft/win_rate_se"] < 0.2
    # PPO moved the policy: a KL clearly above its standard error
    assert m["policy/kl"] > 2 * m["policy/kl_se"] > 0
    assert 0 <= m["policy/win_rate"] <= 1 and 0 <= m["policy/distinct_1"] <= 1

    # completions.csv holds what the metrics summarise; its gold re-scores to the same values
    rows = _csv(tmp_path / "completions.csv")
    n_prompts = min(cfg.evaluate.n_prompts, cfg.data.eval_prompts)
    assert {r["model"] for r in rows} == {"sft", "policy", "sft_copy", "snapshot_update_0001", "snapshot_update_0002",
                                          "snapshot_update_0003"}
    pol = [r for r in rows if r["model"] == "policy"]
    assert len(pol) == n_prompts
    gold = SimulatedLabeler().score_batch([r["prompt"] for r in pol], [r["completion"] for r in pol])
    np.testing.assert_allclose([float(r["gold"]) for r in pol], gold, atol=1e-5)
    assert m["policy/gold_mean"] == pytest.approx(np.mean(gold), abs=1e-5)
    assert m["policy/kl"] == pytest.approx(np.mean([float(r["kl"]) for r in pol]), abs=1e-4)

    # RL curve: update 0 is SFT at the origin; the last snapshot is the final policy, so it has the policy's KL
    rl = _csv(tmp_path / "plots" / "overopt_rl.csv")
    assert [int(r["update"]) for r in rl] == [0, 1, 2, 3]
    assert float(rl[0]["d"]) == float(rl[0]["gold"]) == float(rl[0]["proxy"]) == 0.0
    assert float(rl[-1]["kl"]) == pytest.approx(m["policy/kl"], abs=1e-4)
    assert float(rl[-1]["gold"]) == pytest.approx(m["policy/gold_delta"], abs=1e-4)
    assert float(rl[-1]["d"]) == pytest.approx(math.sqrt(max(m["policy/kl"], 0)), abs=1e-4)

    # best-of-n: d from the KL_bon formula, proxy never falls as n grows, the origin at n = 1
    bon = _csv(tmp_path / "plots" / "overopt_bon.csv")
    assert [int(r["n"]) for r in bon] == [1, 2, 3, 4]
    np.testing.assert_allclose([float(r["d"]) for r in bon], np.sqrt(kl_bon(np.arange(1, 5))), atol=1e-6)
    proxy = [float(r["proxy"]) for r in bon]
    assert proxy[0] == 0.0 and bool(np.all(np.diff(proxy) >= -1e-6)) and proxy[-1] > 0
    assert {"overopt/rl_alpha", "overopt/rl_r2", "overopt/bon_alpha", "overopt/bon_beta"} <= m.keys()
    assert -1 <= m["overopt/rl_proxy_spearman"] <= 1
    assert m["hacking_alarm"] in (0, 1) and "hacking_alarm_update" in m

    assert (tmp_path / "plots" / "overopt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| prompt | sft | policy | sft_copy |" in report and "Reward-hacking alarm" in report
    side = report.split("## Completions side by side")[1]
    assert side.count("\n| ") == 1 + cfg.evaluate.n_side_by_side  # header + one row per prompt


def test_evaluate_stage_runs_from_the_cli_with_standard_paths(ppo_run):
    from rlhf_core.cli import STAGES, run_stage

    cfg, _ = ppo_run
    assert STAGES.index("evaluate") == STAGES.index("ppo") + 1
    res = run_stage(cfg, "evaluate")
    assert res.outputs["metrics"] == cfg.stage_dir("evaluate") / "metrics.json"
    assert {"policy/gold_mean", "sft/gold_mean", "policy/win_rate", "policy/kl", "hacking_alarm"} <= res.metrics.keys()
    assert (cfg.stage_dir("evaluate") / "plots" / "overopt_rl.csv").exists()


def test_batched_logprobs_and_scores_equal_unpadded_ones(ppo_run):
    cfg, _ = ppo_run
    path = str(cfg.stage_dir("sft") / "model")
    tok, model = load_tokenizer(path), load_causal_lm(path).eval()
    rm = load_reward_model(str(cfg.stage_dir("reward") / "model")).eval()
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: My dog hurt his leg and I am so stressed.\n\nAssistant:"]
    torch.manual_seed(0)
    queries, qmask = encode_prompts(tok, prompts, 48)
    with torch.no_grad():
        seqs = model.generate(input_ids=queries, attention_mask=qmask, do_sample=True, top_k=0, max_new_tokens=8,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        q = queries.shape[1]
        responses, rmask, has_eos = truncate_after_eos(seqs[:, q:], tok.eos_token_id, tok.pad_token_id)
        c = Completions(queries, qmask, responses, rmask, torch.ones_like(has_eos), None)
        batched_lp = (response_logprobs(model, c.input_ids, c.attention_mask, q, responses, 0.7) * rmask).sum(1)
        scores = ppo_proxy(rm, c, cfg.ppo)
        for i in range(len(prompts)):       # each row alone, without any padding
            row = torch.cat([queries[i][qmask[i] == 1], responses[i][rmask[i] == 1]])[None]
            n_q = int(qmask[i].sum())
            logits = model(input_ids=row).logits[0, n_q - 1:-1] / 0.7
            lp = torch.log_softmax(logits, -1).gather(-1, row[0, n_q:, None]).sum()
            assert batched_lp[i] == pytest.approx(lp.item(), abs=1e-4)
            assert scores[i] == pytest.approx(scalar_outputs(rm, row, torch.ones_like(row))[0, -1].item(), abs=1e-4)
    # the no-EOS rule: a response without EOS scores -missing_eos_penalty
    no_eos = ppo_proxy(rm, Completions(queries, qmask, responses, rmask, torch.zeros_like(has_eos), None), cfg.ppo)
    assert torch.all(no_eos == -cfg.ppo.missing_eos_penalty)


def test_text_stats_by_hand():
    s = text_stats(["good good good good", "a fine day"])
    assert s["distinct_1"] == pytest.approx(4 / 7)              # {good, a, fine, day} of 7 words
    assert s["distinct_2"] == pytest.approx(3 / 5)              # {good good, a fine, fine day} of 5 bigrams
    assert s["repetition"] == pytest.approx((2 / 3 + 0) / 2)    # "good good" x3: two of three repeat


def test_sweep_cli_writes_a_frontier_per_kl_coefficient(ppo_run, tmp_path):
    from rlhf_core.sweep import main

    _, params_file = ppo_run
    out = tmp_path / "sweep"
    assert main(["--params", str(params_file), "--kl-coefs", "0", "0.5", "--set", "ppo.updates=3",
                 "--set", "ppo.snapshot_every=0", "--out", str(out)]) == 0
    rows = _csv(out / "frontier.csv")
    assert [(float(r["kl_coef"]), int(r["update"])) for r in rows] == [(c, u) for c in (0.0, 0.5) for u in range(4)]
    m = json.loads((out / "metrics.json").read_text())
    assert {"kl_0/rl_alpha", "kl_0.5/rl_alpha", "pooled/rl_alpha", "pooled/rl_r2", "pooled/rl_proxy_spearman",
            "hacking_alarm"} <= m.keys()
    assert (out / "kl_0" / "evaluate" / "plots" / "overopt_bon.csv").exists()          # best-of-n once ...
    assert not (out / "kl_0.5" / "evaluate" / "plots" / "overopt_bon.csv").exists()    # ... not per coefficient
    assert (out / "frontier.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "kl_0.5" / "ppo" / "snapshots").iterdir()) == ["update_0001", "update_0002",
                                                                                "update_0003"]
