"""Labeling rounds: tasks out (JSONL, Label Studio, CSV) and labels back in (Label Studio export, CSV, JSONL) with
ties, skips and malformed rows; the stage on the tiny SFT model; rankings the reward stage reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rlhf_core.label import import_labels, label, read_labels, read_tasks, to_rankings, write_tasks
from rlhf_core.loaders import load_preferences
from rlhf_core.readers import DataError

PROMPT = "\n\nHuman: I got a puppy!\n\nAssistant:"


def _tasks(n: int = 3, k: int = 3) -> list[dict]:
    return [{"task_id": f"r1-{i}", "prompt": f"{PROMPT} ({i})", "round": 1, "model": "m", "data": "d",
             "responses": [{"id": f"r1-{i}-{j}", "text": f" reply {i}.{j}"} for j in range(1, k + 1)]}
            for i in range(n)]


@pytest.fixture
def written(tmp_path):
    tasks = _tasks(4)
    return tasks, write_tasks(tasks, 3, tmp_path / "label")


def _fill_csv(path: Path, out: Path, cells: dict[str, dict[str, str]]) -> Path:
    """tasks.csv as a person returns it: the given cells filled in, by task id; other rows left blank."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update(cells.get(row["task_id"], {}))
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_csv_round_trip_with_ties_skips_and_blanks(written, tmp_path):
    tasks, paths = written
    assert read_tasks(paths["tasks"]) == tasks
    labeled = _fill_csv(paths["csv"], tmp_path / "labeled.csv", {
        "r1-0": {"rank_1": "2", "rank_2": "1", "rank_3": "2"},   # a tie between responses 1 and 3
        "r1-1": {"skip": "yes"},
        # r1-2 and r1-3 left blank: not labeled
    })
    labels = read_labels(labeled, tasks)
    assert labels == [{"task_id": "r1-0", "ranks": [2, 1, 2]}, {"task_id": "r1-1", "skip": True}]
    result = import_labels(paths["tasks"], labeled, tmp_path / "label")
    assert result.metrics["labels/labeled"] == 1 and result.metrics["labels/skipped"] == 1
    assert result.metrics["labels/unlabeled"] == 2
    assert result.metrics["labels/tied_pairs"] == 1 and result.metrics["labels/comparisons"] == 2
    # the reward stage's loader reads the rankings: response 2 beats 1 and 3, no pair between the tied two
    (group,) = load_preferences(result.outputs["rankings"])
    assert group.responses == (" reply 0.1", " reply 0.2", " reply 0.3") and set(group.pairs) == {(1, 0), (1, 2)}


def _ls_export(ls_tasks: list[dict], annotations: list[list[dict]]) -> list[dict]:
    """A Label Studio JSON export: the imported tasks with ids and their annotations."""
    return [{"id": 100 + i, "data": t["data"], "annotations": a} for i, (t, a) in enumerate(zip(ls_tasks, annotations))]


def _ranker(buckets: dict) -> dict:
    return {"was_cancelled": False, "result": [{"from_name": "rank", "to_name": "responses", "type": "ranker",
                                                "value": {"ranker": buckets}}]}


def test_label_studio_round_trip_with_buckets_ties_and_skips(written, tmp_path):
    tasks, paths = written
    ls_tasks = json.loads(paths["label_studio"].read_text())
    config = paths["label_studio_config"].read_text()
    assert '<Ranker name="rank" toName="responses">' in config and '<Bucket name="rank_3"' in config
    assert ls_tasks[0]["data"]["items"][1] == {"id": "r1-0-2", "title": "Response 2", "body": " reply 0.2"}
    export = _ls_export(ls_tasks, [
        [{"was_cancelled": True, "result": []}, _ranker({"rank_1": ["r1-0-3"], "rank_2": ["r1-0-1", "r1-0-2"]})],
        [{"was_cancelled": True, "result": []}],                       # skipped in Label Studio
        [_ranker({"responses": ["r1-2-2", "r1-2-3", "r1-2-1"]})],      # a List + Ranker without buckets: an order
        [],                                                            # not labeled (yet)
    ])
    (tmp_path / "export.json").write_text(json.dumps(export))
    labels = read_labels(tmp_path / "export.json", tasks)
    assert labels == [{"task_id": "r1-0", "ranks": [2, 2, 1]}, {"task_id": "r1-1", "skip": True},
                      {"task_id": "r1-2", "ranks": [3, 1, 2]}]
    rows, metrics = to_rankings(tasks, labels)
    assert [r["ranks"] for r in rows] == [[2, 2, 1], [3, 1, 2]]
    assert metrics["labels/tied_pairs"] == 1 and metrics["labels/comparisons"] == 2 + 3
    assert metrics["labels/skipped"] == 1 and metrics["labels/unlabeled"] == 1


def test_jsonl_labels_all_tied_is_counted_and_nothing_usable_is_an_error(written, tmp_path):
    tasks, paths = written
    (tmp_path / "l.jsonl").write_text('{"task_id": "r1-0", "ranks": [1, 1, 1]}\n{"task_id": "r1-1", "skip": true}\n')
    rows, metrics = to_rankings(tasks, read_labels(tmp_path / "l.jsonl", tasks))
    assert rows == [] and metrics["labels/all_tied"] == 1 and metrics["labels/unlabeled"] == 2
    with pytest.raises(DataError, match=r"no usable ranking \(1 skipped, 1 all tied, 2 unlabeled\)"):
        import_labels(paths["tasks"], tmp_path / "l.jsonl", tmp_path / "out")


LS_OK = {"rank_1": ["r1-0-1"], "rank_2": ["r1-0-2"], "rank_3": ["r1-0-3"]}
MALFORMED = [  # (file name, content, row, field, reason fragment)
    ("bad-rank.csv", {"r1-1": {"rank_1": "1", "rank_2": "first", "rank_3": "3"}}, 2, "rank_2", "not a whole number"),
    ("half-filled.csv", {"r1-0": {"rank_1": "1", "rank_3": "2"}}, 1, "rank_2", "empty: rank every response"),
    ("out-of-range.csv", {"r1-0": {"rank_1": "1", "rank_2": "4", "rank_3": "2"}}, 1, "rank_2", "from 1 (best) to 3"),
    ("edited.csv", {"r1-2": {"response_2": "something else", "rank_1": "1", "rank_2": "2", "rank_3": "3"}}, 3,
     "response_2", "differs from the response in tasks.jsonl"),
    ("unknown.jsonl", '{"task_id": "r1-0", "ranks": [1, 2, 3]}\n{"task_id": "r9-9", "ranks": [1, 2, 3]}\n', 2,
     "task_id", "unknown task 'r9-9'"),
    ("twice.jsonl", '{"task_id": "r1-0", "ranks": [1, 2, 3]}\n{"task_id": "r1-0", "ranks": [3, 2, 1]}\n', 2,
     "task_id", "labeled twice (first in row 1)"),
    ("short.jsonl", '{"task_id": "r1-0", "ranks": [1, 2]}\n', 1, "ranks", "2 ranks for 3 responses"),
    ("broken.jsonl", '{"task_id": "r1-0", "ranks": [1, 2, 3]}\n{"task_id": \n', 2, None, "not valid JSON"),
    ("unplaced.json", [{"data": {"task_id": "r1-0"}, "annotations": [_ranker({"rank_1": ["r1-0-1"]})]}], 1,
     "annotations.result.value.ranker", "'r1-0-2' was not put in a rank column"),
    ("foreign.json", [{"data": {"task_id": "r1-0"}, "annotations": [_ranker({**LS_OK, "rank_3": ["x"]})]}], 1,
     "ranker.rank_3", "'x' is not a response of task r1-0"),
    ("no-task-id.json", [{"data": {"prompt": "p"}, "annotations": []}], 1, "data.task_id", "missing field"),
]


@pytest.mark.parametrize("fname, content, row, field, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_labels_name_file_row_and_field(written, tmp_path, fname, content, row, field, reason):
    _, paths = written
    path = tmp_path / fname
    if fname.endswith(".csv"):
        _fill_csv(paths["csv"], path, content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as err:
        import_labels(paths["tasks"], path, tmp_path / "out")
    assert (err.value.file, err.value.row, err.value.field) == (str(path), row, field)
    assert reason in err.value.reason, str(err.value)
    assert not (tmp_path / "out" / "rankings.jsonl").exists()


@pytest.mark.slow
def test_the_stage_labels_the_sft_models_own_samples(tiny_run, tmp_path):
    """K samples per prompt from the tiny SFT model, ranked by the simulated labeler: the rankings are the model's
    responses (not the data's templates) and train the reward stage's loader as grouped rankings."""
    import dataclasses

    cfg, results = tiny_run
    cfg = dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, n_prompts=12, k=3, batch_size=36))
    sft = str(results["sft"].outputs["model"])
    out = label(cfg, sft, tmp_path / "label")
    tasks = read_tasks(out.outputs["tasks"])
    assert out.metrics["tasks"] == len(tasks) >= 6 and all(t["model"] == sft for t in tasks)
    assert out.metrics["tasks"] + out.metrics["tasks/dropped_prompts"] == 12
    templates = {r for g in load_preferences(Path(cfg.base.data_dir) / "prefs" / "rankings_train.jsonl")
                 for r in g.responses}
    sampled = [r["text"] for t in tasks for r in t["responses"]]
    assert sum(s in templates for s in sampled) < len(sampled)  # the model's own text, not only the data's
    groups = load_preferences(out.outputs["rankings"])
    assert len(groups) == out.metrics["labels/labeled"] == len(tasks)
    assert sum(len(g.pairs) for g in groups) == out.metrics["labels/comparisons"]
    again = label(cfg, sft, tmp_path / "again")  # same seed, same model: the same tasks (people's labels still fit)
    assert read_tasks(again.outputs["tasks"]) == tasks
    with open(out.outputs["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == len(tasks)
