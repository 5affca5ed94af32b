"""prefect.yaml on a real Prefect server, as a team runs it: `prefect server start` on 127.0.0.1, the `gpu` process
work pool, `prefect deploy --all`, a worker on the pool, a deployment run of the tiny pipeline that completes and
logs to MLflow. Bounded: every wait has a timeout, and every process the test started is stopped by its id (its
process group), also when the test fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .test_dvc_pipeline import make_project, project_env

PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """A background process in its own session, SIGINT restored (else a worker ignores it, then hangs on SIGTERM)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGINT to the process's group (it and its children), then SIGKILL what is left after `grace` seconds."""
    if proc.poll() is not None:
        return
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # children that outlived their parent, or a parent that ignored SIGINT
    proc.wait(timeout=10)


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_for(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (result := check()) is not None:
            return result
        time.sleep(2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def run(cmd: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_from_prefect_yaml_runs_on_a_gpu_pool_worker(tmp_path):
    project = make_project(tmp_path / "project", remote=tmp_path / "dvc-remote")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = project_env(project, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
                      MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RLHF_REPO_DIR=str(project))
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    started: list[subprocess.Popen] = []
    try:
        started.append(start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, project,
                             server_log))

        def healthy():
            try:
                return get(f"{api}/health") or None
            except OSError:
                return None

        wait_for("the Prefect server", healthy, 120, [server_log])
        run([PREFECT, "work-pool", "create", "gpu", "--type", "process"], env, project)
        run([PREFECT, "--no-prompt", "deploy", "--all"], env, project)
        deployment = get(f"{api}/deployments/name/rlhf-pipeline/nightly")
        assert deployment["work_pool_name"] == "gpu"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [
            yaml.safe_load((project / "prefect.yaml").read_text())["deployments"][0]["schedules"][0]["cron"]]

        started.append(start([PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1"], env, project, worker_log))
        # the tiny params.yaml as it is (no GPU profile): the CPU version of the nightly run
        out = run([PREFECT, "deployment", "run", "rlhf-pipeline/nightly", "--param", "profile=null"], env, project)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

        def finished():
            state = get(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for("the deployment run", finished, 600, [worker_log, server_log])
        assert state == "COMPLETED", worker_log.read_text()[-5000:]
    finally:
        for proc in reversed(started):
            stop(proc)
    assert all(p.poll() is not None for p in started)

    # the run happened in the worker's checkout and tracked itself in MLflow
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    finally:
        mlflow.set_tracking_uri(None)
    kinds = sorted(r.data.tags.get("rlhf.kind", r.data.tags.get("rlhf.stage", "")) for r in runs)
    assert "pipeline" in kinds and "sft" in kinds and "evaluate" in kinds
    assert (project / "dvc.lock").exists() and (project / "outputs" / "ppo" / "model" / "config.json").exists()
