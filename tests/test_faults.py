"""Faults, really caused: stages SIGKILLed at random points resume to the uninterrupted result; a resumed run with a
changed param retrains; an absurd learning rate stops the stage before NaN reaches a checkpoint or an output, and a
sane rerun succeeds; a busy output directory refuses a second run; corrupt checkpoints and models are named."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_core.cli import run_stage
from rlhf_core.config import from_dict
from rlhf_core.io import LockedError
from rlhf_core.models import ModelLoadError, load_causal_lm
from rlhf_core.training import NonFiniteError

from .conftest import tiny_params

UPSTREAM = {"pretrain": (), "sft": ("pretrain",), "reward": ("pretrain", "sft"), "ppo": ("sft", "reward")}
TINY_PPO = {"updates": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1,
            "max_prompt_tokens": 24, "response_length": 8, "sample_every": 1, "n_samples": 2, "snapshot_every": 1}


def workdir(tmp: Path, tiny_run, stage: str, **sections) -> Path:
    """A params file over the tiny run's data, with the tiny run's upstream models linked into its out_dir."""
    cfg0, results = tiny_run
    tmp.mkdir(parents=True, exist_ok=True)
    params = tiny_params(tmp)
    params["base"].update(data_dir=cfg0.base.data_dir, num_threads=1)  # 1 thread: bitwise-reproducible kernels
    params["ppo"] = dict(TINY_PPO)
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    for up in UPSTREAM[stage]:
        (tmp / "outputs" / up).mkdir(parents=True, exist_ok=True)
        link = tmp / "outputs" / up / "model"
        if not link.exists():
            link.symlink_to(results[up].outputs["model"], target_is_directory=True)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp


def cli(stage: str, work: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhf_core", stage, "--params", str(work / "params.yaml"), *extra],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def checkpoint_state(work: Path, stage: str) -> Path:
    ckpt = work / "outputs" / stage / "checkpoint"
    return ckpt / "trainer" / "state.json" if stage == "ppo" else ckpt / "state.json"


def kill_after_checkpoint(proc: subprocess.Popen, state: Path, at_least: int, extra_delay: float) -> int:
    """SIGKILL `proc` `extra_delay` seconds after its checkpoint reaches `at_least` steps; returns the step saved."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text()).get("step", json.loads(state.read_text()).get("update", 0)) >= at_least:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    time.sleep(extra_delay)  # lands anywhere: mid-step, mid-evaluation, mid-checkpoint write
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if not state.exists():  # killed between the two renames that replace the checkpoint: the rerun recovers it
        return at_least
    saved = json.loads(state.read_text())
    return saved.get("step", saved.get("update"))


def same_outputs(a: Path, b: Path, stage: str) -> None:
    wa, wb = load_file(a / stage / "model" / "model.safetensors"), load_file(b / stage / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = (json.loads((x / stage / "metrics.json").read_text()) for x in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-6, abs=1e-9), k


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_sigkill_at_a_random_point_resumes_to_the_uninterrupted_result(stage, tmp_path, tiny_run):
    rng = random.Random(f"kill-{stage}")
    more = {"ppo": {"updates": 6}} if stage == "ppo" else {}
    straight, killed = (workdir(tmp_path / name, tiny_run, stage, **more) for name in ("straight", "killed"))
    reference, proc = cli(stage, straight), cli(stage, killed)  # both at once: 1 thread each, 2 cores
    at = rng.randint(1, 3)
    assert kill_after_checkpoint(proc, checkpoint_state(killed, stage), at_least=at,
                                 extra_delay=rng.uniform(0, 0.3)) >= at
    resumed = cli(stage, killed)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert "resuming from" in resumed.stderr.read()
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    same_outputs(straight / "outputs", killed / "outputs", stage)
    if stage == "ppo":  # snapshots and sample tables made before the kill survive into the outputs, unchanged
        a, b = straight / "outputs" / "ppo", killed / "outputs" / "ppo"
        for name in ("snapshots", "samples"):
            assert sorted(p.name for p in (b / name).iterdir()) == sorted(p.name for p in (a / name).iterdir()) != []
        for f in (a / "samples").iterdir():
            assert (b / "samples" / f.name).read_text() == f.read_text()
        for snap in (a / "snapshots").iterdir():
            wa, wb = (load_file(x / "snapshots" / snap.name / "model.safetensors") for x in (a, b))
            assert all(torch.equal(wa[k], wb[k]) for k in wa), snap.name
        assert (b / "history.jsonl").read_text().count("\n") == 6
    assert not (killed / "outputs" / stage / "checkpoint").exists()


@pytest.mark.slow
def test_a_resume_with_a_changed_param_retrains_and_says_so(tmp_path, tiny_run):
    straight, killed = (workdir(tmp_path / name, tiny_run, "sft") for name in ("straight", "killed"))
    reference, proc = cli("sft", straight, "--set", "sft.lr=1e-3"), cli("sft", killed)
    kill_after_checkpoint(proc, checkpoint_state(killed, "sft"), at_least=4, extra_delay=0.0)
    rerun = cli("sft", killed, "--set", "sft.lr=1e-3")
    assert rerun.wait(timeout=600) == 0
    err = rerun.stderr.read()
    assert "not resuming" in err and "sft.lr: 0.003 -> 0.001" in err
    assert reference.wait(timeout=600) == 0
    same_outputs(straight / "outputs", killed / "outputs", "sft")  # what ran is what the new params say


@pytest.mark.parametrize("stage,absurd,sane", [
    ("pretrain", {"lr": 1e6, "steps": 12, "checkpoint_every": 1}, {"lr": 3e-3, "steps": 4}),
    ("sft", {"lr": 1e6, "max_steps": 6, "checkpoint_every": 1}, {"lr": 3e-3, "max_steps": 2}),
    ("reward", {"lr": 1e6, "max_steps": 6, "checkpoint_every": 1, "normalize_samples": 0},
     {"lr": 1e-3, "max_steps": 2, "normalize_samples": 0}),
    ("ppo", {"lr": 1e6}, {"lr": 1e-4}),
])
def test_an_absurd_lr_stops_before_nan_is_saved_and_a_sane_rerun_succeeds(stage, absurd, sane, tmp_path, tiny_run):
    work = workdir(tmp_path, tiny_run, stage)
    params = yaml.safe_load((work / "params.yaml").read_text())
    out = work / "outputs" / stage
    with pytest.raises(NonFiniteError, match="non-finite"):
        run_stage(from_dict({**params, stage: {**params.get(stage, {}), **absurd}}), stage)
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    for weights in out.rglob("*.safetensors"):  # whatever checkpoint or snapshot was kept holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights
    result = run_stage(from_dict({**params, stage: {**params.get(stage, {}), **sane}}), stage)
    json.loads((out / "metrics.json").read_text())  # strict JSON: no bare NaN
    assert (out / "model").exists() and result.metrics


def test_a_busy_output_directory_refuses_a_second_run_naming_the_holder(tmp_path, tiny_run):
    work = workdir(tmp_path, tiny_run, "sft")
    first = cli("sft", work)
    lock = work / "outputs" / "sft" / ".lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and str(first.pid) not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.05)
    try:
        with pytest.raises(LockedError, match=f'"pid": {first.pid}'):
            run_stage(from_dict(yaml.safe_load((work / "params.yaml").read_text())), "sft")
        second = cli("sft", work)
        assert second.wait(timeout=120) == 1 and "in use by" in second.stderr.read()
    finally:
        first.kill()
        first.wait()


def test_a_corrupt_checkpoint_is_set_aside_and_a_corrupt_model_is_named(tmp_path, tiny_run, capfd):
    from rlhf_core.sft import train_sft

    work = workdir(tmp_path, tiny_run, "sft")
    cfg = from_dict({**yaml.safe_load((work / "params.yaml").read_text()), "sft": {"max_steps": 6,
                                                                                    "checkpoint_every": 2}})

    def crash(metrics, step):
        if step == 5:
            raise KeyboardInterrupt

    base = str(work / "outputs" / "pretrain" / "model")
    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg, base, work / "outputs" / "sft", sink=crash)
    weights = work / "outputs" / "sft" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    train_sft(cfg, base, work / "outputs" / "sft")
    assert "cannot be read" in capfd.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (work / "outputs" / "sft" / "model").iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_causal_lm(str(broken))


def test_a_directory_swap_interrupted_between_its_renames_is_recovered(tmp_path):
    """atomic_path replaces a directory with two renames; a kill between them leaves the complete new version in its
    temporary folder, and the next reader or writer puts it in place."""
    from rlhf_core import io

    target = tmp_path / "checkpoint"
    with io.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("old")
    # what a kill leaves after the first rename: the old version moved aside, the new one beside it
    aside = tmp_path / ".checkpoint.x1.tmp"
    aside.mkdir()
    os.replace(target, aside / "checkpoint.old")
    (aside / "checkpoint").mkdir()
    (aside / "checkpoint" / "state.json").write_text("new")
    io.recover(target)
    assert (target / "state.json").read_text() == "new" and not aside.exists()
