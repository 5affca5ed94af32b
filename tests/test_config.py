"""params.yaml loads into frozen dataclasses; bad keys, types and values are rejected with their dotted names."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core.config import Config, ConfigError, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_file_loads_and_matches_documented_defaults():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.base.model is None and cfg.base.seed == 0
    assert cfg.sft.batch_size % cfg.sft.micro_batch_size == 0
    assert cfg.reward.ranking_mode == "grouped" and cfg.data.k == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft.lr = 1.0


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_every_profile_validates(profile):
    cfg = load_config(ROOT / "params.yaml", profile=profile)
    assert cfg.base.out_dir != "outputs" or cfg.base.model is None


def test_gpu_profile_names_a_real_model_in_bf16():
    cfg = load_config(ROOT / "params.yaml", profile=ROOT / "profiles" / "gpu-pythia-410m.yaml")
    assert cfg.base.model == "EleutherAI/pythia-410m-deduped"
    assert (cfg.base.device, cfg.base.dtype) == ("cuda", "bf16")
    assert cfg.sft.lr == pytest.approx(2e-5) and cfg.pretrain.steps == load_config(ROOT / "params.yaml").pretrain.steps  # untouched sections keep params.yaml's


@pytest.mark.parametrize("raw, key, words", [
    ({"sft": {"lr": -1e-4}}, "sft.lr", "> 0"),
    ({"reward": {"lr": 0}}, "reward.lr", "> 0"),
    ({"sft": {"batch_size": 30, "micro_batch_size": 16}}, "sft.batch_size", "does not divide"),
    ({"data": {"k": 1}}, "data.k", "K >= 2"),
    ({"sft": {"lerning_rate": 1e-4}}, "sft.lerning_rate", "unknown key"),
    ({"bogus_section": {}}, "bogus_section", "unknown key"),
    ({"pretrain": {"steps": 1.5}}, "pretrain.steps", "integer"),
    ({"pretrain": {"steps": True}}, "pretrain.steps", "integer"),
    ({"sft": {"packing": "yes"}}, "sft.packing", "true/false"),
    ({"sft": {"lr": "fast"}}, "sft.lr", "number"),
    ({"base": {"dtype": "fp16"}}, "base.dtype", "one of"),
    ({"reward": {"columns": {"chosen": 3}}}, "reward.columns.chosen", "string"),
    ({"pretrain": {"n_embd": 250, "n_head": 4}}, "pretrain.n_head", "divide"),
    ({"sft": 5}, "sft", "mapping"),
])
def test_bad_values_are_rejected_with_dotted_key(raw, key, words):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert err.value.key == key
    assert words in str(err.value) and str(err.value).startswith(key)


def test_profile_merge_and_overrides(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("sft:\n  epochs: 3\n")
    cfg = load_config(ROOT / "params.yaml", profile=profile, overrides=["sft.lr=1e-4", "base.model=gpt2"])
    assert (cfg.sft.epochs, cfg.sft.lr, cfg.base.model) == (3, 1e-4, "gpt2")
    assert cfg.sft.batch_size == load_config(ROOT / "params.yaml").sft.batch_size
    with pytest.raises(ConfigError, match="sft.nope"):
        load_config(ROOT / "params.yaml", overrides=["sft.nope=1"])


def test_data_path_resolution(tmp_path):
    cfg = from_dict({"base": {"data_dir": str(tmp_path)}})
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.jsonl").write_text("")
    assert cfg.data_path("sft/train.jsonl") == str(tmp_path / "sft" / "train.jsonl")
    assert cfg.data_path("/abs/file.jsonl") == "/abs/file.jsonl"
    assert cfg.data_path("../shared/x.jsonl") == "../shared/x.jsonl"
    assert cfg.data_path("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"  # a hub name when no such local file exists


def test_cli_reports_config_errors_with_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "rlhf_core", "check-config", "--set", "reward.batch_size=-3"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "reward.batch_size" in proc.stderr


def test_importing_the_library_pulls_in_neither_prefect_nor_dvc():
    code = ("import sys, rlhf_core, rlhf_core.config, rlhf_core.loaders, rlhf_core.labeler, rlhf_core.demo_data, "
            "rlhf_core.sft, rlhf_core.reward, rlhf_core.pretrain, rlhf_core.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dvc', 'mlflow')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
