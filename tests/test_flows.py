"""The Prefect flows on the tiny config, for real: Prefect under `prefect_test_harness`, MLflow on sqlite in a temp
dir, DVC in a temporary git repository. One pipeline run trains every stage and tracks it; an identical rerun skips
every stage; a changed PPO param reruns only PPO and evaluation and registers a new policy, promoted only through
the gates; the over-optimization sweep flow runs on the cached upstream stages."""

from __future__ import annotations

import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")  # before anything imports prefect

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows import pipeline, registry
from flows.dvc_cache import data_md5, write_params
from flows.pipeline import NAMES, rlhf_pipeline
from flows.stage import Sink
from flows.sweep import overoptimization_sweep
from rlhf_core.config import load_config

from .test_dvc_pipeline import make_project, project_env, stages_under_test

POLICY = NAMES["ppo"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project as the working directory, with its own MLflow store and DVC remote, under a test Prefect API."""
    tmp = tmp_path_factory.mktemp("flows")
    path = make_project(tmp / "project", remote=tmp / "dvc-remote")
    env = project_env(path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
                      MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=60):
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(path)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        yield path
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def runs(project):
    """Two identical pipeline runs: their summaries, and the mtime of every model file after the first."""
    first = rlhf_pipeline()
    mtimes = {p: p.stat().st_mtime_ns for p in (project / "outputs").rglob("*.safetensors")}
    second = rlhf_pipeline()
    return first, second, mtimes


def children(parent_run_id: str) -> dict[str, mlflow.entities.Run]:
    found = MlflowClient().search_runs([MlflowClient().get_run(parent_run_id).info.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["rlhf.stage"]: r for r in found}


def read_artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
def test_first_run_trains_every_stage_and_tracks_it_in_mlflow(runs, project):
    first, _, _ = runs
    stages = stages_under_test()
    assert {s: r["status"] for s, r in first["stages"].items()} == {s: "ran" for s in stages}

    client = MlflowClient()
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data.md5"] == data_md5(project)
    assert parent.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert len(parent.data.tags["git.sha"]) == 40
    kids = children(first["parent_run_id"])
    assert set(kids) == set(stages)
    sft = kids["sft"]
    assert sft.data.params["sft.lr"] == str(yaml.safe_load((project / "params.yaml").read_text())["sft"]["lr"])
    steps = {m.step for m in client.get_metric_history(sft.info.run_id, "train/loss")}  # one point per step
    assert steps == set(range(1, int(first["stages"]["sft"]["metrics"]["train/steps"]) + 1))
    assert any(k.startswith("system/") for k in sft.data.metrics), "no system metrics"
    digests = {d.dataset.digest for d in sft.inputs.dataset_inputs}
    assert digests == {data_md5(project)}
    artifacts = {a.path for a in client.list_artifacts(sft.info.run_id, "outputs")}
    assert "outputs/samples.jsonl" in artifacts and "outputs/metrics.json" in artifacts
    assert [a.path for a in client.list_artifacts(sft.info.run_id, "plots")] == ["plots/sft_history.png"]
    assert "evaluation_report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    if "evaluate" in stages:
        assert "outputs/report.md" in {a.path for a in client.list_artifacts(kids["evaluate"].info.run_id, "outputs")}

    kinds = {(a.key, a.type) for a in read_artifacts(first["flow_run_id"])}
    assert {("evaluation-report", "markdown"), ("key-metrics", "table"), ("mlflow-run", "markdown")} <= kinds
    progress = [a for a in read_artifacts(first["flow_run_id"]) if a.type == "progress"]
    assert len(progress) >= 3 and all(a.data == 100.0 for a in progress)


@pytest.mark.slow
def test_first_run_registers_sft_reward_and_a_gated_policy(runs):
    first, _, _ = runs
    client = MlflowClient()
    for name in (NAMES["sft"], NAMES["reward"]):
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert str(version.version) == "1" and version.run_id and version.tags["dvc.md5"].endswith(".dir")
    if "ppo" not in stages_under_test():
        return
    reg = first["registered"][POLICY]
    assert reg["created"] and "candidate" in reg["aliases"]
    # the first policy has no champion to beat: it is promoted unless the hacking alarm fired
    evaluation = first["stages"]["evaluate"]["metrics"]
    assert reg["gate"]["passed"] == (not evaluation.get("hacking_alarm")) == ("champion" in reg["aliases"])
    # a model card and readable tags on every version; the flow's report links to the version
    policy = client.get_model_version(POLICY, reg["version"])
    for field in ("RLHF policy", policy.tags["data.md5"], policy.tags["git.sha"], "ppo.kl_coef", "policy/gold_mean",
                  " ± ", "Champion gate", "Reward over-optimization"):
        assert field in policy.description, field
    assert policy.tags["gate"] == ("passed" if reg["gate"]["passed"] else "refused")
    assert "sft.lr" in client.get_model_version(NAMES["sft"], "1").description
    report = next(a for a in read_artifacts(first["flow_run_id"]) if a.key == "evaluation-report").data
    assert f"/#/models/{POLICY}/versions/{reg['version']}" in report
    if "hacking_alarm" in evaluation:  # snapshots: the RL curve's picture, served by MLflow from the flow's run
        assert f"get-artifact?path=plots/overopt.png&run_uuid={first['parent_run_id']}" in report
        assert "plots/overopt.png" in {a.path for a in client.list_artifacts(first["parent_run_id"], "plots")}
    pipe = mlflow.transformers.load_model(f"models:/{POLICY}@candidate")
    out = pipe("\n\nHuman: hello\n\nAssistant:", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("\n\nHuman: hello")


@pytest.mark.slow
def test_identical_rerun_skips_every_stage(runs, project):
    first, second, mtimes = runs
    assert {s: r["status"] for s, r in second["stages"].items()} == {s: "skipped" for s in stages_under_test()}
    assert mtimes and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing was rewritten
    assert all(not r["created"] for r in second["registered"].values())
    kids = children(second["parent_run_id"])
    assert {r.data.tags["rlhf.dvc"] for r in kids.values()} == {"skipped"}
    assert kids["sft"].data.metrics["eval/loss"] == pytest.approx(first["stages"]["sft"]["metrics"]["eval/loss"])


@pytest.mark.slow
def test_changing_a_ppo_param_reruns_only_ppo_and_evaluation(runs, project):
    stages = stages_under_test()
    changed = "ppo" if "ppo" in stages else "reward"
    lr = yaml.safe_load((project / "params.yaml").read_text())[changed]["lr"]
    summary = rlhf_pipeline(overrides=[f"{changed}.lr={lr * 2}"])
    first_rerun = stages.index(changed)
    assert [s for s, r in summary["stages"].items() if r["status"] == "ran"] == stages[first_rerun:]
    assert all(summary["stages"][s]["status"] == "skipped" for s in stages[:first_rerun])
    assert yaml.safe_load((project / "params.yaml").read_text())[changed]["lr"] == lr * 2  # DVC saw it
    if changed != "ppo":
        return
    reg = summary["registered"][POLICY]
    assert reg["version"] == "2" and reg["created"] and "candidate" in reg["aliases"]
    # v1 stays champion otherwise (or there is none, when v1's own gate failed)
    assert (str(registry.aliases(POLICY).get("champion")) == "2") == reg["gate"]["passed"]


def test_gate_pairs_with_the_champion_and_refuses_a_hacking_alarm():
    good = {"policy/gold_mean": 0.5, "policy/win_rate": 0.6, "hacking_alarm": 0}
    champ = {(i, f"p{i}"): g for i, g in enumerate(np.linspace(-1, 1, 40))}
    assert registry.gate(good, dict(champ), None)["passed"]  # no champion yet
    within = registry.gate(good, {k: g - 0.01 + 0.05 * (-1) ** k[0] for k, g in champ.items()},
                           {"version": "3", "scores": champ})
    assert within["passed"] and within["paired"]["n"] == 40 and within["paired"]["diff"] == pytest.approx(-0.01)
    worse = registry.gate(good, {k: g - 0.2 + 0.05 * (-1) ** k[0] for k, g in champ.items()},
                          {"version": "3", "scores": champ})
    assert not worse["passed"] and worse["failures"][0].startswith("gold vs champion v3: -0.2000 ± 0.0080")
    assert registry.gate_tags(worse)["gate"] == "refused" and registry.gate_tags(worse)["gate.diff"] == "-0.2000"
    assert registry.gate({**good, "hacking_alarm": 1}, None, None)["failures"] == ["hacking_alarm is on"]
    assert registry.gate(good, dict(champ), {"version": "1", "scores": None})["failures"] == [
        "no per-prompt scores to pair with champion v1"]
    assert registry.gate({"policy/win_rate": 0.9}, None, None)["failures"] == [
        "policy/gold_mean missing from the evaluation metrics"]


@pytest.mark.slow
def test_overoptimization_sweep_reuses_the_cached_stages(runs, project):
    if "ppo" not in stages_under_test():
        pytest.skip("needs the ppo stage")
    summary = overoptimization_sweep(kl_coefs=[0.0, 0.5], overrides=["ppo.updates=2"])
    assert set(summary["upstream"].values()) == {"skipped"}
    assert [r["kl_coef"] for r in summary["table"]] == [0.0, 0.5]
    assert all(r["kl"] is not None for r in summary["table"])
    assert (project / "outputs" / "sweep" / "frontier.csv").exists()
    paths = {a.path for a in MlflowClient().list_artifacts(summary["sweep_run_id"], "outputs")}
    assert "outputs/frontier.csv" in paths and "outputs/frontier.png" in paths


def test_progress_artifact_moves_in_small_steps_even_when_each_poll_sees_little_progress(monkeypatch, tmp_path):
    """A stage that advances 0.5 % between two polls still moves its progress bar (every 2 %), not only at the end."""
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(pipeline.artifacts, "create_progress_artifact",
                        lambda progress, description: calls.append(("create", progress)) or "artifact-id")
    monkeypatch.setattr(pipeline.artifacts, "update_progress_artifact",
                        lambda artifact_id, progress: calls.append(("update", progress)))
    progress = pipeline.Progress("pretrain", tmp_path / "progress.json")
    for i in range(201):
        progress.set(i * 0.5)
    progress.finish()
    updates = [p for kind, p in calls if kind == "update"]
    assert calls[0] == ("create", 0.0)
    assert updates[:3] == [2.0, 4.0, 6.0] and updates[-1] == 100.0 and len(updates) == 50


def test_a_profile_and_overrides_go_into_params_yaml_through_load_config_keeping_its_comments(tmp_path):
    """One merge (rlhf_core.config.load_config's); params.yaml then says exactly that config, and only the values
    that changed were rewritten: comments and layout survive, untouched keys stay as they were written."""
    params, profile = tmp_path / "params.yaml", tmp_path / "gpu.yaml"
    params.write_text("# the pipeline's params\nsft:\n  lr: 0.0005        # SFT learning rate\n  epochs: 2\n"
                      "ppo:\n  kl_coef: 0.05   # the KL penalty\n")
    profile.write_text("sft:\n  epochs: 1\n")
    cfg = load_config(params, profile=profile, overrides=["ppo.kl_coef=0.1", "evaluate.n_prompts=7"])
    assert write_params(cfg, params)
    assert load_config(params) == cfg
    assert params.read_text() == ("# the pipeline's params\nsft:\n  lr: 0.0005        # SFT learning rate\n  epochs: 1\n"
                                  "ppo:\n  kl_coef: 0.1    # the KL penalty\nevaluate:\n  n_prompts: 7\n")
    assert not write_params(cfg, params)  # nothing left to change


def test_the_stage_sink_reports_steps_of_the_total_rlhf_core_announces(tmp_path):
    """rlhf_core's progress bar tells the sink its total; the progress file (the flow's progress artifact) says both."""
    from rlhf_core.training import progress

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        sink = Sink(str(tmp_path / "progress.json"))
        with mlflow.start_run():
            progress(40, "sft", sink=sink).close()
            sink({"train/loss": 1.0}, step=3)
        assert yaml.safe_load((tmp_path / "progress.json").read_text()) == {"step": 3, "total": 40}
    finally:
        mlflow.set_tracking_uri(None)
