"""Labeling rounds: K responses per prompt sampled from the model, sent to labelers, rankings brought back.

    python -m rlhf_core label                                   # label.model (SFT) -> <out>/label/, simulated labels
    python -m rlhf_core label --set label.labeler=human         # tasks only: label them with people (README)
    python -m rlhf_core label --set label.labeler=human --set label.labels=labels/round1.json   # bring them back

InstructGPT's reward model learns from labelers' rankings of the model's *own* outputs (Ouyang et al. 2022, sec. 3.4);
Anthropic's HH data came in iterated online rounds (Bai et al. 2022). This stage samples `label.k` responses per prompt
with the one sampler (`forwards.sample_as_ppo`: the policy's own distribution) and writes the task set three ways:

    <out>/tasks.jsonl                   {task_id, prompt, responses: [{id, text}], model, data, round}
    <out>/label_studio/tasks.json       Label Studio tasks; label_studio/config.xml is the ranking interface
    <out>/tasks.csv                     task_id, prompt, response_1..K, rank_1..K (empty), skip (empty)

Labels then come from the simulated labeler (Plackett-Luce on the gold, as the demo data) or from people: a Label
Studio JSON export, the CSV with its rank columns filled, or JSONL `{task_id, ranks}` / `{task_id, skip: true}`.
Equal ranks are ties (no comparison between them); a skipped task, or one with all ranks equal, is left out; both
are counted. Anything else malformed stops with a `DataError` naming file, row and field. The result is
<out>/rankings.jsonl in the `ranking` format the reward stage reads, and <out>/metrics.json with the counts.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
from pathlib import Path

import numpy as np
import torch

from rlhf_core import io, loaders, runtime
from rlhf_core.batching import batched
from rlhf_core.config import Config
from rlhf_core.forwards import decode_responses, sample_as_ppo
from rlhf_core.labeler import SimulatedLabeler
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.readers import DataError, json_kind, read_rows
from rlhf_core.training import StageResult, setup_stage, write_metrics

LS_TOOL, LS_LIST = "rank", "responses"
"""the Label Studio Ranker and List tag names of config.xml; buckets are rank_1 .. rank_K"""
SKIP_WORDS = frozenset(("1", "true", "yes", "y", "x", "skip"))


class LabelsPending(RuntimeError):
    """Human labeling: the tasks are written, the labels are not back yet."""


def inputs(cfg: Config) -> dict[str, loaders.DataInput]:
    """The data this stage reads, and how: the data stage, lineage and the stage itself use this one definition."""
    return loaders.declare(cfg, {"label.prompts": cfg.label.prompts}, loaders.load_prompts,
                           columns=cfg.label.columns or None)


def model_path(cfg: Config) -> str:
    """label.model: "sft" and "ppo" name those stages' models, anything else is a model directory."""
    return str(cfg.stage_dir(cfg.label.model) / "model") if cfg.label.model in ("sft", "ppo") else cfg.label.model


# ---------------------------------------------------------------------------------------------------------- tasks out


@torch.no_grad()
def sample_tasks(cfg: Config, model_dir: str, prompts: list[str], round_no: int, device, bf16: bool) -> list[dict]:
    """K responses per prompt from the model at `model_dir`, sampled the way PPO samples. Duplicate or empty responses
    within a prompt are dropped (a ranking needs distinct texts); a prompt left with fewer than 2 is dropped."""
    k, tok = cfg.label.k, load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir, tok).to(device).eval()
    data = cfg.data_path(cfg.label.prompts)
    tasks = []
    for chunk in batched(list(enumerate(prompts)), max(1, cfg.label.batch_size // k)):
        repeated = [p for _, p in chunk for _ in range(k)]
        with runtime.autocast(device, bf16):
            texts = decode_responses(tok, sample_as_ppo(policy, tok, repeated, cfg.ppo).responses)
        for j, (i, prompt) in enumerate(chunk):
            kept = list({t.strip(): t for t in texts[j * k:(j + 1) * k] if t.strip()}.values())  # as the loader sees
            if len(kept) >= 2:
                task_id = f"r{round_no}-{i}"
                tasks.append({"task_id": task_id, "prompt": prompt, "round": round_no, "model": model_dir,
                              "data": data, "responses": [{"id": f"{task_id}-{n}", "text": t}
                                                          for n, t in enumerate(kept, 1)]})
    return tasks


def label_studio_config(k: int) -> str:
    """The ranking interface: the prompt, the responses as a list, and K rank columns (same column = a tie)."""
    buckets = "\n".join(f'    <Bucket name="rank_{i}" title="{i}{" (best)" if i == 1 else " (worst)" if i == k else ""}"/>'
                        for i in range(1, k + 1))
    return (f'<View>\n  <Header value="Drag every response into a rank column: 1 is best. Equally good responses go '
            f'in the same column (a tie). Skip a task you cannot judge."/>\n  <Text name="prompt" value="$prompt"/>\n'
            f'  <List name="{LS_LIST}" value="$items" title="Responses"/>\n  <Ranker name="{LS_TOOL}" '
            f'toName="{LS_LIST}">\n{buckets}\n  </Ranker>\n</View>\n')


def write_tasks(tasks: list[dict], k: int, out_dir: Path) -> dict[str, Path]:
    """tasks.jsonl, Label Studio tasks + config, and the CSV people fill in."""
    ls_tasks = [{"data": {"task_id": t["task_id"], "prompt": t["prompt"], "round": t["round"], "model": t["model"],
                          "items": [{"id": r["id"], "title": f"Response {n}", "body": r["text"]}
                                    for n, r in enumerate(t["responses"], 1)]}} for t in tasks]
    text = _io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["task_id", "prompt", *(f"response_{i}" for i in range(1, k + 1)),
                     *(f"rank_{i}" for i in range(1, k + 1)), "skip"])
    for t in tasks:
        texts = [r["text"] for r in t["responses"]]
        writer.writerow([t["task_id"], t["prompt"], *texts, *[""] * (k - len(texts)), *[""] * k, ""])
    return {"tasks": io.write_jsonl(out_dir / "tasks.jsonl", tasks),
            "label_studio": io.write_json(out_dir / "label_studio" / "tasks.json", ls_tasks),
            "label_studio_config": io.write_text(out_dir / "label_studio" / "config.xml", label_studio_config(k)),
            "csv": io.write_text(out_dir / "tasks.csv", text.getvalue())}


# ---------------------------------------------------------------------------------------------------------- labels in


def simulated_labels(tasks: list[dict], labeler: SimulatedLabeler, seed: int) -> list[dict]:
    """One Plackett-Luce ranking per task from the simulated labeler (the demo's labels)."""
    rng = np.random.default_rng(seed)
    return [{"task_id": t["task_id"], "ranks": labeler.rank(t["prompt"], [r["text"] for r in t["responses"]], rng)}
            for t in tasks]


def read_labels(path: str | Path, tasks: list[dict]) -> list[dict]:
    """People's labels, one `{task_id, ranks}` or `{task_id, skip: True}` per labeled row (a row with nothing filled
    in is left out: unlabeled), from a Label Studio JSON export, the task CSV with ranks filled in, or JSONL. Raises
    DataError naming file, row and field."""
    name, rows = read_rows(path, "train")
    by_id = {t["task_id"]: t for t in tasks}
    labels, seen = [], {}
    for row_no, row in rows:
        if isinstance(row, DataError):
            raise row
        parse = _label_studio_row if "data" in row or "annotations" in row else _flat_row
        parsed = parse(name, row_no, row, by_id)
        if parsed is None:  # a task nobody labeled: counted as unlabeled
            continue
        if parsed["task_id"] in seen:
            raise DataError(name, row_no, "task_id", f"task {parsed['task_id']!r} labeled twice (first in row "
                                                     f"{seen[parsed['task_id']]})")
        seen[parsed["task_id"]] = row_no
        labels.append(parsed)
    return labels


def _task(name: str, row_no: int, field: str, task_id, by_id: dict) -> dict:
    if task_id not in by_id:
        raise DataError(name, row_no, field, f"unknown task {task_id!r} (not in this round's tasks.jsonl)")
    return by_id[task_id]


def _same_text(name: str, row_no: int, field: str, shown, text: str) -> None:
    """The labeled file, where it repeats a response, must repeat this round's: else the ranks belong to other texts."""
    if shown is not None and str(shown).strip() != text.strip():
        raise DataError(name, row_no, field, "differs from the response in tasks.jsonl (were the tasks sampled again "
                        "after export?)")


def _check_ranks(name: str, row_no: int, field: str, ranks: list, k: int) -> list[int]:
    """Whole numbers 1..k, one per response; equal numbers are ties."""
    if len(ranks) != k:
        raise DataError(name, row_no, field, f"{len(ranks)} ranks for {k} responses")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k:
            raise DataError(name, row_no, field, f"rank {r!r} is not a whole number from 1 (best) to {k}")
    return ranks


def _flat_row(name: str, row_no: int, row: dict, by_id: dict) -> dict | None:
    """A CSV row (rank_1..rank_K, skip) or a JSONL row (ranks list, skip)."""
    if "task_id" not in row or row["task_id"] in (None, ""):
        raise DataError(name, row_no, "task_id", "missing field")
    task = _task(name, row_no, "task_id", row["task_id"], by_id)
    k = len(task["responses"])
    for i, r in enumerate(task["responses"], 1):
        _same_text(name, row_no, f"response_{i}", row.get(f"response_{i}"), r["text"])
    skip = row.get("skip")
    if skip is True or (isinstance(skip, str) and skip.strip().lower() in SKIP_WORDS):
        return {"task_id": task["task_id"], "skip": True}
    if "ranks" in row:
        if not isinstance(row["ranks"], list):
            raise DataError(name, row_no, "ranks", f"expected a list, got {json_kind(row['ranks'])}")
        return {"task_id": task["task_id"], "ranks": _check_ranks(name, row_no, "ranks", row["ranks"], k)}
    cells = [(f"rank_{i}", row.get(f"rank_{i}")) for i in range(1, k + 1)]
    if all(v is None or not str(v).strip() for _, v in cells):
        return None  # nothing filled in: not labeled (yet)
    ranks = []
    for col, value in cells:
        if value is None or not str(value).strip():
            raise DataError(name, row_no, col, "empty: rank every response of the task, or none to leave it unlabeled")
        try:
            ranks.append(int(str(value).strip()))
        except ValueError:
            raise DataError(name, row_no, col, f"{value!r} is not a whole number from 1 (best) to {k}") from None
        if not 1 <= ranks[-1] <= k:
            raise DataError(name, row_no, col, f"rank {ranks[-1]} is not a whole number from 1 (best) to {k}")
    return {"task_id": task["task_id"], "ranks": ranks}


def _label_studio_row(name: str, row_no: int, row: dict, by_id: dict) -> dict | None:
    """A task of a Label Studio JSON export: the last annotation that was not skipped ("was_cancelled"), its Ranker
    result {bucket rank_i: [response ids]}, or without buckets {list name: [ids, best first]}."""
    data = row.get("data")
    if not isinstance(data, dict) or "task_id" not in data:
        raise DataError(name, row_no, "data.task_id", "missing field (was the task imported from label_studio/tasks.json?)")
    task = _task(name, row_no, "data.task_id", data["task_id"], by_id)
    for i, (item, r) in enumerate(zip(data.get("items") or [], task["responses"]), 1):
        _same_text(name, row_no, f"data.items.{i}.body", item.get("body") if isinstance(item, dict) else item,
                   r["text"])
    annotations = [a for a in row.get("annotations") or [] if isinstance(a, dict)]
    done = [a for a in annotations if not a.get("was_cancelled")]
    results = [r for r in (done[-1].get("result") or []) if isinstance(r, dict) and r.get("type") == "ranker"] \
        if done else []
    if not results:  # skipped in Label Studio ("was_cancelled"), or not labeled yet
        return {"task_id": task["task_id"], "skip": True} if annotations and not done else None
    ranker = (results[-1].get("value") or {}).get("ranker")
    if not isinstance(ranker, dict):
        raise DataError(name, row_no, "annotations.result.value.ranker", f"expected an object, got {json_kind(ranker)}")
    ids = [r["id"] for r in task["responses"]]
    rank_of: dict[str, int] = {}
    for bucket, members in ranker.items():
        if bucket == "_":  # Label Studio's column of items left unplaced
            continue
        if bucket == LS_LIST:
            placed = list(enumerate(members, 1)) if isinstance(members, list) else None
        elif bucket.startswith("rank_") and bucket[5:].isdigit() and isinstance(members, list):
            placed = [(int(bucket[5:]), m) for m in members]
        else:
            raise DataError(name, row_no, f"ranker.{bucket}", "not a rank column of config.xml (rank_1 .. rank_K)")
        if placed is None:
            raise DataError(name, row_no, f"ranker.{bucket}", f"expected a list, got {json_kind(members)}")
        for rank, item in placed:
            if item not in ids:
                raise DataError(name, row_no, f"ranker.{bucket}", f"{item!r} is not a response of task {task['task_id']}")
            rank_of[item] = rank
    if missing := [i for i in ids if i not in rank_of]:
        raise DataError(name, row_no, "annotations.result.value.ranker",
                        f"response {missing[0]!r} was not put in a rank column")
    return {"task_id": task["task_id"], "ranks": _check_ranks(name, row_no, "annotations.result.value.ranker",
                                                              [rank_of[i] for i in ids], len(ids))}


def to_rankings(tasks: list[dict], labels: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """`ranking` rows the reward stage reads, and counts: labeled, skipped, unlabeled, all tied, ties, comparisons."""
    by_id = {t["task_id"]: t for t in tasks}
    rows, counts = [], dict.fromkeys(("labeled", "skipped", "all_tied", "tied_pairs", "comparisons"), 0)
    for label in labels:
        if label.get("skip"):
            counts["skipped"] += 1
            continue
        ranks, task = label["ranks"], by_id[label["task_id"]]
        if len(set(ranks)) < 2:
            counts["all_tied"] += 1
            continue
        pairs = [(a, b) for i, a in enumerate(ranks) for b in ranks[i + 1:]]
        counts["labeled"] += 1
        counts["tied_pairs"] += sum(a == b for a, b in pairs)
        counts["comparisons"] += sum(a != b for a, b in pairs)
        rows.append({"task_id": task["task_id"], "round": task["round"], "model": task["model"],
                     "prompt": task["prompt"], "responses": [r["text"] for r in task["responses"]], "ranks": ranks})
    counts["unlabeled"] = len(tasks) - len(labels)
    return rows, {f"labels/{k}": float(v) for k, v in counts.items()}



def import_labels(tasks_path: str | Path, labels_path: str | Path, out_dir: Path) -> StageResult:
    """Validate people's labels against the round's tasks and write <out_dir>/rankings.jsonl + labels metrics."""
    tasks = read_tasks(tasks_path)
    rows, metrics = to_rankings(tasks, read_labels(labels_path, tasks))
    if not rows:
        raise DataError(str(labels_path), None, None, f"no usable ranking ({int(metrics['labels/skipped'])} skipped, "
                        f"{int(metrics['labels/all_tied'])} all tied, {int(metrics['labels/unlabeled'])} unlabeled)")
    return _write_rankings(rows, metrics, out_dir)


def label_simulated(cfg: Config, tasks_path: str | Path, out_dir: Path, round_no: int = 1,
                    labeler: SimulatedLabeler | None = None) -> StageResult:
    """The simulated labeler's rankings of the round's tasks (data.labeler_temperature, as the demo data)."""
    temperature = cfg.data.labeler_temperature
    labeler = labeler or SimulatedLabeler(**({"temperature": temperature} if temperature else {}))
    tasks = read_tasks(tasks_path)
    return _write_rankings(*to_rankings(tasks, simulated_labels(tasks, labeler, cfg.base.seed + round_no)), out_dir)


def read_tasks(path: str | Path) -> list[dict]:
    return [row for _, row in read_rows(path, "train")[1]]


def file_md5(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _write_rankings(rows: list[dict], metrics: dict, out_dir: Path) -> StageResult:
    path = io.write_jsonl(Path(out_dir) / "rankings.jsonl", rows)
    return StageResult({"rankings": path}, metrics)


# ---------------------------------------------------------------------------------------------------------- the stage


def make_tasks(cfg: Config, model_dir: str, out_dir: Path, round_no: int = 1) -> StageResult:
    """Sample the round's task set from `model_dir` and write it for people's tools (module docstring)."""
    out_dir = Path(out_dir)
    device, bf16 = setup_stage(cfg, out_dir)
    prompts = inputs(cfg)["label.prompts"].load()[:cfg.label.n_prompts]
    torch.manual_seed(cfg.base.seed + round_no)
    tasks = sample_tasks(cfg, model_dir, prompts, round_no, device, bf16)
    return StageResult(write_tasks(tasks, cfg.label.k, out_dir),
                       {"tasks": float(len(tasks)), "tasks/dropped_prompts": float(len(prompts) - len(tasks))})


def label(cfg: Config, model_dir: str, out_dir: Path, sink=None, round_no: int = 1) -> StageResult:
    """One labeling round: the task set from `model_dir`, ranked by the simulated labeler or by people's file
    (label.labeler: human, label.labels). People's labels not named yet: the tasks are written, then LabelsPending."""
    lab, out_dir = cfg.label, Path(out_dir)
    tasks = make_tasks(cfg, model_dir, out_dir, round_no)
    if lab.labeler == "simulated":
        labels = label_simulated(cfg, tasks.outputs["tasks"], out_dir, round_no)
    elif lab.labels:
        labels = import_labels(tasks.outputs["tasks"], cfg.data_path(lab.labels), out_dir)
    else:
        raise LabelsPending(f"{int(tasks.metrics['tasks'])} tasks written to {out_dir} (Label Studio: "
                            "label_studio/tasks.json with label_studio/config.xml; or tasks.csv): have them labeled, "
                            "put the labeled file under base.data_dir and rerun with label.labels set to it")
    metrics = {**tasks.metrics, **labels.metrics}
    write_metrics(out_dir / "metrics.json", metrics)
    if sink:
        sink(metrics, round_no)
    return StageResult({**tasks.outputs, **labels.outputs, "metrics": out_dir / "metrics.json"}, metrics)
