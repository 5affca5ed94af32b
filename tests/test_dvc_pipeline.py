"""dvc.yaml runs the pipeline with the real dvc CLI in temporary git repositories, on the tiny config: `dvc repro`
in a fresh clone runs every stage, a second runs none, a changed param reruns only its stage and what follows it,
and `dvc exp run --set-param` works. `make_project` (a git + DVC copy of this project on the tiny config) is shared
with the flow and deployment tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import env_defaults

from .conftest import tiny_params
from .test_evaluate import TINY_EVAL, TINY_PPO

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
COPIED = ("rlhf_core", "flows", "dvc.yaml", "prefect.yaml", ".gitignore", ".dvcignore", "pyproject.toml")


def project_env(project: Path, **extra: str) -> dict[str, str]:
    """The environment the flows set up for `project` (its own MLflow store, Prefect home, DVC site cache), this
    interpreter's bin first on PATH (dvc.yaml runs `python`), one torch thread (the tests share 2 cores)."""
    env = {**os.environ, **env_defaults(project), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # an id from another store means nothing in this project's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=project_env(cwd), timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def make_project(path: Path, remote: Path | None = None) -> Path:
    """A git repository holding this project's code, dvc.yaml and tiny params, with the tiny demo data generated,
    versioned by `dvc add` (pushed to `remote` when given) and committed."""
    from rlhf_core.cli import generate_demo_data
    from rlhf_core.config import dump_params, from_dict

    path.mkdir(parents=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, path / name)
    params = {"ppo": TINY_PPO, "evaluate": TINY_EVAL} | tiny_params(path)
    params["base"].update(data_dir="data", out_dir="outputs")
    (path / "params.yaml").write_text(dump_params(from_dict(params)))  # every key, as DVC's params need
    generate_demo_data(from_dict({**params, "base": {**params["base"], "data_dir": str(path / "data")}}))
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "t@example.com"], path)
    run(["git", "config", "user.name", "t"], path)
    run([DVC, "init", "-q"], path)
    run([DVC, "config", "core.analytics", "false"], path)
    run([DVC, "add", "-q", "data"], path)
    if remote is not None:
        run([DVC, "remote", "add", "-d", "local", str(remote)], path)
        run([DVC, "push", "-q", "data.dvc"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "tiny project"], path)
    return path


def stages_under_test() -> list[str]:
    """The stages rlhf_core has today, in pipeline order (ppo and evaluate join once rlhf_core.cli.STAGES has them)."""
    from rlhf_core.cli import STAGES

    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [s for s in STAGES if s in declared]


def ran(output: str) -> list[str]:
    """The stages whose command DVC ran, in order, from `dvc repro` output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of a project whose data lives in a DVC remote; data pulled, nothing run yet."""
    tmp = tmp_path_factory.mktemp("dvcpipe")
    origin = make_project(tmp / "origin", remote=tmp / "remote")
    run(["git", "clone", "-q", str(origin), str(tmp / "clone")], tmp)
    clone = tmp / "clone"
    assert not (clone / "data").exists() and not (clone / "outputs").exists()
    run([DVC, "pull", "-q", "data.dvc"], clone)
    return clone


@pytest.mark.slow
def test_repro_runs_every_stage_then_none_then_only_what_a_param_change_touches(clone):
    stages = stages_under_test()
    target = stages[-1]

    # 1. a fresh clone: every stage runs, in pipeline order, and writes its declared metrics
    out = run([DVC, "repro", target], clone)
    assert ran(out) == stages
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)
    metrics = json.loads(run([DVC, "metrics", "show", "--json"], clone))[""]["data"]
    assert {f"outputs/{s}/metrics.json" for s in stages if s != "data"} <= set(metrics)
    for stage in stages:
        assert (clone / "outputs" / stage).is_dir()
    assert (clone / "outputs" / "sft" / "history.csv").read_text().startswith("step,")

    # 2. nothing changed: nothing runs
    out = run([DVC, "repro", target], clone)
    assert ran(out) == [] and "didn't change" in out

    # 3. one param of the last trainable stage changes: that stage and those after it rerun, none before
    changed = "ppo" if "ppo" in stages else "reward"
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params[changed]["lr"] = params[changed]["lr"] / 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([DVC, "repro", target], clone)
    assert ran(out) == stages[stages.index(changed):]


@pytest.mark.slow
def test_exp_run_set_param(clone):
    """`dvc exp run --set-param` on the committed pipeline records an experiment with the new value and its metrics.
    The value is the one the previous test already ran, so DVC's run-cache restores it instead of training again:
    the same hashes decide for `dvc repro`, `dvc exp run` and the flows."""
    stages = stages_under_test()
    changed = "ppo" if "ppo" in stages else "reward"
    value = yaml.safe_load((clone / "params.yaml").read_text())[changed]["lr"]
    run(["git", "checkout", "--", "params.yaml"], clone)
    assert ran(run([DVC, "repro", stages[-1]], clone)) == []  # back to the committed value: restored, not rerun
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "pipeline ran"], clone)
    out = run([DVC, "exp", "run", stages[-1], "--name", "half-lr", "--set-param", f"{changed}.lr={value}"], clone)
    assert ran(out) == [] and f"Stage '{changed}' is cached" in out
    exps = json.dumps(json.loads(run([DVC, "exp", "show", "--json"], clone)))
    assert "half-lr" in exps and str(value) in exps
    metrics = json.loads(run([DVC, "metrics", "show", "--json"], clone))
    assert metrics, "the experiment left no metrics in the workspace"
