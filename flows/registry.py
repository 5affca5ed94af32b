"""Model registry: the SFT model, the reward model and the PPO policy as versions; `candidate` and `champion`.

- SFT and reward model: their save_pretrained folders are logged to the stage's MLflow run and registered with
  `create_model_version` (load them with `mlflow.artifacts.download_artifacts("models:/rlhf-sft/1")` + transformers).
- The policy: through the transformers flavor, so `mlflow.transformers.load_model("models:/rlhf-policy@champion")`
  returns a text-generation pipeline.
- A version is tagged with DVC's md5 of the model folder: a rerun that DVC skipped registers nothing new.
- A new policy version gets the alias `candidate`; `champion` moves to it only when the gate passes: no
  reward-hacking alarm, and a paired comparison with the champion on the same held-out prompts (per-prompt gold from
  each evaluation's completions.csv, logged with the version at `evaluation/completions.csv`) finds the candidate
  not worse beyond evaluate.gate_margin + evaluate.gate_z standard errors (rlhf_core/gate.py). The verdict and its
  numbers are tags of the version (`gate`, `gate.diff`, `gate.se`, ...).
- Every version carries a model card as its description (what it is, data md5, git SHA, the stage's key params,
  metrics with standard errors, the gate, the over-optimization summary) and readable tags.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rlhf_core.gate import pair_by_prompt, paired_gate

GATES = ("policy/gold_mean", "policy/win_rate")  # rlhf_core.evaluate names the PPO policy "policy"
ALARM = "hacking_alarm"
SCORES = "evaluation/completions.csv"  # where a policy version's per-prompt evaluation lives, in its run
KEY_PARAMS = {"sft": ("lr", "epochs", "batch_size", "max_length"),
              "reward": ("lr", "epochs", "batch_size", "ranking_mode", "init_from"),
              "ppo": ("updates", "rollout_batch_size", "lr", "kl_coef", "adaptive_kl", "snapshot_every",
                      "stop_on_alarm")}


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


def gate(candidate: dict, scores: dict | None, champion: dict | None, margin: float = 0.0,
         z: float = 2.0) -> dict:
    """The champion gate. `candidate`: its evaluation metrics; `scores`: its per-prompt gold ({prompt key: gold});
    `champion`: None (no champion yet) or {"version", "scores"} (scores None when it has none to pair with).
    Returns {"passed", "failures", "paired": rlhf_core.gate.paired_gate's numbers or None, "champion"}."""
    failures = [f"{ALARM} is on"] if candidate.get(ALARM) else []
    failures += [f"{key} missing from the evaluation metrics" for key in GATES if key not in candidate]
    paired = None
    if champion is not None:
        if scores is None or champion["scores"] is None:
            failures.append(f"no per-prompt scores to pair with champion v{champion['version']}")
        else:
            cand, champ = pair_by_prompt(scores, champion["scores"])
            if len(cand) < 2:
                failures.append(f"fewer than 2 held-out prompts shared with champion v{champion['version']}")
            else:
                paired = paired_gate(cand, champ, margin, z)
                if not paired["passed"]:
                    failures.append(f"gold vs champion v{champion['version']}: {paired['diff']:+.4f} ± "
                                    f"{paired['se']:.4f} (SE, {paired['n']} prompts), worse than margin {margin} + "
                                    f"{z} SE")
    return {"passed": not failures, "failures": failures, "paired": paired,
            "champion": None if champion is None else str(champion["version"])}


def read_scores(path: Path, model: str = "policy") -> dict[tuple[int, str], float]:
    """{(prompt_index, prompt): gold} of one model in an evaluation's completions.csv."""
    with open(path, encoding="utf-8", newline="") as f:
        return {(int(r["prompt_index"]), r["prompt"]): float(r["gold"]) for r in csv.DictReader(f)
                if r["model"] == model}


def version_scores(version) -> dict | None:
    """A registered policy version's per-prompt gold, from `evaluation/completions.csv` in its run; None if absent."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=SCORES, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return read_scores(Path(path))


def eval_tags(metrics: dict) -> dict[str, str]:
    return {f"eval.{k}": str(float(metrics[k])) for k in (*GATES, ALARM) if k in metrics}


def gate_tags(result: dict) -> dict[str, str]:
    """The gate's verdict and numbers as version tags a person can read in the MLflow UI."""
    tags = {"gate": "passed" if result["passed"] else "refused",
            "gate.reasons": "; ".join(result["failures"]) or "none",
            "gate.champion": f"v{result['champion']}" if result["champion"] else "none (first policy)"}
    if p := result["paired"]:
        tags.update({"gate.diff": f"{p['diff']:+.4f}", "gate.se": f"{p['se']:.4f}", "gate.n": str(p["n"]),
                     "gate.win_rate": f"{p['win_rate']:.3f}", "gate.rule": f"diff + {p['z']} SE >= -{p['margin']}"})
    return tags


def promote(name: str, version: str, metrics: dict, scores_file: Path | None, margin: float = 0.0,
            z: float = 2.0) -> dict:
    """`candidate` -> version; `champion` -> version when the gate passes against the current champion (paired on
    the held-out prompts both were evaluated on). The verdict goes into the version's tags."""
    client = MlflowClient()
    client.set_registered_model_alias(name, "candidate", version)
    try:
        current = client.get_model_version_by_alias(name, "champion")
        champion = {"version": current.version, "scores": version_scores(current)}
    except MlflowException:
        champion = None
    scores = read_scores(scores_file) if scores_file and Path(scores_file).is_file() else None
    result = gate(metrics, scores, champion, margin, z)
    for k, v in gate_tags(result).items():
        client.set_model_version_tag(name, version, k, v)
    if result["passed"]:
        client.set_registered_model_alias(name, "champion", version)
    return result


def _with_se(metrics: dict, key: str) -> str:
    se_key = key[:-5] + "_se" if key.endswith("_mean") else key + "_se"
    se = metrics.get(se_key)
    return f"{metrics[key]:.4g} ± {se:.2g}" if se is not None and math.isfinite(se) else f"{metrics[key]:.4g}"


def model_card(name: str, stage: str, tags: dict, params: dict, metrics: dict, gate_result: dict | None = None) -> str:
    """The version's description in markdown: what it is, lineage, key params, metrics (± SE), gate, over-optimization.
    `params`: flat "section.key" -> value; `metrics`: the stage's (ppo: the evaluation's) flat metrics."""
    what = {"sft": "supervised fine-tuned policy (demonstrations, loss on responses)",
            "reward": "reward model (pairwise Bradley-Terry on ranked comparisons), the proxy PPO optimises",
            "ppo": "RLHF policy (PPO against the reward model, per-token KL penalty to the SFT policy)"}[stage]
    lines = [f"# {name}: {what}", "",
             f"- data (DVC md5 of data/): `{tags.get('data.md5', 'unknown')}`",
             f"- git SHA: `{tags.get('git.sha', 'unknown')}`",
             f"- model folder (DVC md5): `{tags.get('dvc.md5', 'unknown')}`",
             f"- made by Prefect flow run `{tags.get('prefect.flow_run_id') or 'none'}`", "",
             "## Key params", ""]
    keys = [f"base.{k}" for k in ("model", "seed")] + [f"{stage}.{k}" for k in KEY_PARAMS[stage]]
    lines += [f"- {k}: {params[k]}" for k in keys if k in params]
    lines += ["", "## Metrics (± one standard error)", ""]
    if stage == "ppo":
        shown = [f"{m}/{k}" for m in ("policy", "sft") for k in ("gold_mean", "gold_delta", "win_rate", "proxy_mean",
                                                                 "kl") if f"{m}/{k}" in metrics]
    else:
        shown = sorted(k for k in metrics if not k.endswith("_se") and k.split("/")[0] in ("eval", "train"))
    lines += [f"- {k}: {_with_se(metrics, k)}" for k in shown] or ["- none recorded"]
    if gate_result is not None:
        lines += ["", "## Champion gate", "", f"- verdict: **{'passed' if gate_result['passed'] else 'refused'}**"
                  + ("" if gate_result["passed"] else " (" + "; ".join(gate_result["failures"]) + ")")]
        if p := gate_result["paired"]:
            lines.append(f"- gold vs champion v{gate_result['champion']}, paired on {p['n']} held-out prompts: "
                         f"{p['diff']:+.4f} ± {p['se']:.4f}; rule diff + {p['z']}·SE ≥ −{p['margin']} "
                         f"(upper {p['upper']:+.4f}); head-to-head win rate {p['win_rate']:.3f}")
        elif gate_result["champion"] is None:
            lines.append("- no champion before it: nothing to compare with")
    if stage == "ppo":
        lines += ["", "## Reward over-optimization (Gao et al. 2022)", "", *overopt_summary(metrics)]
    return "\n".join(lines) + "\n"


def overopt_summary(m: dict) -> list[str]:
    """Fits, alarm and the online watch's choice, as markdown bullets, from the evaluation's metrics."""
    out = []
    for form, label in (("rl", "RL curve (PPO snapshots)"), ("bon", "best-of-n")):
        if f"overopt/{form}_r2" in m:
            peak = (f"d* = {m[f'overopt/{form}_d_star']:.3g}, peak gold {m[f'overopt/{form}_gold_star']:+.3f}"
                    if f"overopt/{form}_d_star" in m else "no peak")
            out.append(f"- {label}: α = {m[f'overopt/{form}_alpha']:.4g}, β = {m[f'overopt/{form}_beta']:.4g}, "
                       f"R² = {m[f'overopt/{form}_r2']:.3f}, {peak}")
    if ALARM in m:
        out.append(f"- reward-hacking alarm: {'fired at update %d' % m['hacking_alarm_update'] if m[ALARM] else 'quiet'}")
    else:
        out.append("- reward-hacking alarm: not evaluated (no PPO snapshots)")
    if "watch/best_update" in m:
        fired = m["watch/alarm_update"] >= 0
        out.append(f"- online watch (ppo.stop_on_alarm): {'stopped at update %d' % m['watch/alarm_update'] if fired else 'ran to the end'}; "
                   f"this version is the snapshot of update {m['watch/best_update']:.0f}, the best under gold")
    return out


def card_tags(stage: str, tags: dict, params: dict, metrics: dict) -> dict[str, str]:
    """Readable tags beside the card: lineage, key params, and for the policy its headline numbers."""
    out = {"stage": stage, "data.md5": tags.get("data.md5", "unknown"), "git.sha": tags.get("git.sha", "unknown")}
    out.update({f"params.{k}": str(v) for k, v in params.items() if k.split(".", 1)[1] in KEY_PARAMS[stage]
                and k.startswith(stage + ".")})
    if stage == "ppo":
        for key, label in (("policy/gold_mean", "gold"), ("policy/win_rate", "win_rate_vs_sft"), ("policy/kl", "kl")):
            if key in metrics:
                out[f"eval.{label}"] = _with_se(metrics, key)
        if "overopt/rl_r2" in metrics:
            out["overopt.rl_fit"] = (f"alpha={metrics['overopt/rl_alpha']:.3g} beta={metrics['overopt/rl_beta']:.3g} "
                                     f"R2={metrics['overopt/rl_r2']:.3f}")
        if ALARM in metrics:
            out["overopt.alarm"] = f"fired at update {metrics['hacking_alarm_update']:.0f}" if metrics[ALARM] \
                else "quiet"
        if "watch/best_update" in metrics:
            out["watch.best_update"] = f"{metrics['watch/best_update']:.0f}"
    return out


def write_card(name: str, version: str, stage: str, tags: dict, params: dict, metrics: dict,
               gate_result: dict | None = None) -> None:
    """The model card as the version's description, and its readable tags."""
    client = MlflowClient()
    client.update_model_version(name, version, description=model_card(name, stage, tags, params, metrics,
                                                                       gate_result))
    for k, v in card_tags(stage, tags, params, metrics).items():
        client.set_model_version_tag(name, version, k, v)


def version_url(name: str, version: str) -> str:
    """Where the version opens in the MLflow UI (MLFLOW_UI_URL, default: `mlflow ui` on 127.0.0.1:5000)."""
    return f"{os.environ.get('MLFLOW_UI_URL', 'http://127.0.0.1:5000').rstrip('/')}/#/models/{name}/versions/{version}"


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
