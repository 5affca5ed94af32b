"""The reward over-optimization sweep as a Prefect flow: PPO once per KL coefficient, each run evaluated along the way.

    python -m flows.sweep --kl-coefs 0 0.02 0.05 0.1 0.2

The SFT and reward models come from the pipeline's stages (DVC reruns them only when stale); the sweep itself is
`rlhf_core.sweep` in one child MLflow run (`python -m flows.stage sweep`), writing <out_dir>/sweep/: frontier.csv
(gold and proxy reward against d = sqrt(KL) per coefficient), frontier.png and metrics.json with Gao et al.'s fits.
It is not a DVC stage, so it runs whenever asked. Prefect gets a table (one row per coefficient), a markdown
summary and a link to the MLflow run.
"""

from __future__ import annotations

import argparse
import sys

from mlflow import MlflowClient
from prefect import artifacts, flow

from flows import lifecycle, tracking
from flows.pipeline import check_arguments, open_run, prepare, run_sweep, stage_task, stages_to_run, version_data
from rlhf_core.cli import add_config_arguments

PER_COEF = ("gold_delta", "gold_max", "kl", "hacking_alarm")


def coefficient_table(kl_coefs: list[float], metrics: dict[str, float]) -> list[dict]:
    return [{"kl_coef": c, **{k: metrics.get(f"kl_{c:g}/{k}") for k in PER_COEF}} for c in kl_coefs]


@flow(name="overoptimization-sweep", log_prints=True)
def overoptimization_sweep(kl_coefs: list[float] | None = None, overrides: list[str] | None = None,
                           profile: str | None = None) -> dict:
    """The pipeline's stages before PPO (from DVC's cache when unchanged), then one PPO run per KL coefficient."""
    with lifecycle.one_flow_per_checkout():  # the sweep writes params.yaml and reads outputs/ too
        kl_coefs = kl_coefs if kl_coefs is not None else [0.0, 0.02, 0.05, 0.1, 0.2]
        cfg = prepare(overrides, profile)
        md5 = version_data()
        exp, pid = open_run("sweep", None, {"rlhf.sweep.kl_coefs": " ".join(map(str, kl_coefs))}, cfg)
        client = MlflowClient()
        try:
            stages = stages_to_run()
            upstream = {s: stage_task(s, pid, exp) for s in stages[:stages.index("ppo")]}
            sweep = run_sweep(kl_coefs, pid, exp)
            metrics = tracking.numeric(client.get_run(sweep["run_id"]).data.metrics)
            table = coefficient_table(kl_coefs, metrics)
            link = tracking.run_url(pid)
            fits = {k: v for k, v in metrics.items() if k.startswith("pooled/")}
            artifacts.create_table_artifact(
                table=table, key="overoptimization-sweep",
                description="gold reward (relative to SFT), KL and alarm per KL coefficient")
            artifacts.create_markdown_artifact(key="overoptimization-summary", markdown="\n".join(
                [f"# Reward over-optimization sweep (data `{md5}`)", "",
                 f"[MLflow run]({link}) · frontier plot and CSV in its child run `{sweep['run_id']}`", "",
                 "| kl_coef | " + " | ".join(PER_COEF) + " |",
                 "|---" * (len(PER_COEF) + 1) + "|"]
                + [f"| {r['kl_coef']:g} | " + " | ".join(f"{r[k]:.4g}" if r[k] is not None else "" for k in PER_COEF)
                   + " |" for r in table]
                + ["", "Pooled fit (all runs): " + ", ".join(f"{k} = {v:.4g}" for k, v in fits.items())]))
            artifacts.create_link_artifact(link=link, link_text="MLflow sweep run", key="mlflow-sweep-run")
            client.set_terminated(pid, "FINISHED")
        except BaseException:
            client.set_terminated(pid, "FAILED")
            raise
        return {"parent_run_id": pid, "sweep_run_id": sweep["run_id"], "upstream": {s: r["status"] for s, r in
                upstream.items()}, "table": table, "mlflow_url": link}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kl-coefs", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    add_config_arguments(ap)
    args = check_arguments(ap, argv)
    with lifecycle.flow_process():
        summary = overoptimization_sweep(kl_coefs=args.kl_coefs, overrides=args.overrides, profile=args.profile)
    for row in summary["table"]:
        print(row)
    print(f"MLflow: {summary['mlflow_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
