"""Orchestration around `rlhf_core` (which imports none of this): Prefect flows, MLflow tracking, DVC stages.

    python -m flows.pipeline                    # the whole pipeline as a Prefect flow (what `make demo` runs)
    python -m flows.stage sft                   # one stage inside an MLflow run: the command of dvc.yaml's stages
    dvc repro                                   # the same stages, DVC deciding what is stale

Modules: `dvc_cache` (DVC decides what reruns: the one cache), `tracking` (MLflow runs, tags, lineage), `stage`
(the stage command), `registry` (model versions, aliases, evaluation gates), `pipeline` and `sweep` (the flows),
`lifecycle` (one flow at a time per checkout; nothing orphaned or left RUNNING when a flow is killed).

Every process of the pipeline runs from the repository root (where dvc.yaml is). Importing this package fills in the
environment the tools need when the caller has not set it (the caller's values always win), before Prefect or MLflow
is imported: state stays inside the repository, nothing phones home, and nothing waits on a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path


def env_defaults(repo: Path) -> dict[str, str]:
    repo = repo.resolve()
    return {
        "PREFECT_HOME": str(repo / ".prefect"),  # a bare `import prefect` would otherwise create ~/.prefect
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else "database is locked" noise on the local API
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # the 20 s default is tight on 2 cores
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",  # absolute: stages run in subprocesses
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else `mlflow ui` starts 7 extra worker processes
        "DO_NOT_TRACK": "true",
        # the transformers flavor retries the hub for model cards for ~47 s without it; a worker that downloads
        # hub models (profiles/gpu-*.yaml) sets HF_HUB_OFFLINE=0
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DVC_SITE_CACHE_DIR": str(repo / ".dvc" / "tmp" / "site-cache"),  # else DVC writes to /var/tmp/dvc
    }


def set_env_defaults(repo: Path | None = None) -> None:
    for key, value in env_defaults(repo or Path.cwd()).items():
        os.environ.setdefault(key, value)


set_env_defaults()
