"""MLflow conventions shared by the stage command, the flows and the registry: experiment, tags, params, lineage.

One parent run per pipeline run (the flow opens it) and one child run per stage (`mlflow.parentRunId`): the stage
command opens it when DVC runs the stage, the flow opens a short one when DVC skipped or restored the stage, so every
parent run shows every stage's metrics. Every run is tagged with the git SHA, the data version (data.dvc's md5) and
the Prefect flow-run id (empty outside Prefect).
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import mlflow

from flows.dvc_cache import data_md5
from rlhf_core.config import Config, to_dict

EXPERIMENT = "rlhf-pipeline"
PARENT_ENV, FLOW_RUN_ENV = "RLHF_PARENT_RUN_ID", "RLHF_FLOW_RUN_ID"


def experiment_id() -> str:
    """MLFLOW_EXPERIMENT_ID when set (the flow sets it for its stage commands), else the experiment named
    MLFLOW_EXPERIMENT_NAME (default "rlhf-pipeline"), created on first use. Unlike `mlflow.set_experiment`, this
    leaves the process environment alone."""
    if eid := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return eid
    client, name = mlflow.MlflowClient(), os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def git_sha(repo: Path = Path(".")) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def run_tags(stage: str | None, parent_run_id: str | None, flow_run_id: str | None) -> dict[str, str]:
    sha = git_sha()
    tags = {"mlflow.source.git.commit": sha, "git.sha": sha, "data.md5": data_md5(),
            "prefect.flow_run_id": flow_run_id or ""}
    if stage:
        tags["rlhf.stage"] = stage
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def flat_params(cfg: Config, sections: list[str] | None = None) -> dict[str, str]:
    """`section.key` -> value as text, for the given sections (all when None)."""
    out = {}
    for section, values in to_dict(cfg).items():
        if sections is None or section in sections:
            out.update({f"{section}.{k}": str(v) for k, v in values.items()})
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (bools as 0/1); MLflow metrics are floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def log_params(run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the tracking API takes at most 100 params per batch
        mlflow.MlflowClient().log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        mlflow.MlflowClient().log_batch(run_id, metrics=items[i:i + 1000])


def stage_inputs(cfg: Config, stage: str) -> dict:
    """The data one stage reads, as the stage declares it (`rlhf_core.cli.stage_inputs`): the data stage reads all
    of it, the sweep what PPO and evaluation read."""
    from rlhf_core.cli import stage_inputs as declared

    if stage == "sweep":
        return {**declared(cfg, "ppo"), **declared(cfg, "evaluate")}
    return declared(cfg, stage)


def log_lineage(inputs: dict, digest: str, context: str = "training") -> None:
    """`mlflow.log_input` for each local data set a stage reads, loaded by the stage's own loader (so a bad row fails
    here with the file, row and field it would fail with in the stage), named by its path, with the DVC data version
    as digest. Hub datasets are left to the stage that downloads them."""
    import dataclasses
    import json

    import pandas as pd

    for key, data in inputs.items():
        if data.local is None:
            continue
        records = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else {key.split(".")[-1]: r}
                   for r in data.load()]
        frame = pd.DataFrame([{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in records])
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both mean a local file
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(frame, source=str(data.local.resolve()), digest=digest, name=str(data.local))
        mlflow.log_input(ds, context=context)


def artifact_url(run_id: str, path: str) -> str:
    """The MLflow server's URL of one artifact file of a run (what the Prefect report embeds)."""
    base = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
    return f"{base}/get-artifact?path={path}&run_uuid={run_id}"


def run_url(run_id: str) -> str:
    """Where the run opens in the MLflow UI (MLFLOW_UI_URL, default: `mlflow ui` on 127.0.0.1:5000)."""
    base = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
    run = mlflow.MlflowClient().get_run(run_id)
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
