"""PPO's online watch (ppo.stop_on_alarm) on the tiny pipeline, trained for real, against a constructed gold that
falls whenever the proxy rises: the run stops where the alarm fires, its policy is the snapshot best under gold, and
that checkpoint is what gets registered, with a model card, in a real MLflow registry (sqlite in a temp dir)."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from flows import registry
from rlhf_core import overopt, watch
from rlhf_core.config import from_dict, to_dict
from rlhf_core.forwards import score_texts
from rlhf_core.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf_core.ppo import train_ppo

from .test_ppo import link_models, tiny_ppo_params


class AgainstTheProxy:
    """A gold reward that is minus the reward model's score: whatever PPO learns to please the proxy with, gold
    punishes -- reward hacking by construction. A real scorer (the GoldScorer protocol), not a stand-in for one."""

    def __init__(self, rm_dir: str):
        self.tok, self.rm = load_tokenizer(rm_dir), load_reward_model(rm_dir).eval()

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [-s for s in score_texts(self.rm, self.tok, prompts, responses, max_length=64)]


@pytest.fixture(scope="module")
def stopped_run(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("watch")
    params = tiny_ppo_params(tmp, tiny_run[0].base.data_dir, updates=8, snapshot_every=1, stop_on_alarm=True,
                             watch_prompts=16, kl_coef=0.0, lr=2e-3)
    params["evaluate"] = {"alarm_window": 3, "alarm_tolerance": 0.0, "alarm_z": 0.0, "batch_size": 16}
    cfg = from_dict(params)
    sft, rm = link_models(tiny_run, tmp / "outputs")
    t0 = time.perf_counter()
    result = train_ppo(cfg, sft, rm, tmp / "outputs" / "ppo", gold=AgainstTheProxy(rm))
    print(f"stopped run: {time.perf_counter() - t0:.1f} s", (result.outputs["snapshots"] / "watch.json").read_text())
    return cfg, sft, rm, result


def test_stop_on_alarm_stops_where_proxy_rises_and_gold_falls_and_keeps_the_best_snapshot(stopped_run):
    cfg, _, _, result = stopped_run
    out = result.outputs
    decision = json.loads((out["snapshots"] / "watch.json").read_text())
    points = decision["points"]
    history = [json.loads(line) for line in out["history"].read_text().splitlines()]
    # it stopped early, at the first point where the alarm (recomputed here from the recorded points) fires
    fired = overopt.hacking_alarm([p["proxy"] for p in points], [p["gold"] for p in points], 3, 0.0,
                                  [p["gold_se"] for p in points], 0.0)
    assert fired["alarm"] and decision["alarm_update"] == points[fired["first"]]["update"]
    assert len(history) == decision["alarm_update"] < cfg.ppo.updates
    assert [p["update"] for p in points] == list(range(decision["alarm_update"] + 1))
    assert points[-1]["proxy"] > points[-3]["proxy"] and points[-1]["gold"] < points[-3]["gold"]
    # the watch's numbers are the ones PPO logged at those updates
    assert [h["watch/gold"] for h in history] == pytest.approx([p["gold"] for p in points[1:]])
    # the output policy is the snapshot best under gold, byte for byte -- not the last update's weights
    best = max(points[1:], key=lambda p: p["gold"])
    assert decision["best_update"] == best["update"] == result.metrics["watch/best_update"]
    snap = out["snapshots"] / f"update_{best['update']:04d}"
    assert (out["model"] / "model.safetensors").read_bytes() == (snap / "model.safetensors").read_bytes()
    if best["update"] != decision["alarm_update"]:
        last = load_file(out["snapshots"] / f"update_{decision['alarm_update']:04d}" / "model.safetensors")
        assert any(not torch.equal(last[k], v) for k, v in load_file(out["model"] / "model.safetensors").items())


def test_the_watch_leaves_trainings_random_stream_alone(stopped_run):
    cfg, sft, rm, result = stopped_run
    tok = load_tokenizer(sft)
    ref, model, reward = load_causal_lm(sft, tok), load_causal_lm(result.outputs["model"], tok), load_reward_model(rm)
    prompts = ["\n\nHuman: hello there\n\nAssistant:", "\n\nHuman: I like dogs\n\nAssistant:"]
    gold = AgainstTheProxy(rm)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    base = watch.baseline(ref, reward, tok, prompts, cfg, gold)
    row = watch.point(model, ref, reward, tok, prompts, cfg, gold, base, update=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.isfinite([row["d"], row["proxy"], row["gold"]]).all()


def test_the_best_checkpoint_is_registered_with_a_model_card(stopped_run, tmp_path):
    cfg, _, _, result = stopped_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        exp = client.create_experiment("cards", artifact_location=(tmp_path / "artifacts").as_uri())
        run_id = client.create_run(exp).info.run_id
        tags = {"data.md5": "0123abcd.dir", "git.sha": "f" * 40, "dvc.md5": "4567.dir", "rlhf.stage": "ppo"}
        version, created = registry.register_folder("policy-card", result.outputs["model"], run_id, tags)
        assert created
        evaluation = {"policy/gold_mean": 0.41, "policy/gold_se": 0.03, "policy/win_rate": 0.62,
                      "policy/win_rate_se": 0.028, "policy/kl": 1.5, "policy/kl_se": 0.1, "hacking_alarm": 0,
                      "overopt/rl_alpha": 0.5, "overopt/rl_beta": 0.2, "overopt/rl_r2": 0.91,
                      "overopt/rl_d_star": 3.5, "overopt/rl_gold_star": 0.7, **result.metrics}
        gate = registry.gate(evaluation, None, None)
        params = {f"{s}.{k}": str(v) for s, section in to_dict(cfg).items() for k, v in section.items()}
        registry.write_card("policy-card", str(version.version), "ppo", tags, params, evaluation, gate)

        v = client.get_model_version("policy-card", str(version.version))
        card = v.description
        for field in ("RLHF policy", "0123abcd.dir", "f" * 40, "ppo.kl_coef: 0.0", "ppo.stop_on_alarm: True",
                      "policy/gold_mean: 0.41 ± 0.03", "policy/win_rate: 0.62 ± 0.028", "Champion gate",
                      "verdict: **passed**", "α = 0.5", "R² = 0.910", "d* = 3.5",
                      f"snapshot of update {result.metrics['watch/best_update']}"):
            assert field in card, field
        assert v.tags["eval.gold"] == "0.41 ± 0.03" and v.tags["params.ppo.kl_coef"] == "0.0"
        assert v.tags["watch.best_update"] == str(result.metrics["watch/best_update"])
        # what the registry serves is the best checkpoint's weights
        served = mlflow.artifacts.download_artifacts(f"models:/policy-card/{version.version}", dst_path=str(tmp_path))
        assert (tmp_path / served / "model.safetensors").read_bytes() == \
            (result.outputs["model"] / "model.safetensors").read_bytes()
    finally:
        mlflow.set_tracking_uri(None)
