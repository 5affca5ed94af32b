"""The RLHF pipeline as a Prefect flow: version data -> data, pretrain, SFT, reward, PPO, evaluate -> register.

    python -m flows.pipeline                           # here, on a temporary local Prefect API; prints where to look
    python -m flows.pipeline --set ppo.kl_coef=0.1     # an override, written into params.yaml as `dvc exp run -S` does
    prefect --no-prompt deploy --all                   # prefect.yaml: this flow on the `gpu` work pool, on a schedule

Run from the repository root. Each stage task is `dvc repro --single-item <stage>`: DVC's stage hashes decide
whether it runs (flows/dvc_cache.py, the one cache), and the task says what DVC did. The stages are those of
`rlhf_core.cli.STAGES` that dvc.yaml declares, in that order. MLflow: one parent run per flow run, a child run per
stage (flows/tracking.py). Prefect artifacts: an evaluation report (markdown), a table of key metrics, a link to the
MLflow run, and a progress bar per stage that trains. Retries only where I/O can fail: the DVC remote, the registry.
One flow at a time per checkout (a second is refused, naming the first), and a killed flow leaves no process behind
and nothing RUNNING once the next one starts (flows/lifecycle.py).
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

from flows import lifecycle, precision, registry, tracking
from flows.dvc_cache import (RAN, RECORD_ENV, WHY, data_is_current, data_md5, dvc, out_md5, pipeline_stages, repro,
                             stream, write_params)
from flows.stage import PROGRESS_ENV
from rlhf_core.cli import add_config_arguments, config_from_arguments
from rlhf_core.config import Config, load_config

NAMES = {"sft": "rlhf-sft", "reward": "rlhf-reward", "ppo": "rlhf-policy"}


def stages_to_run() -> list[str]:
    """rlhf_core.cli.STAGES, in order, restricted to the stages dvc.yaml declares."""
    from rlhf_core.cli import STAGES

    declared = pipeline_stages()
    return [s for s in STAGES if s in declared]


def stage_metrics(stage: str) -> dict[str, float]:
    """The numeric metrics in the files dvc.yaml declares as the stage's metrics (nested keys joined by '/')."""
    out: dict[str, float] = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}", v)
        elif isinstance(value, (int, float)):
            out[prefix] = float(value)

    for path in pipeline_stages()[stage].get("metrics", []):  # plain paths: dvc.yaml sets no per-file options
        if Path(path).exists():
            flatten("", json.loads(Path(path).read_text()))
    return out


def is_key_metric(name: str) -> bool:
    return name.startswith(("eval/", "rows/")) or name.endswith(
        ("/gold_mean", "/proxy_mean", "/win_rate", "/kl", "objective/scores", "objective/gold", "hacking_alarm"))


def key_metrics(results: dict[str, dict]) -> list[dict]:
    return [{"stage": s, "metric": k, "value": round(v, 6)} for s, r in results.items()
            for k, v in r["metrics"].items() if is_key_metric(k)]


class Progress:
    """A Prefect progress artifact for one stage, fed by the progress file the stage command writes."""

    def __init__(self, stage: str, path: Path):
        self.stage, self.path, self.artifact_id, self.last = stage, path, None, -1.0

    def poll(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if state.get("total"):
            self.set(min(100.0, 100.0 * state["step"] / state["total"]))

    def set(self, percent: float) -> None:
        """Create the artifact, then update it in steps of at least 2 % (and at 100 %): each update is an API call
        and a database write on the Prefect server, which shares the CPU with the stage."""
        if self.artifact_id is None:
            self.artifact_id = artifacts.create_progress_artifact(progress=percent,
                                                                  description=f"{self.stage}: optimizer steps done")
        elif percent - self.last >= 2.0 or (percent == 100.0 and self.last < 100.0):
            artifacts.update_progress_artifact(self.artifact_id, progress=percent)
        else:
            return
        self.last = percent

    def finish(self) -> None:
        if self.artifact_id is not None:
            self.set(100.0)


def child_env(parent_run_id: str, experiment_id: str, progress: Progress) -> dict[str, str]:
    """What a stage command needs to log into the pipeline's MLflow run, report progress and die with the flow."""
    return {tracking.PARENT_ENV: parent_run_id, tracking.FLOW_RUN_ENV: str(flow_run.id or ""),
            "MLFLOW_EXPERIMENT_ID": experiment_id, PROGRESS_ENV: str(progress.path),
            lifecycle.FLOW_PID_ENV: str(os.getpid())}


def line_logger():
    """The task's logger as a callback for subprocess output (called from a reader thread: no run context there)."""
    logger = get_run_logger()
    return lambda line: logger.info(line) if line.strip() else None


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
def stage_task(stage: str, parent_run_id: str, experiment_id: str) -> dict:
    """`dvc repro --single-item <stage>`; a child MLflow run either way (opened by the stage command when DVC runs
    it, here when DVC skipped it or restored it from its run-cache)."""
    with tempfile.TemporaryDirectory(prefix="rlhf-progress-") as tmp:
        progress = Progress(stage, Path(tmp) / "progress.json")
        status, record = repro(stage, child_env(parent_run_id, experiment_id, progress), line_logger(),
                               progress.poll)
    progress.finish()
    metrics, client = stage_metrics(stage), MlflowClient()
    if status == RAN:
        run_id = record["run_id"]
    else:
        run_id = client.create_run(experiment_id, run_name=stage, tags={**tracking.run_tags(
            stage, parent_run_id, str(flow_run.id or "")), **lifecycle.owner_tags()}).info.run_id
        tracking.log_metrics(run_id, metrics)
        client.set_terminated(run_id)
    client.set_tag(run_id, "rlhf.dvc", status)
    get_run_logger().info(f"{stage}: {WHY[status]}")
    return {"status": status, "seconds": round(record["seconds"], 1) if record else 0.0, "metrics": metrics,
            "run_id": run_id}


@task(cache_policy=NO_CACHE)
def run_sweep(kl_coefs: list[float], parent_run_id: str, experiment_id: str) -> dict:
    """`python -m flows.stage sweep`: rlhf_core.sweep in a child MLflow run. Not a DVC stage: it runs each time."""
    with tempfile.TemporaryDirectory(prefix="rlhf-progress-") as tmp:
        progress, record = Progress("sweep", Path(tmp) / "progress.json"), Path(tmp) / "record.json"
        env = {**child_env(parent_run_id, experiment_id, progress), RECORD_ENV: str(record)}
        stream([sys.executable, "-m", "flows.stage", "sweep", "--kl-coefs", *map(str, kl_coefs)], env,
               line_logger(), progress.poll)
        progress.finish()
        return {**json.loads(record.read_text()), "status": RAN}


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(results: dict[str, dict], names: dict[str, str], tags: dict[str, str], out_dir: str,
             params: dict[str, str] | None = None, gate_margin: float = 0.0, gate_z: float = 2.0) -> dict:
    """Register each model the pipeline made (SFT, reward model, PPO policy); gate a new policy; a model card on
    each new version."""
    out, client = {}, MlflowClient()
    for stage, name in names.items():
        model_dir = Path(out_dir) / stage / "model"
        if stage not in results or not (model_dir / "config.json").is_file():
            continue
        vtags = {**tags, "rlhf.stage": stage, "dvc.md5": out_md5(stage, str(model_dir)) or "unknown"}
        if stage == "ppo":
            version, created = registry.register_policy(name, model_dir, results[stage]["run_id"], vtags)
        else:
            version, created = registry.register_folder(name, model_dir, results[stage]["run_id"], vtags)
        v = str(version.version)
        out[name] = {"version": v, "created": created}
        evaluation = results.get("evaluate", {}).get("metrics", {})
        if stage == "ppo" and not any(k.startswith("eval.") for k in version.tags):  # new, or a retry before gating
            scores = Path(out_dir) / "evaluate" / "completions.csv"
            if scores.is_file():  # the per-prompt gold a later candidate pairs with when this one is champion
                client.log_artifact(results[stage]["run_id"], str(scores), Path(registry.SCORES).parent.as_posix())
            for key, value in registry.eval_tags(evaluation).items():
                client.set_model_version_tag(name, v, key, value)
            out[name]["gate"] = registry.promote(name, v, evaluation, scores, gate_margin, gate_z)
        if not version.description or "gate" in out[name]:
            metrics = {**results[stage]["metrics"], **evaluation} if stage == "ppo" else results[stage]["metrics"]
            registry.write_card(name, v, stage, vtags, params or {}, metrics, out[name].get("gate"))
        out[name]["url"] = registry.version_url(name, v)
        out[name]["aliases"] = sorted(a for a, av in registry.aliases(name).items() if str(av) == v)
        get_run_logger().info(f"{name} v{v}: {'new' if created else 'already registered'} {out[name].get('gate', '')}")
    return out


def report(results: dict, registered: dict, md5: str, sha: str, run_link: str, evaluation_md: Path,
           plot_url: str | None = None) -> str:
    """The flow's summary (stages, key evaluation metrics, registry and gate), then evaluate's own report.md with its
    over-optimization plot served by MLflow (`plot_url`)."""
    lines = ["# RLHF pipeline: evaluation report", "",
             f"data `{md5}` · git `{sha[:12]}` · [MLflow run]({run_link})", "",
             "| stage | DVC | seconds | MLflow run |", "|---|---|---|---|"]
    lines += [f"| {s} | {WHY[r['status']]} | {r['seconds'] or ''} | `{r['run_id']}` |" for s, r in results.items()]
    evaluation = results.get("evaluate", {}).get("metrics")
    lines += ["", "## Evaluation (policy vs SFT on held-out prompts; gold = the simulated labeler)", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in evaluation.items() if is_key_metric(k)]
        if registry.ALARM not in evaluation:
            lines += ["", "Reward-hacking alarm not evaluated: PPO saved no snapshots (ppo.snapshot_every = 0)."]
    else:
        lines.append("No `evaluate` stage in this pipeline: the policy is neither registered nor gated.")
    lines += ["", "## Registry", "", "| model | version | aliases | champion gate |", "|---|---|---|---|"]
    for name, r in registered.items():
        gate = r.get("gate")
        verdict = "" if gate is None else "passed" if gate["passed"] else "refused: " + "; ".join(gate["failures"])
        if gate and (p := gate["paired"]):
            verdict += (f" (gold vs champion v{gate['champion']}: {p['diff']:+.4f} ± {p['se']:.4f} SE over {p['n']} "
                        f"prompts; rule diff + {p['z']} SE ≥ −{p['margin']})")
        version = f"[v{r['version']}]({r['url']})" if r.get("url") else f"v{r['version']}"
        lines.append(f"| {name} | {version}{'' if r['created'] else ' (unchanged)'} | "
                     f"{', '.join(r['aliases'])} | {verdict} |")
    if evaluation and evaluation_md.exists():
        text = evaluation_md.read_text()
        if plot_url:  # report.md links the plot next to it; in the Prefect UI it comes from MLflow
            text = text.replace("](plots/overopt.png)", f"]({plot_url})")
        lines += ["", "---", "", text]
    return "\n".join(lines) + "\n"


def prepare(overrides: list[str] | None, profile: str | None) -> Config:
    """Under the checkout's flow lock: close what a killed flow left RUNNING, then validate profile + overrides
    before any work and write them into params.yaml so DVC's hashes see them."""
    closed = lifecycle.close_abandoned_runs(str(flow_run.id) if flow_run.id else None)
    if any(closed.values()):
        print(f"closed what a killed flow of this checkout left running: {closed}")
    cfg = load_config("params.yaml", profile=profile, overrides=overrides or [])
    if write_params(cfg):
        print(f"params.yaml updated: profile={profile} overrides={overrides}")
    precision.record(cfg)  # this host's precision where DVC sees it, before it decides what reruns
    return cfg


def open_run(kind: str, parent_run_id: str | None, tags: dict[str, str] | None, cfg: Config) -> tuple[str, str]:
    """The flow's MLflow run (the parent of its stages' runs): returns (experiment id, run id)."""
    exp = tracking.experiment_id()
    run = MlflowClient().create_run(exp, run_name=f"{kind} {flow_run.name or ''}".strip(), tags={
        **tracking.run_tags(None, parent_run_id, str(flow_run.id or "")), **lifecycle.owner_tags(), "rlhf.kind": kind,
        **(tags or {})})
    tracking.log_params(run.info.run_id, tracking.flat_params(cfg))
    return exp, run.info.run_id


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(overrides: list[str] | None = None, profile: str | None = None, register_models: bool = True,
                  model_names: dict[str, str] | None = None, parent_run_id: str | None = None,
                  run_tags: dict[str, str] | None = None) -> dict:
    """The whole pipeline on params.yaml (plus `profile` and `overrides`, written into it so DVC sees them). One flow
    at a time per checkout: a second one raises `rlhf_core.io.LockedError` naming the first."""
    with lifecycle.one_flow_per_checkout():
        cfg = prepare(overrides, profile)
        md5 = version_data()
        exp, pid = open_run("pipeline", parent_run_id, run_tags, cfg)
        client = MlflowClient()
        try:
            results = {stage: stage_task(stage, pid, exp) for stage in stages_to_run()}
            tracking.log_metrics(pid, {f"{m['stage']}/{m['metric']}": m["value"] for m in key_metrics(results)})
            tags = tracking.run_tags(None, None, str(flow_run.id or ""))
            registered = register(results, {**NAMES, **(model_names or {})}, tags, cfg.base.out_dir,
                                  tracking.flat_params(cfg), cfg.evaluate.gate_margin, cfg.evaluate.gate_z) \
                if register_models else {}
            link = tracking.run_url(pid)
            plot = cfg.stage_dir("evaluate") / "plots" / "overopt.png"
            if plot.is_file():  # in the flow's own run, so the report's picture exists even when DVC skipped evaluate
                client.log_artifact(pid, str(plot), "plots")
            text = report(results, registered, md5, tracking.git_sha(), link,
                          cfg.stage_dir("evaluate") / "report.md",
                          tracking.artifact_url(pid, "plots/overopt.png") if plot.is_file() else None)
            artifacts.create_markdown_artifact(markdown=text, key="evaluation-report",
                                               description="evaluation report")
            artifacts.create_table_artifact(table=key_metrics(results), key="key-metrics",
                                            description="key metrics")
            artifacts.create_link_artifact(link=link, link_text="MLflow parent run", key="mlflow-run")
            client.log_text(pid, text, "evaluation_report.md")
            client.set_terminated(pid, "FINISHED")
        except BaseException:
            client.set_terminated(pid, "FAILED")
            raise
        return {"flow_run_id": str(flow_run.id or ""), "parent_run_id": pid, "experiment_id": exp, "data_md5": md5,
                "stages": results, "registered": registered, "mlflow_url": link}


def where_to_look(summary: dict) -> str:
    venv_bin = Path(sys.executable).parent
    lines = ["", "Stages: " + ", ".join(f"{s} {r['status']}" for s, r in summary["stages"].items()), "",
             "Prefect UI (flow runs, logs, artifacts):",
             f"  PREFECT_HOME={os.environ['PREFECT_HOME']} {venv_bin}/prefect server start --host 127.0.0.1",
             f"  then open http://127.0.0.1:4200/runs/flow-run/{summary['flow_run_id']}",
             "MLflow UI (parent and child runs, metrics, artifacts, model registry):",
             f"  {venv_bin}/mlflow ui --backend-store-uri {mlflow.get_tracking_uri()} --host 127.0.0.1",
             f"  then open {summary['mlflow_url']}", "",
             "Registered models, read back from the registry:"]
    lines += ["  " + line for line in registry.describe(sorted(NAMES.values()))] or ["  none"]
    lines += ["", "DVC: `dvc metrics show`, `dvc plots show` (outputs/ and dvc.lock hold this run)"]
    return "\n".join(lines)


def check_arguments(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """A flow's command line: --profile and --set checked (a bad key exits with status 2) before anything starts."""
    args = ap.parse_args(argv)
    if not Path("dvc.yaml").exists():
        raise SystemExit("run from the repository root (where dvc.yaml is)")
    if args.params != "params.yaml":
        ap.error("the flows run on params.yaml (dvc.yaml reads it): change it with --profile or --set")
    config_from_arguments(args)
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    ap.add_argument("--no-register", action="store_true", help="skip the model registry step")
    args = check_arguments(ap, argv)
    with lifecycle.flow_process():
        summary = rlhf_pipeline(overrides=args.overrides, profile=args.profile, register_models=not args.no_register)
    print(where_to_look(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
