"""The shape of the library, checked from its source: stages are leaves on a shared floor, the math module stays
cheap to import, and dvc.yaml lists every module whose code a stage runs (else DVC's cache would go stale)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "reward", "ppo", "evaluate", "label")
FLOOR = {"batching", "config", "forwards", "io", "labeler", "loaders", "readers", "losses", "models", "overopt",
         "runtime", "scoring", "training", "watch"}


def imports(module: str, only: ast.AST | None = None) -> set[str]:
    """rlhf_core modules `module` imports anywhere (functions included), or only inside the node `only`."""
    tree = only or ast.parse((ROOT / "rlhf_core" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "rlhf_core":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_core."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rlhf_core.")}
    return found


def closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        m = todo.pop()
        if m not in seen and (ROOT / "rlhf_core" / f"{m}.py").exists():
            seen.add(m)
            todo.extend(imports(m))
    return seen


def stage_code(stage: str) -> set[str]:
    """What `python -m flows.stage <stage>` runs of rlhf_core: cli.py's module-level imports, `_run`'s unconditional
    imports and the branch for this stage, and everything those import."""
    tree = ast.parse((ROOT / "rlhf_core" / "cli.py").read_text())
    top = {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_run")
    used = set().union(*(imports("cli", n) for n in top))
    for node in run.body:
        unconditional = isinstance(node, (ast.Import, ast.ImportFrom))
        if unconditional or (isinstance(node, ast.If) and stage in ast.unparse(node.test)):
            used |= imports("cli", node)
    return closure(used) | {"cli"}


def dvc_deps(stage: str) -> set[str]:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    return {Path(d).stem for d in deps if d.startswith("rlhf_core/")}


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_only_the_floor(stage):
    assert imports(stage) <= FLOOR, f"{stage} imports {sorted(imports(stage) - FLOOR)}"
    assert closure({stage}) - {stage} <= FLOOR


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_the_code_each_stage_runs(stage):
    assert dvc_deps(stage) == stage_code(stage), (f"dvc.yaml `{stage}` deps: missing "
                                                  f"{sorted(stage_code(stage) - dvc_deps(stage))}, extra "
                                                  f"{sorted(dvc_deps(stage) - stage_code(stage))}")


def test_dvc_yaml_rounds_stage_lists_the_code_it_runs():
    assert dvc_deps("rounds") == closure({"rounds"})


def test_dvc_yaml_data_stage_lists_the_loaders_every_stage_declares():
    # the data stage loads every stage's declared inputs (rlhf_core.cli.stage_inputs), so it runs each stage module
    assert dvc_deps("data") == closure(set(STAGES) | {"config"}) | {"cli"}


def test_losses_imports_only_torch():
    code = ("import sys; import rlhf_core.losses; import json; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('rlhf_core', 'transformers', 'yaml', 'pydantic', 'scipy'))))")  # torch itself brings numpy
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)
    assert loaded == ["rlhf_core", "rlhf_core.losses"]


def test_the_data_stage_reads_a_text_corpus_as_ppo_ptx_data(tmp_path, monkeypatch, tiny_run):
    """ppo.ptx_data may be a {"text"} corpus: the flow's data stage and MLflow lineage load it with the loader PPO
    uses (they used to read it as demonstrations and fail: "cannot detect the format from columns ['text']")."""
    import mlflow

    from flows import stage as flow_stage
    from flows import tracking
    from rlhf_core.config import from_dict

    from .conftest import tiny_params

    cfg0 = tiny_run[0]
    params = tiny_params(tmp_path)
    params["base"]["data_dir"] = cfg0.base.data_dir
    params["ppo"] = {"ptx_coef": 0.5, "ptx_data": "pretrain.jsonl"}
    cfg = from_dict(params)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "0" * 32 + ".dir", "path": "data"}]}))
    result = flow_stage.validate_data(cfg)
    corpus_rows = len((Path(cfg0.base.data_dir) / "pretrain.jsonl").read_text().splitlines())
    assert result.metrics["rows/ppo.ptx_data"] == corpus_rows
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        tracking.log_lineage(tracking.stage_inputs(cfg, "ppo"), digest="0" * 32)
    logged = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert any(d.dataset.name.endswith("pretrain.jsonl") for d in logged)


def test_every_param_dvc_yaml_names_is_spelled_out_in_params_yaml():
    """DVC refuses a stage whose params.yaml lacks a key it lists (the tests' params files spell out every key, the
    repository's does not)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        for key in (k for k in stage.get("params", []) if isinstance(k, str)):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"dvc.yaml `{name}` lists {key}, params.yaml lacks it"
                node = node[part]
