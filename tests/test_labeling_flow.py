"""The labeling-rounds flow for real: Prefect under `prefect_test_harness`, MLflow on sqlite in a temp dir. With people
as labelers the flow run pauses with a form for the labeled file; input sent through Prefect's API resumes it and the
labels are validated (a bad file fails the run naming file, row and field; no answer fails it at the timeout). With
the simulated labeler, two rounds train a reward model on both rounds' rankings, PPO and an evaluation per round."""

from __future__ import annotations

import csv
import json
import os
import tempfile
import threading
import time

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")  # before anything imports prefect

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.testing.utilities import prefect_test_harness

from flows.labeling import labeling_rounds
from rlhf_core.config import dump_params, from_dict, to_dict
from rlhf_core.readers import DataError

from .test_evaluate import TINY_PPO


@pytest.fixture(scope="module")
def project(tiny_run, tmp_path_factory):
    """params.yaml on the tiny trained models (label: 6 prompts x 3 samples) and a data.dvc (MLflow tags name the
    data version) as the working directory, its own MLflow store, under a test Prefect API."""
    cfg = tiny_run[0]
    tmp = tmp_path_factory.mktemp("labeling")
    raw = to_dict(cfg)
    raw["label"].update(n_prompts=6, k=3, batch_size=18)
    raw["ppo"].update(TINY_PPO, updates=2, snapshot_every=2)
    raw["evaluate"].update(n_prompts=8, bon_n=0, batch_size=16, n_side_by_side=2)
    raw["reward"].update(normalize_samples=8, batch_size=2, micro_batch_size=2)
    (tmp / "params.yaml").write_text(dump_params(from_dict(raw)))
    (tmp / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "0" * 32 + ".dir", "path": "data"}]}))
    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=60):
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        yield tmp
        mlflow.set_tracking_uri(None)


def answer_when_paused(write_labels, found: dict) -> threading.Thread:
    """A labeler elsewhere: waits for the paused flow run, reads what the UI shows, writes the labeled file and
    resumes the run through Prefect's API with the form's input."""

    def labeler():
        paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
        with get_client(sync_client=True) as client:
            for _ in range(600):
                runs = client.read_flow_runs(flow_run_filter=paused)
                if runs:
                    break
                time.sleep(0.2)
            else:
                return
            run = runs[0]
            keyset = run.state.state_details.run_input_keyset
            found["description"] = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
            found["schema"] = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
        resume_flow_run(run.id, run_input={"labels_path": str(write_labels())})

    thread = threading.Thread(target=labeler, daemon=True)
    thread.start()
    return thread


def fill_csv(tasks_csv, out, ranks_of):
    """tasks.csv with the cells `ranks_of(i, k)` gives for row i (k = the row's responses; a prompt whose samples
    were duplicates has fewer than label.k)."""
    with open(tasks_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row.update(ranks_of(i, sum(bool(v) for c, v in row.items() if c.startswith("response_"))))
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.mark.slow
def test_the_flow_pauses_for_peoples_labels_and_resumes_with_them(project):
    label_dir = project / "human" / "round_1" / "label"

    expected = {"comparisons": 0}

    def ranks_of(i: int, k: int) -> dict:
        """The first task skipped, the second with a tie between its first two responses, the others reversed."""
        if i == 0:
            return {"skip": "1"}
        ranks = [1, 1, *range(3, k + 1)] if i == 1 else list(range(k, 0, -1))
        expected["comparisons"] += k * (k - 1) // 2 - (i == 1)
        return {f"rank_{j}": str(r) for j, r in enumerate(ranks, 1)}

    def write_labels():
        return fill_csv(label_dir / "tasks.csv", project / "labeled.csv", ranks_of)

    found = {}
    thread = answer_when_paused(write_labels, found)
    summary = labeling_rounds(rounds=1, labeler="human", out_dir="human", train=False, poll_s=1, label_timeout_s=300)
    thread.join(timeout=5)
    assert "tasks.csv" in found["description"] and "label_studio/config.xml" in found["description"]
    assert "labels_path" in found["schema"]["properties"]
    (row,) = summary["rounds"]
    n = row["tasks"]
    assert row["labels/skipped"] == 1 and row["labels/labeled"] == n - 1 and row["labels/tied_pairs"] == 1
    assert row["labels/comparisons"] == expected["comparisons"]
    assert (label_dir / "rankings.jsonl").read_text().count("\n") == n - 1
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["rounds/labels/labeled"] == n - 1
    assert "labeled.csv" in run.data.tags["rlhf.labels.round_1"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["round_1/rankings.jsonl"]


@pytest.mark.slow
def test_an_invalid_labels_file_fails_the_run_naming_file_row_and_field(project):
    label_dir = project / "bad" / "round_1" / "label"

    def write_labels():
        return fill_csv(label_dir / "tasks.csv", project / "bad.csv", lambda i, k: {"rank_1": "1", "rank_2": "two"})

    thread = answer_when_paused(write_labels, {})
    with pytest.raises(DataError) as err:
        labeling_rounds(rounds=1, labeler="human", out_dir="bad", train=False, poll_s=1, label_timeout_s=300)
    thread.join(timeout=5)
    assert str(err.value).startswith(f"{project / 'bad.csv'}, row 1, field 'rank_2': 'two' is not a whole number")


@pytest.mark.slow
def test_labels_that_never_come_fail_the_run_at_the_timeout(project):
    with pytest.raises(TimeoutError, match="round 1: no labels came back within 2 s"):
        labeling_rounds(rounds=1, labeler="human", out_dir="late", train=False, poll_s=1, label_timeout_s=2)


@pytest.mark.slow
def test_two_simulated_rounds_train_on_all_labels_so_far_and_report_each_round(project):
    summary = labeling_rounds(rounds=2, labeler="simulated", out_dir="sim")
    rows = summary["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    # round 2's reward model learns from both rounds' comparisons; round 2 labels round 1's policy
    assert rows[1]["comparisons"] == rows[0]["labels/comparisons"] + rows[1]["labels/comparisons"]
    assert rows[0]["comparisons"] == rows[0]["labels/comparisons"]
    tasks_2 = (project / "sim" / "round_2" / "label" / "tasks.jsonl").read_text()
    assert str(project / "sim" / "round_1" / "ppo" / "model") in tasks_2
    for r in rows:
        assert {"rm_gold_accuracy", "gold_delta", "win_rate", "kl"} <= set(r)
    history = MlflowClient().get_metric_history(summary["mlflow_run_id"], "rounds/win_rate")
    assert [m.step for m in history] == [1, 2]
    assert (project / "sim" / "rounds.csv").read_text().startswith("round,")
