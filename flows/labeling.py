"""Labeling rounds as a Prefect flow, with the Prefect UI as the place where people hand their labels back.

    python -m flows.labeling                                     # label.rounds rounds, the simulated labeler (demo)
    python -m flows.labeling --rounds 1 --labeler human          # pauses for people's labels (README: Labeling with people)

Each round (rlhf_core.rounds): sample label.k responses per prompt from SFT (round 1) or the previous round's policy
and write the task set (tasks.jsonl, Label Studio tasks + config, CSV); with `--labeler human` the flow run pauses
(`pause_flow_run(wait_for_input=LabeledFile)`): the UI shows what to label, where the task files are, and a form for
the labeled file's path. Resuming validates that file (an error names file, row and field and fails the run), and a
run nobody resumes within `label_timeout_s` fails. Then a reward model on all rounds' rankings so far, PPO, and an
evaluation; each round's reward-model accuracy, gold, win rate, KL and over-optimization point go to MLflow (step =
round) and to a Prefect table. The SFT model comes from the pipeline's stages (`python -m flows.pipeline` first).
The pause blocks this process (a suspend, which frees it, needs a deployment: prefect.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import artifacts, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

from flows import lifecycle, tracking
from flows.pipeline import check_arguments
from rlhf_core.cli import add_config_arguments
from rlhf_core.config import Config, load_config
from rlhf_core.label import file_md5, import_labels, label_simulated, make_tasks
from rlhf_core.rounds import labeling_model, round_dir, run_round, write_summary


class LabeledFile(RunInput):
    """What a person hands back in the Prefect UI to resume a paused labeling round."""

    labels_path: str
    """the labeled file: a Label Studio JSON export, tasks.csv with its rank columns filled in, or JSONL ranks"""


def instructions(round_no: int, tasks: dict, n_tasks: int, k: int, suggested: str) -> str:
    """The markdown the UI shows beside the resume form."""
    return "\n".join([
        f"## Labeling round {round_no}: rank {n_tasks} prompts' responses ({k} each, 1 = best)", "",
        f"- Label Studio: create a project with the labeling interface `{tasks['label_studio_config']}`, import "
        f"`{tasks['label_studio']}`, drag each response into a rank column (same column = tie; Skip what you cannot "
        "judge), then Export -> JSON.",
        f"- Or fill the `rank_1..rank_{k}` columns of `{tasks['csv']}` (equal numbers = tie; `skip` = 1 to skip).",
        f"- Then enter the labeled file's path below (relative paths are from `{Path.cwd()}`), e.g. `{suggested}`.",
        "", "Resuming validates the file: a bad row fails the run with its file, row and field."])


@task(cache_policy=NO_CACHE, task_run_name="tasks round {round_no}")
def sample_tasks(cfg: Config, model_dir: str, out_dir: str, round_no: int) -> dict:
    result = make_tasks(cfg, model_dir, Path(out_dir), round_no)
    return {"paths": {k: str(v) for k, v in result.outputs.items()}, "metrics": result.metrics}


@task(cache_policy=NO_CACHE, task_run_name="labels round {round_no}")
def collect_labels(cfg: Config, tasks_path: str, out_dir: str, round_no: int, labels_path: str | None) -> dict:
    """The simulated labeler's rankings (labels_path None) or people's file, validated, as rankings.jsonl."""
    if labels_path is None:
        result = label_simulated(cfg, tasks_path, Path(out_dir), round_no)
    else:
        result = import_labels(tasks_path, labels_path, Path(out_dir))
    return {"rankings": str(result.outputs["rankings"]), "metrics": result.metrics}


@task(cache_policy=NO_CACHE, task_run_name="reward, ppo, evaluate round {round_no}")
def train_round(cfg: Config, out_dir: str, round_no: int) -> dict[str, float]:
    return run_round(cfg, Path(out_dir), round_no)


def wait_for_people(round_no: int, tasks: dict, cfg: Config, timeout_s: int, poll_s: int) -> str:
    """Pause the flow run until someone resumes it with the labeled file's path; the path, resolved."""
    paths = tasks["paths"]
    suggested = str(Path(paths["tasks"]).parent / "labels.json")
    text = instructions(round_no, paths, int(tasks["metrics"]["tasks"]), cfg.label.k, suggested)
    artifacts.create_markdown_artifact(markdown=text, key=f"labeling-round-{round_no}",
                                       description=f"what to label in round {round_no}")
    get_run_logger().info(f"round {round_no}: waiting for labels of {paths['tasks']} (resume in the Prefect UI)")
    try:
        answer = pause_flow_run(wait_for_input=LabeledFile.with_initial_data(description=text, labels_path=suggested),
                                timeout=timeout_s, poll_interval=poll_s, key=f"labels-round-{round_no}")
    except FlowPauseTimeout:
        raise TimeoutError(f"round {round_no}: no labels came back within {timeout_s} s; the tasks are at "
                           f"{Path(paths['tasks']).parent}. Start a new run once they are labeled") from None
    return str(Path(answer.labels_path).expanduser().resolve())


@flow(name="labeling-rounds", log_prints=True)
def labeling_rounds(rounds: int | None = None, labeler: str | None = None, overrides: list[str] | None = None,
                    profile: str | None = None, out_dir: str | None = None, train: bool = True,
                    label_timeout_s: int = 7 * 24 * 3600, poll_s: int = 10) -> dict:
    """`rounds` labeling rounds (default label.rounds) labeled by `labeler` (default label.labeler). `train: False` only collects round 1's
    labels (rankings.jsonl, for a reward stage to read later)."""
    cfg = load_config("params.yaml", profile=profile, overrides=overrides or [])
    labeler, rounds = labeler or cfg.label.labeler, rounds or cfg.label.rounds
    if labeler not in ("simulated", "human"):
        raise ValueError(f"labeler must be 'simulated' or 'human', got {labeler!r}")
    out = Path(out_dir or cfg.stage_dir("labeling")).resolve()  # outputs/rounds is the DVC stage's
    client, exp = MlflowClient(), tracking.experiment_id()
    run_id = client.create_run(exp, run_name=f"labeling {flow_run.name or ''}".strip(), tags={
        **tracking.run_tags(None, None, str(flow_run.id or "")), **lifecycle.owner_tags(),
        "rlhf.kind": "labeling", "rlhf.labeler": labeler}).info.run_id
    tracking.log_params(run_id, tracking.flat_params(cfg, ["base", "label", "reward", "ppo"]))
    rows = []
    try:
        for r in range(1, (rounds if train else 1) + 1):
            here = round_dir(out, r) / "label"
            tasks = sample_tasks(cfg, labeling_model(cfg, out, r), str(here), r)
            labels_path = wait_for_people(r, tasks, cfg, label_timeout_s, poll_s) if labeler == "human" else None
            labels = collect_labels(cfg, tasks["paths"]["tasks"], str(here), r, labels_path)
            log_rankings(run_id, labels["rankings"], r, labels_path)
            summary = train_round(cfg, str(out), r) if train else {}
            rows.append({"round": r, **tasks["metrics"], **labels["metrics"], **summary})
            tracking.log_metrics(run_id, {f"rounds/{k}": v for k, v in rows[-1].items() if k != "round"}, step=r)
        result = write_summary(out, rows)
        client.log_artifact(run_id, str(result.outputs["rounds"]))
        artifacts.create_table_artifact(table=rows, key="labeling-rounds",
                                        description="per round: labels, reward-model accuracy, gold, win rate, KL")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return {"mlflow_run_id": run_id, "rounds": rows, "out_dir": str(out)}


def log_rankings(run_id: str, rankings: str, round_no: int, labels_path: str | None) -> None:
    """MLflow lineage: the round's rankings as an input data set, digested by content, and the labeled file's md5."""
    import pandas as pd

    frame = pd.read_json(rankings, lines=True).astype(str)
    ds = mlflow.data.from_pandas(frame, source=str(Path(rankings).resolve()), digest=file_md5(rankings),
                                 name=f"round_{round_no}/rankings.jsonl")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(ds, context="labels")
        if labels_path:
            mlflow.set_tag(f"rlhf.labels.round_{round_no}", f"{labels_path} md5={file_md5(labels_path)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.labeling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="default: label.rounds")
    ap.add_argument("--labeler", choices=("simulated", "human"), default=None, help="default: label.labeler")
    ap.add_argument("--label-timeout-s", type=int, default=7 * 24 * 3600, help="fail a round whose labels never come")
    add_config_arguments(ap)
    args = check_arguments(ap, argv)
    summary = labeling_rounds(rounds=args.rounds, labeler=args.labeler, overrides=args.overrides,
                              profile=args.profile, label_timeout_s=args.label_timeout_s)
    for row in summary["rounds"]:
        print(row)
    print(f"MLflow run: {tracking.run_url(summary['mlflow_run_id'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
