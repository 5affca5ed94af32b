"""Trust under faults, for real: `python -m flows.pipeline` as a subprocess in temporary clones of a tiny project
(data -> pretrain -> sft), each with its own local Prefect API, MLflow store (sqlite) and DVC cache.

- Two flows in one checkout: the second is refused at once, naming the first; dvc.lock records what ran.
- A flow killed with SIGKILL in the middle of a training stage leaves no process behind; the next flow closes what
  the killed one left RUNNING (MLflow runs KILLED, Prefect flow run Crashed), and ends with the metrics, models and
  registry of an uninterrupted run.
- params.yaml edited while a stage runs: the stage fails, and dvc.lock keeps no entry made with the wrong params.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from .test_dvc_pipeline import DVC, make_project, project_env, run

STAGES = ["data", "pretrain", "sft"]  # the stages these tests keep: two that train, one model to register
TRAINING = ["pretrain", "sft"]
LR, OTHER_LR = 0.002, 0.006  # sft.lr of the flow that runs, and of the one that must be refused


def env(project: Path) -> dict[str, str]:
    out = project_env(project)
    out.pop("PREFECT_API_URL", None)  # each flow starts its own local API, as `make demo` does
    return out


def start_flow(project: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.pipeline", *args], cwd=project, env=env(project),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only when the test failed: never leave a flow behind
    assert proc.returncode == 0, f"flow failed ({proc.returncode}):\n{log.read_text()[-6000:]}"


def processes_of(project: Path) -> list[str]:
    """Live processes whose command line, working directory or environment mention `project` (the flow passes its
    environment on, with PREFECT_HOME and MLFLOW_TRACKING_URI inside the project, to every child)."""
    found, mark = [], str(project)
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "environ", "status"]):
        info = p.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(info["cmdline"] or [])
        if mark in cmd or (info["cwd"] or "").startswith(mark) or mark in json.dumps(info["environ"] or {}):
            found.append(f"{info['pid']} {cmd}")
    return found


def stage_process(project: Path, stage: str) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if (p.info["cmdline"] or [])[-3:] == ["-m", "flows.stage", stage] and p.info["cwd"] == str(project):
            return p
    return None


def wait_for(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log.read_text()[-4000:] if log else ''}")


def outcome(project: Path) -> dict:
    """What a finished run leaves that a user relies on: each stage's metrics, DVC's hashes of its outputs, and the
    registry (versions, their aliases and model hashes)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    registry = {(v.name, v.version): (v.tags.get("dvc.md5"), sorted(v.aliases))
                for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")}
    return {"metrics": {s: json.loads((project / "outputs" / s / "metrics.json").read_text()) for s in TRAINING},
            "outs": {s: sorted((o["path"], o["md5"]) for o in lock[s]["outs"]) for s in STAGES},
            "registry": registry}


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """The tiny project, its pipeline cut to STAGES, its data in a DVC remote."""
    tmp = tmp_path_factory.mktemp("faults")
    path = make_project(tmp / "origin", remote=tmp / "remote")
    dvc_yaml = yaml.safe_load((path / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {s: dvc_yaml["stages"][s] for s in STAGES}
    (path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    run(["git", "commit", "-qam", "data, pretrain and sft only"], path)
    return path


def clone(origin: Path, name: str) -> Path:
    path = origin.parent / name
    run(["git", "clone", "-q", str(origin), str(path)], origin.parent)
    run([DVC, "pull", "-q", "data.dvc"], path)
    return path


@pytest.fixture(scope="module")
def concurrent(origin):
    """Clone `a`: a flow with sft.lr=LR runs to the end; a second flow (sft.lr=OTHER_LR) started while the first
    holds the checkout. Returns the clone, the first flow's pid, the second's result, params.yaml's sft.lr right
    after the second was refused, and the first run's outcome (the uninterrupted reference)."""
    project = clone(origin, "a")
    log = project.parent / "a-flow.log"
    first = start_flow(project, log, "--set", f"sft.lr={LR}")
    try:
        lock = project / ".rlhf" / "pipeline.lock"
        wait_for("the first flow to hold the checkout",
                 lambda: lock.exists() and f'"pid": {first.pid},' in lock.read_text(), 60, log)
        second = subprocess.run([sys.executable, "-m", "flows.pipeline", "--set", f"sft.lr={OTHER_LR}"], cwd=project,
                                env=env(project), capture_output=True, text=True, timeout=120, check=False)
        lr_meanwhile = yaml.safe_load((project / "params.yaml").read_text())["sft"]["lr"]
    finally:
        finish(first, log)
    return project, first.pid, second, lr_meanwhile, outcome(project)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_flow_in_one_checkout_is_refused_and_dvc_lock_records_what_ran(concurrent):
    project, first_pid, second, lr_meanwhile, _ = concurrent
    assert second.returncode != 0
    assert "refused" in second.stderr and "is in use by" in second.stderr and f'"pid": {first_pid},' in second.stderr
    assert lr_meanwhile != OTHER_LR  # the refused flow did not touch params.yaml
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    recorded = lock["sft"]["params"]["params.yaml"]  # dvc.yaml lists the key, or the whole section
    assert recorded.get("sft.lr", recorded.get("sft", {}).get("lr")) == LR
    assert json.loads(run([DVC, "status", "--json"], project)) == {}  # up to date, and truly so


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_flow_killed_mid_stage_leaves_nothing_behind_and_its_rerun_ends_as_an_uninterrupted_run(origin, concurrent):
    reference = concurrent[-1]
    project = clone(origin, "b")
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    stage, delay = rng.choice(TRAINING), rng.uniform(1.0, 12.0)
    print(f"FAULT_SEED={seed}: SIGKILL the flow {delay:.1f} s into its {stage} stage")
    log = project.parent / "b-killed.log"
    flow = start_flow(project, log, "--set", f"sft.lr={LR}")
    try:
        wait_for(f"the {stage} stage to start", lambda: stage_process(project, stage), 300, log)
        time.sleep(delay)
        print("running when killed:", "\n".join(processes_of(project)))
        os.kill(flow.pid, signal.SIGKILL)  # the flow process alone: its children must follow by themselves
        flow.wait(timeout=30)
        with contextlib.suppress(AssertionError):
            wait_for("the flow's processes to end", lambda: not processes_of(project), 15)
        left = processes_of(project)
        assert not left, "processes outlived the killed flow:\n" + "\n".join(left)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow.pid, signal.SIGKILL)

    log = project.parent / "b-rerun.log"
    finish(start_flow(project, log, "--set", f"sft.lr={LR}"), log)
    assert outcome(project) == reference
    assert json.loads(run([DVC, "status", "--json"], project)) == {}

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    status = {r.info.status for r in runs}
    assert "RUNNING" not in status and "KILLED" in status  # the killed flow's parent run (and its stage's, if open)
    with contextlib.closing(sqlite3.connect(project / ".prefect" / "prefect.db")) as db:
        states = sorted(s for (s,) in db.execute("SELECT state_type FROM flow_run"))
    assert states == ["COMPLETED", "CRASHED"], states


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_params_edited_while_a_stage_runs_fail_the_stage_and_leave_dvc_lock_alone(concurrent, tmp_path):
    project = concurrent[0]
    params = project / "params.yaml"
    values = yaml.safe_load(params.read_text())

    def set_sft_lr(lr: float) -> None:
        values["sft"]["lr"] = lr
        params.write_text(yaml.safe_dump(values, sort_keys=False))

    set_sft_lr(0.004)  # sft must run again
    lock = (project / "dvc.lock").read_bytes()
    progress = tmp_path / "progress.json"
    with open(tmp_path / "repro.log", "w") as out:
        proc = subprocess.Popen([DVC, "repro", "sft"], cwd=project, env={**env(project), "RLHF_PROGRESS_FILE":
                                str(progress)}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("sft to train (its first progress report)", progress.exists, 180, tmp_path / "repro.log")
        set_sft_lr(0.005)
        proc.wait(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "repro.log").read_text()
    assert proc.returncode != 0 and "params.yaml changed while this stage ran" in output, output[-3000:]
    assert (project / "dvc.lock").read_bytes() == lock
