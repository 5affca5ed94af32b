"""PPO on the tiny pipeline, trained for real: it runs, logs TRL's metric names, changes the policy, and a run
SIGKILLed mid-way and restarted ends with the same metrics and weights as one that never stopped."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_core.config import from_dict
from rlhf_core.ppo import train_ppo

from .conftest import tiny_params

TRL_NAMES = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/ratio", "val/num_eos_tokens")


def tiny_ppo_params(tmp: Path, data_dir: str, **ppo) -> dict:
    params = tiny_params(tmp)
    params["base"]["data_dir"] = data_dir
    params["base"]["num_threads"] = 1  # same thread count in every process: bitwise-reproducible CPU kernels
    params["ppo"] = {"updates": 4, "rollout_batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2,
                     "ppo_epochs": 2, "max_prompt_tokens": 24, "response_length": 8, "lr": 1e-3, "sample_every": 2,
                     "n_samples": 4, **ppo}
    return params


def link_models(tiny_run, out: Path) -> tuple[str, str]:
    """The tiny run's SFT and reward models, linked where the ppo stage of `out` looks for them."""
    _, results = tiny_run
    for stage in ("sft", "reward"):
        (out / stage).mkdir(parents=True, exist_ok=True)
        link = out / stage / "model"
        if not link.exists():
            link.symlink_to(results[stage].outputs["model"], target_is_directory=True)
    return str(out / "sft" / "model"), str(out / "reward" / "model")


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_ppo_trains_and_logs_trl_metrics(tmp_path, tiny_run, value_model):
    cfg0 = tiny_run[0]
    cfg = from_dict(tiny_ppo_params(tmp_path, cfg0.base.data_dir, value_model=value_model, ptx_coef=0.5))
    sft, rm = link_models(tiny_run, tmp_path / "outputs")
    from rlhf_core.labeler import SimulatedLabeler
    result = train_ppo(cfg, sft, rm, tmp_path / "outputs" / "ppo", gold=SimulatedLabeler())
    history = [json.loads(line) for line in result.outputs["history"].read_text().splitlines()]
    assert len(history) == 4
    for name in (*TRL_NAMES, "objective/gold", "loss/ptx_avg"):
        assert all(math.isfinite(h[name]) for h in history), name
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the first batch is sampled by pi = pi_SFT
    assert history[-1]["objective/kl_k3"] > 0.0  # k3 is never negative; k1 can be, on 8 samples
    assert all(h["objective/rlhf_reward"] == pytest.approx(h["objective/scores"] + h["objective/non_score_reward"],
                                                           abs=1e-5) for h in history)
    policy, reference = load_file(result.outputs["model"] / "model.safetensors"), load_file(Path(sft) / "model.safetensors")
    changed = sum(not torch.equal(policy[k], reference[k]) for k in reference)
    assert changed > len(reference) // 2
    assert sorted(p.name for p in result.outputs["samples"].iterdir()) == ["update_0002.jsonl", "update_0004.jsonl"]
    assert not (tmp_path / "outputs" / "ppo" / "checkpoint").exists()


def run_cli(params: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhf_core", "ppo", "--params", str(params)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkilled_run_resumes_to_the_same_end(tmp_path, tiny_run):
    cfg0 = tiny_run[0]
    runs = {}
    for name in ("straight", "killed"):
        params = tiny_ppo_params(tmp_path / name, cfg0.base.data_dir, updates=6)
        link_models(tiny_run, tmp_path / name / "outputs")
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(params))
        runs[name] = tmp_path / name

    straight = run_cli(runs["straight"] / "params.yaml", runs["straight"])
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    # kill -9 once a checkpoint past update 2 exists, then restart: it must resume, not start over
    state = runs["killed"] / "outputs" / "ppo" / "checkpoint" / "trainer" / "state.json"
    proc = run_cli(runs["killed"] / "params.yaml", runs["killed"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["update"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = json.loads(state.read_text())["update"]
    assert 3 <= killed_at < 6
    assert not (runs["killed"] / "outputs" / "ppo" / "model").exists()
    resumed = run_cli(runs["killed"] / "params.yaml", runs["killed"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    a = json.loads((runs["straight"] / "outputs" / "ppo" / "metrics.json").read_text())
    b = json.loads((runs["killed"] / "outputs" / "ppo" / "metrics.json").read_text())
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    wa = load_file(runs["straight"] / "outputs" / "ppo" / "model" / "model.safetensors")
    wb = load_file(runs["killed"] / "outputs" / "ppo" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    ha = (runs["straight"] / "outputs" / "ppo" / "history.jsonl").read_text().splitlines()
    hb = (runs["killed"] / "outputs" / "ppo" / "history.jsonl").read_text().splitlines()
    assert len(ha) == len(hb) == 6
