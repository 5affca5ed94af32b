"""The reward over-optimization sweep: the pipeline once per value of one param (the KL coefficient by default).

    python -m flows.sweep --param ppo.kl_coef --values 0 0.02 0.05 0.1 0.2

Each point is a `rlhf_pipeline` subflow with the value written into params.yaml, so DVC reruns only the stages that
depend on it (for ppo.* that is PPO and evaluation) and a value seen before is restored from DVC's run-cache. The
points' MLflow parent runs are children of one sweep run, which holds the table (CSV) and the plot; Prefect gets the
table and a markdown summary. Gao et al. (2022), "Scaling laws for reward model overoptimization": as the policy
moves away from the SFT model (KL), the proxy reward keeps rising while the gold reward peaks and falls.
params.yaml is put back as it was at the end; outputs/ then hold the last point (the next pipeline run restores the
original ones from the run-cache).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from prefect import artifacts, flow
from prefect.runtime import flow_run

from flows import tracking
from flows.pipeline import rlhf_pipeline


def plot(rows: list[dict], param: str, metrics: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in metrics:
        pts = [(r["value"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xlabel(param)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


@flow(name="overoptimization-sweep", log_prints=True)
def overoptimization_sweep(param: str = "ppo.kl_coef", values: list[float] | None = None, stage: str = "evaluate",
                           metrics: list[str] | None = None, best_by: str = "gold/mean",
                           profile: str | None = None) -> list[dict]:
    """One pipeline run per value of `param`; a table of `stage`'s metrics per value, `metrics` plotted."""
    values = values if values is not None else [0.0, 0.02, 0.05, 0.1, 0.2]
    metrics = metrics if metrics is not None else ["gold/mean", "proxy/mean", "kl"]
    params_file = Path("params.yaml")
    original = params_file.read_text()
    client, exp = MlflowClient(), tracking.experiment_id()
    sweep = client.create_run(exp, run_name=f"sweep {param}", tags={
        **tracking.run_tags(None, None, str(flow_run.id or "")), "rlhf.kind": "sweep", "rlhf.sweep.param": param})
    rows = []
    try:
        for value in values:
            summary = rlhf_pipeline.with_options(flow_run_name=f"{param}={value}")(
                overrides=[f"{param}={value}"], profile=profile, register_models=False,
                parent_run_id=sweep.info.run_id, run_tags={"rlhf.sweep.value": str(value)})
            result = summary["stages"].get(stage, {})
            rows.append({"value": value, "status": {s: r["status"] for s, r in summary["stages"].items()},
                         "parent_run_id": summary["parent_run_id"], **result.get("metrics", {})})
    finally:
        params_file.write_text(original)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "sweep.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "status"))
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        client.log_artifact(sweep.info.run_id, str(table))
        shown = [m for m in metrics if any(m in r for r in rows)]
        if shown:
            client.log_artifact(sweep.info.run_id, str(plot(rows, param, shown, Path(tmp) / "sweep.png")))
    client.set_terminated(sweep.info.run_id)
    scored = [r for r in rows if best_by in r]
    best = max(scored, key=lambda r: r[best_by]) if scored else None
    artifacts.create_table_artifact(table=[{k: v for k, v in r.items() if k != "status"} for r in rows],
                                    key="overoptimization-sweep", description=f"{stage} metrics per {param}")
    artifacts.create_markdown_artifact(key="overoptimization-summary", markdown=(
        f"# Sweep over `{param}`\n\n{len(rows)} points; "
        + (f"best `{best_by}` = {best[best_by]:.4g} at {param} = {best['value']}" if best else
           f"no point reported `{best_by}`") + f"\n\n[MLflow sweep run]({tracking.run_url(sweep.info.run_id)})\n"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--param", default="ppo.kl_coef")
    ap.add_argument("--values", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--stage", default="evaluate", help="whose metrics make the table")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args(argv)
    for row in overoptimization_sweep(param=args.param, values=args.values, stage=args.stage, profile=args.profile):
        print({k: v for k, v in row.items() if k != "parent_run_id"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
