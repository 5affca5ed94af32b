"""Model registry: the SFT model, the reward model and the PPO policy as versions; `candidate` and `champion`.

- SFT and reward model: their save_pretrained folders are logged to the stage's MLflow run and registered with
  `create_model_version` (load them with `mlflow.artifacts.download_artifacts("models:/rlhf-sft/1")` + transformers).
- The policy: through the transformers flavor, so `mlflow.transformers.load_model("models:/rlhf-policy@champion")`
  returns a text-generation pipeline.
- A version is tagged with DVC's md5 of the model folder: a rerun that DVC skipped registers nothing new.
- A new policy version gets the alias `candidate`; `champion` moves to it only when the gates pass: gold reward and
  win rate against SFT at least the current champion's (recorded as tags on its version), and no reward-hacking
  alarm (evaluated when PPO saved snapshots: ppo.snapshot_every > 0).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

GATES = ("policy/gold_mean", "policy/win_rate")  # rlhf_core.evaluate names the PPO policy "policy"
ALARM = "hacking_alarm"


def find_version(name: str, md5: str):
    """The version of `name` whose model folder had DVC md5 `md5`, or None."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("dvc.md5") == md5), None)


def register_folder(name: str, model_dir: Path, run_id: str, tags: dict[str, str]):
    """Log a save_pretrained folder to `run_id` and register it; reuses the version with the same DVC md5.
    Returns (version, created)."""
    if existing := find_version(name, tags["dvc.md5"]):
        return existing, False
    client = MlflowClient()
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return client.create_model_version(name, source=source, run_id=run_id, tags=tags), True


def register_policy(name: str, model_dir: Path, run_id: str, tags: dict[str, str]):
    """Log the policy with the transformers flavor (in-memory objects: the flavor cannot log a directory under
    transformers 5) and register it. Returns (version, created)."""
    import torch
    import transformers

    from rlhf_core.models import load_causal_lm, load_tokenizer

    if existing := find_version(name, tags["dvc.md5"]):
        return existing, False
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tok)
    # explicit requirements: inferring them would load the model again in a subprocess
    reqs = [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="policy",
                                             task="text-generation", registered_model_name=name,
                                             pip_requirements=reqs)
    client = MlflowClient()
    version = info.registered_model_version
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    return client.get_model_version(name, str(version)), True


def gate(candidate: dict, champion: dict | None) -> tuple[bool, list[str]]:
    """Evaluation gates: every GATES metric present and at least the champion's; no hacking alarm."""
    failures = [f"{ALARM} is on"] if candidate.get(ALARM) else []
    for key in GATES:
        if key not in candidate:
            failures.append(f"{key} missing from the evaluation metrics")
        elif champion and key in champion and float(candidate[key]) < float(champion[key]):
            failures.append(f"{key} {float(candidate[key]):.4f} < champion's {float(champion[key]):.4f}")
    return not failures, failures


def eval_tags(metrics: dict) -> dict[str, str]:
    return {f"eval.{k}": str(float(metrics[k])) for k in (*GATES, ALARM) if k in metrics}


def champion_metrics(name: str) -> dict | None:
    try:
        version = MlflowClient().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return {k.removeprefix("eval."): float(v) for k, v in version.tags.items() if k.startswith("eval.")}


def promote(name: str, version: str, metrics: dict) -> dict:
    """`candidate` -> version; `champion` -> version when the gates pass against the current champion."""
    client = MlflowClient()
    client.set_registered_model_alias(name, "candidate", version)
    passed, failures = gate(metrics, champion_metrics(name))
    if passed:
        client.set_registered_model_alias(name, "champion", version)
    return {"passed": passed, "failures": failures}


def aliases(name: str) -> dict[str, str]:
    try:
        return dict(MlflowClient().get_registered_model(name).aliases)
    except MlflowException:
        return {}


def describe(names: list[str]) -> list[str]:
    """One line per registered version, newest first, with its aliases: read back from the registry."""
    client, lines = MlflowClient(), []
    for name in names:
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            continue
        by_version = {}
        for alias, v in aliases(name).items():
            by_version.setdefault(str(v), []).append(alias)
        for v in sorted(versions, key=lambda v: -int(v.version)):
            tags = ", ".join(f"@{a}" for a in sorted(by_version.get(str(v.version), [])))
            where = f"(run {v.run_id}, dvc md5 {v.tags.get('dvc.md5', '?')})"
            lines.append(f"{name} v{v.version} {tags}".rstrip() + f"   {where}")
    return lines
