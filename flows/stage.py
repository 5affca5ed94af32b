"""One pipeline stage inside an MLflow run: the command of every stage in dvc.yaml.

    python -m flows.stage sft        # what `dvc repro` runs, from the repository root
    python -m flows.stage sweep --kl-coefs 0 0.05 0.2   # rlhf_core.sweep (the over-optimization flow runs this)

Runs `rlhf_core.cli.run_stage(cfg, stage, sink)` on params.yaml with a sink that logs each step's metrics to MLflow
and keeps them for <out_dir>/<stage>/history.csv (a DVC plot); system metrics are on. Logs the stage's params, its
input files as datasets (digest: data.dvc's md5) and its small outputs (metrics, samples, plots, reports) as
artifacts; models stay in DVC's cache until the registry step logs the ones it registers. Under the flow the run
is a child of the pipeline's parent run (RLHF_PARENT_RUN_ID); by hand it is a run of its own. Run by DVC or a flow,
it dies with them; and it fails if params.yaml changed while it ran (DVC would record the new params for outputs
made with the old ones).

The `data` stage validates instead of generating: data/ is data.dvc's output, so no dvc.yaml stage may write it.
It loads every input file the later stages will read with their loaders and settings and writes
<out_dir>/data/report.json (rows per input and the data md5), so malformed data stops the pipeline before training.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from flows import lifecycle, precision, tracking
from flows.dvc_cache import RECORD_ENV, data_md5
from rlhf_core import io
from rlhf_core.config import Config, load_config
from rlhf_core.training import StageResult

PROGRESS_ENV = "RLHF_PROGRESS_FILE"
SOMETIMES_DIRS = {"ppo": ("snapshots", "samples"), "evaluate": ("plots",)}
PARAMS = Path("params.yaml")


def validate_data(cfg: Config) -> StageResult:
    """Load every local input of the later stages as they will load it; rows per input into <out>/data/report.json."""
    rows = {key: len(data.load()) for key, data in tracking.stage_inputs(cfg, "data").items() if data.local}
    out = cfg.stage_dir("data") / "report.json"
    io.write_json(out, {"data_md5": data_md5(), "rows": rows})
    return StageResult({"report": out}, {f"rows/{k}": v for k, v in rows.items()})


class Sink:
    """The metrics sink: MLflow per step (asynchronously, so training never waits on the tracking store), a history
    for the CSV plot, and a progress file (steps done of `total`) the flow turns into a Prefect progress artifact."""

    def __init__(self, progress_file: str | None):
        self.progress_file, self.rows, self.total, self.last_write = progress_file, [], None, 0.0

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(tracking.numeric(metrics), step=step, synchronous=False)
        self.rows.append({"step": step, **metrics})
        if self.progress_file and time.monotonic() - self.last_write > 1.0:
            io.write_json(self.progress_file, {"step": step, "total": self.total})
            self.last_write = time.monotonic()

    def set_total(self, total: int) -> None:
        """How many steps the stage will take (`rlhf_core.training.progress` calls it when its bar starts)."""
        self.total, self.last_write = int(total), 0.0  # the next step writes the progress file at once

    def write_csv(self, path: Path) -> Path | None:
        if not self.rows:
            return None
        # sorted: a run resumed from a checkpoint replays its history with the keys in another order, and must still
        # write the uninterrupted run's file byte for byte (DVC hashes it)
        columns = ["step", *sorted({k for row in self.rows for k in row} - {"step"})]
        with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return path


def plot_history(rows: list[dict], stage: str, out: Path) -> Path:
    """One panel per loss/accuracy-like metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "step" and k.split("/")[-1] in
            ("loss", "accuracy", "gold_accuracy", "scores", "kl", "gold", "proxy")][:6] or ["step"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def log_outputs(stage_dir: Path) -> None:
    """Every small output file as an artifact; models (final, checkpoints, snapshots) stay with DVC."""
    for path in sorted(stage_dir.rglob("*")):
        rel = path.relative_to(stage_dir)
        if path.is_file() and not set(rel.parts) & {"model", "checkpoint", "snapshots"} and rel.name[0] != ".":
            mlflow.log_artifact(str(path), artifact_path=str(Path("outputs", *rel.parts[:-1])))


def run(cfg: Config, stage: str, sink: Sink, kl_coefs: list[float]) -> StageResult:
    from rlhf_core.cli import run_stage

    if stage == "data":
        return validate_data(cfg)
    if stage == "sweep":
        from rlhf_core.sweep import sweep

        return sweep(cfg, kl_coefs, cfg.stage_dir("sweep"), sink)
    result = run_stage(cfg, stage, sink)
    # dvc.yaml declares outputs that rlhf_core writes only sometimes; DVC needs them to exist
    if stage == "pretrain" and cfg.base.model:
        io.write_text(cfg.stage_dir(stage) / "model" / "PRETRAINED.txt", f"base.model: {cfg.base.model}\n")
    for name in SOMETIMES_DIRS.get(stage, ()):
        (cfg.stage_dir(stage) / name).mkdir(parents=True, exist_ok=True)
    return result


def check_params_unchanged(loaded: str) -> None:
    """Fail when params.yaml is no longer the text this stage loaded. DVC records the params it reads *after* the
    command exits: it would pair outputs made with one value with another. Failing leaves dvc.lock without an entry
    for this stage, so it reruns next time."""
    if PARAMS.read_text() != loaded:
        raise SystemExit(f"{PARAMS} changed while this stage ran: its outputs were made with the params it loaded "
                         "at the start, so it fails rather than let DVC record the new ones; rerun it")


def main(argv: list[str] | None = None) -> int:
    from rlhf_core.cli import LABELING, STAGES

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop notices in every stage log

    ap = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=(*STAGES, *LABELING, "sweep"))
    ap.add_argument("--kl-coefs", type=float, nargs="+", default=[], help="sweep only: one PPO run per coefficient")
    args = ap.parse_args(argv)
    if os.environ.get("DVC_STAGE") or os.environ.get(lifecycle.FLOW_PID_ENV):  # run by DVC or a flow: die with it
        lifecycle.die_with_flow()
    params_text = PARAMS.read_text()
    stage, cfg = args.stage, load_config(PARAMS)
    if cfg.base.data_dir != "data":
        raise SystemExit("base.data_dir must be `data`: data.dvc versions data/ and dvc.yaml's stages depend on it")
    sink, t0 = Sink(os.environ.get(PROGRESS_ENV)), time.perf_counter()
    stage_dir = cfg.stage_dir(stage)
    precision_record = precision.record(cfg)  # before the stage runs: DVC reads it for dvc.lock after it ends
    with mlflow.start_run(experiment_id=tracking.experiment_id(), run_name=stage, log_system_metrics=True,
                          tags={**tracking.run_tags(stage, os.environ.get(tracking.PARENT_ENV),
                                                    os.environ.get(tracking.FLOW_RUN_ENV)),
                                **lifecycle.owner_tags()}) as mlrun:
        sections = ["base", "ppo", "evaluate"] if stage == "sweep" else ["base", stage]
        tracking.log_params(mlrun.info.run_id, tracking.flat_params(cfg, sections))
        mlflow.set_tags(precision.tags(precision_record))
        if args.kl_coefs:
            mlflow.log_param("sweep.kl_coefs", " ".join(map(str, args.kl_coefs)))
        tracking.log_lineage(tracking.stage_inputs(cfg, stage), digest=data_md5(),
                             context="validation" if stage == "data" else "training")
        result = run(cfg, stage, sink, args.kl_coefs)
        last_step = max((r["step"] for r in sink.rows), default=0)
        mlflow.log_metrics(tracking.numeric(result.metrics), step=last_step)
        if sink.write_csv(stage_dir / "history.csv"):
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifact(str(plot_history(sink.rows, stage, Path(tmp) / f"{stage}_history.png")), "plots")
        log_outputs(stage_dir)
        seconds = time.perf_counter() - t0
        mlflow.log_metric("stage/seconds", seconds)
        check_params_unchanged(params_text)
    if record := os.environ.get(RECORD_ENV):
        io.write_json(record, {"run_id": mlrun.info.run_id, "seconds": seconds})
    print(json.dumps({"stage": stage, "mlflow_run_id": mlrun.info.run_id, "seconds": round(seconds, 1),
                      "metrics": result.metrics}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
