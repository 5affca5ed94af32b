"""The RLHF pipeline as a Prefect flow: version data -> data, pretrain, SFT, reward, PPO, evaluate -> register.

    python -m flows.pipeline                           # here, on a temporary local Prefect API; prints where to look
    python -m flows.pipeline --set reward.lr=1e-4      # an override, written into params.yaml as `dvc exp run -S` does
    prefect --no-prompt deploy --all                   # prefect.yaml: this flow on the `gpu` work pool, on a schedule

Run from the repository root. Each stage task is `dvc repro --single-item <stage>`: DVC's stage hashes decide
whether it runs (flows/dvc_cache.py, the one cache), and the task says what DVC did. The stages are those of
`rlhf_core.cli.STAGES` that dvc.yaml declares, in that order. MLflow: one parent run per flow run, a child run per
stage (flows/tracking.py). Prefect artifacts: an evaluation report (markdown), a table of key metrics, a link to the
MLflow run, and a progress bar per stage that trains. Retries only where I/O can fail: the DVC remote, the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import artifacts, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import registry, tracking
from flows.dvc_cache import RAN, WHY, data_is_current, data_md5, dvc, out_md5, pipeline_stages, repro, set_params
from flows.stage import PROGRESS_ENV
from rlhf_core.config import load_config

NAMES = {"sft": "rlhf-sft", "reward": "rlhf-reward", "ppo": "rlhf-policy"}
KEY_METRICS = ("eval/", "gold/", "proxy/", "kl", "win_rate", "hacking_alarm", "rows/")


def stages_to_run() -> list[str]:
    """rlhf_core.cli.STAGES, in order, restricted to the stages dvc.yaml declares."""
    from rlhf_core.cli import STAGES

    declared = pipeline_stages()
    return [s for s in STAGES if s in declared]


def stage_metrics(stage: str) -> dict[str, float]:
    """The numeric metrics in the files dvc.yaml declares as the stage's metrics (nested keys joined by '/')."""
    spec = pipeline_stages()[stage]
    out: dict[str, float] = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}", v)
        elif isinstance(value, (int, float)):
            out[prefix] = float(value)

    for path in spec.get("metrics", []):  # plain paths: dvc.yaml sets no per-file metrics options
        if Path(path).exists():
            flatten("", json.loads(Path(path).read_text()))
    return out


class Progress:
    """A Prefect progress artifact for one stage, fed by the progress file the stage command writes."""

    def __init__(self, stage: str, path: Path):
        self.stage, self.path, self.artifact_id, self.last = stage, path, None, -1.0

    def poll(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if not state.get("total"):
            return
        self.set(min(100.0, 100.0 * state["step"] / state["total"]))

    def set(self, percent: float) -> None:
        if self.artifact_id is None:
            self.artifact_id = artifacts.create_progress_artifact(progress=percent,
                                                        description=f"{self.stage}: optimizer steps done")
        elif percent - self.last >= 1.0 or percent == 100.0:
            artifacts.update_progress_artifact(self.artifact_id, progress=percent)
        self.last = percent


@task(retries=3, retry_delay_seconds=10, cache_policy=NO_CACHE)
def version_data() -> str:
    """data/ must be the version data.dvc names: pull it from the DVC remote when it is not (I/O: retried)."""
    if not data_is_current():
        get_run_logger().info("data/ differs from data.dvc: dvc pull")
        dvc("pull", "data.dvc")
    if not data_is_current():
        raise RuntimeError("data/ does not match data.dvc after `dvc pull`: push the data version from where it was "
                           "made (`dvc push`), or regenerate the demo data (`python -m rlhf_core data`)")
    return data_md5()


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, parent_run_id: str, experiment_id: str) -> dict:
    """`dvc repro --single-item <stage>`; a child MLflow run either way (opened by the stage command when DVC runs
    it, here when DVC skipped it or restored it from its run-cache)."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="rlhf-progress-") as tmp:
        progress = Progress(stage, Path(tmp) / "progress.json")
        env = {tracking.PARENT_ENV: parent_run_id, tracking.FLOW_RUN_ENV: str(flow_run.id or ""),
               "MLFLOW_EXPERIMENT_ID": experiment_id, PROGRESS_ENV: str(progress.path)}
        status, record = repro(stage, env, on_line=lambda line: line.strip() and logger.info(line), poll=progress.poll)
    if progress.artifact_id is not None:
        progress.set(100.0)
    metrics = stage_metrics(stage)
    if status == RAN:
        run_id = record["run_id"]
    else:
        run = MlflowClient().create_run(experiment_id, run_name=stage, tags=tracking.run_tags(
            stage, parent_run_id, str(flow_run.id or "")))
        run_id = run.info.run_id
        tracking.log_metrics(run_id, metrics)
        MlflowClient().set_terminated(run_id)
    MlflowClient().set_tag(run_id, "rlhf.dvc", status)
    logger.info(f"{stage}: {WHY[status]}")
    return {"status": status, "seconds": round(record["seconds"], 1) if record else 0.0, "metrics": metrics,
            "run_id": run_id}


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(results: dict[str, dict], names: dict[str, str], tags: dict[str, str], out_dir: str) -> dict:
    """Register each model the pipeline made (SFT, reward model, and the policy once PPO exists); gate the policy."""
    logger, out = get_run_logger(), {}
    for stage, name in names.items():
        model_dir = Path(out_dir) / stage / "model"
        if stage not in results or not model_dir.is_dir():
            continue
        vtags = {**tags, "rlhf.stage": stage, "dvc.md5": out_md5(stage, str(model_dir)) or "unknown"}
        if stage == "ppo":
            version, created = registry.register_policy(name, model_dir, results[stage]["run_id"], vtags)
        else:
            version, created = registry.register_folder(name, model_dir, results[stage]["run_id"], vtags)
        out[name] = {"version": str(version.version), "created": created}
        if stage == "ppo" and created:
            evaluation = results.get("evaluate", {}).get("metrics", {})
            for k, v in registry.eval_tags(evaluation).items():
                MlflowClient().set_model_version_tag(name, str(version.version), k, v)
            out[name]["gate"] = registry.promote(name, str(version.version), evaluation)
        out[name]["aliases"] = sorted(a for a, v in registry.aliases(name).items() if str(v) == str(version.version))
        logger.info(f"{name}: v{version.version} ({'new' if created else 'already registered'}) "
                    f"{out[name].get('gate', '')}")
    return out


def key_metrics(results: dict[str, dict]) -> list[dict]:
    return [{"stage": s, "metric": k, "value": round(v, 6)} for s, r in results.items()
            for k, v in r["metrics"].items() if k.startswith(KEY_METRICS)]


def report(results: dict, registered: dict, md5: str, sha: str, run_link: str) -> str:
    lines = ["# RLHF pipeline: evaluation report", "",
             f"data `{md5}` · git `{sha[:12]}` · [MLflow run]({run_link})", "",
             "| stage | DVC | seconds | MLflow run |", "|---|---|---|---|"]
    lines += [f"| {s} | {WHY[r['status']]} | {r['seconds']} | `{r['run_id']}` |" for s, r in results.items()]
    evaluation = results.get("evaluate", {}).get("metrics")
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in evaluation.items()]
    else:
        lines.append("No `evaluate` stage in this pipeline yet: the policy is neither registered nor gated.")
    lines += ["", "## Registry", "", "| model | version | aliases | champion gate |", "|---|---|---|---|"]
    for name, r in registered.items():
        gate = r.get("gate")
        verdict = "" if gate is None else "passed" if gate["passed"] else "failed: " + "; ".join(gate["failures"])
        lines.append(f"| {name} | v{r['version']}{'' if r['created'] else ' (unchanged)'} | "
                     f"{', '.join(r['aliases'])} | {verdict} |")
    return "\n".join(lines) + "\n"


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(overrides: list[str] | None = None, profile: str | None = None, register_models: bool = True,
                  model_names: dict[str, str] | None = None, parent_run_id: str | None = None,
                  run_tags: dict[str, str] | None = None) -> dict:
    """The whole pipeline on params.yaml (plus `profile` and `overrides`, written into it so DVC sees them)."""
    load_config("params.yaml", profile=profile, overrides=overrides or [])  # reject a bad config before any work
    if set_params(overrides or [], profile):
        print(f"params.yaml updated: profile={profile} overrides={overrides}")
    cfg = load_config("params.yaml")
    md5 = version_data()
    client, exp = MlflowClient(), tracking.experiment_id()
    parent = client.create_run(exp, run_name=f"pipeline {flow_run.name or ''}".strip(), tags={
        **tracking.run_tags(None, parent_run_id, str(flow_run.id or "")), "rlhf.kind": "pipeline", **(run_tags or {})})
    pid = parent.info.run_id
    try:
        tracking.log_params(pid, tracking.flat_params(cfg))
        results = {stage: run_stage(stage, pid, exp) for stage in stages_to_run()}
        tracking.log_metrics(pid, {f"{row['stage']}/{row['metric']}": row["value"] for row in key_metrics(results)})
        names = {**NAMES, **(model_names or {})}
        tags = tracking.run_tags(None, None, str(flow_run.id or ""))
        registered = register(results, names, tags, cfg.base.out_dir) if register_models else {}
        link = tracking.run_url(pid)
        text = report(results, registered, md5, tracking.git_sha(), link)
        artifacts.create_markdown_artifact(markdown=text, key="evaluation-report", description="RLHF pipeline evaluation report")
        artifacts.create_table_artifact(table=key_metrics(results), key="key-metrics", description="key metrics per stage")
        artifacts.create_link_artifact(link=link, link_text="MLflow parent run", key="mlflow-run")
        client.log_text(pid, text, "evaluation_report.md")
        client.set_terminated(pid, "FINISHED")
    except BaseException:
        client.set_terminated(pid, "FAILED")
        raise
    return {"flow_run_id": str(flow_run.id or ""), "parent_run_id": pid, "experiment_id": exp, "data_md5": md5,
            "stages": results, "registered": registered, "mlflow_url": link}


def where_to_look(summary: dict) -> str:
    repo, venv_bin = Path.cwd(), Path(sys.executable).parent
    names = sorted({**NAMES}.values())
    lines = ["", "Stages: " + ", ".join(f"{s} {r['status']}" for s, r in summary["stages"].items()), "",
             "Prefect UI (flow runs, logs, artifacts):",
             f"  PREFECT_HOME={os.environ['PREFECT_HOME']} {venv_bin}/prefect server start --host 127.0.0.1",
             f"  then open http://127.0.0.1:4200/runs/flow-run/{summary['flow_run_id']}",
             "MLflow UI (parent and child runs, metrics, artifacts, registry):",
             f"  {venv_bin}/mlflow ui --backend-store-uri {mlflow.get_tracking_uri()} --host 127.0.0.1",
             f"  then open {summary['mlflow_url']}", "",
             "Registered models (from the registry):"]
    lines += ["  " + line for line in registry.describe(names)] or ["  none"]
    lines += ["", f"DVC: `dvc metrics show`, `dvc plots show` in {repo}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--profile", default=None, help="a partial params file merged into params.yaml")
    ap.add_argument("--no-register", action="store_true", help="skip the model registry step")
    args = ap.parse_args(argv)
    if not Path("dvc.yaml").exists():
        raise SystemExit("run from the repository root (where dvc.yaml is)")
    summary = rlhf_pipeline(overrides=args.overrides, profile=args.profile, register_models=not args.no_register)
    print(where_to_look(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
