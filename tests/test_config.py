"""params.yaml loads into frozen dataclasses; bad keys, types and values are rejected with their dotted names."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.config import Config, ConfigError, config_schema, dump_params, from_dict, load_config

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
    ({"sft": {"lr": -1e-4}}, "sft.lr", "greater than 0, got -0.0001"),
    ({"reward": {"lr": 0}}, "reward.lr", "greater than 0"),
    ({"sft": {"batch_size": 30, "micro_batch_size": 16}}, "sft.batch_size", "does not divide"),
    ({"data": {"k": 1}}, "data.k", "greater than or equal to 2"),
    ({"sft": {"lerning_rate": 1e-4}}, "sft.lerning_rate", "unknown key"),
    ({"bogus_section": {}}, "bogus_section", "unknown key"),
    ({"pretrain": {"steps": 1.5}}, "pretrain.steps", "integer"),
    ({"pretrain": {"steps": True}}, "pretrain.steps", "integer"),
    ({"sft": {"packing": "yes"}}, "sft.packing", "boolean"),
    ({"sft": {"packing": 1}}, "sft.packing", "boolean"),
    ({"sft": {"lr": "fast"}}, "sft.lr", "number"),
    ({"sft": {"lr": True}}, "sft.lr", "number"),
    ({"sft": {"train_data": 3}}, "sft.train_data", "string"),
    ({"base": {"dtype": "fp16"}}, "base.dtype", "'bf16' or 'fp32', got 'fp16'"),
    ({"reward": {"columns": {"chosen": 3}}}, "reward.columns.chosen", "string"),
    ({"pretrain": {"n_embd": 250, "n_head": 4}}, "pretrain.n_head", "divide"),
    ({"sft": 5}, "sft", "dictionary"),
])
def test_bad_values_are_rejected_with_dotted_key(raw, key, words):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert err.value.key == key
    assert words in str(err.value) and str(err.value).startswith(key)


# One bad value per validation rule, as a `--set` override; the ConfigError must name the key that was set.
RULES = [
    "base.num_threads=-1",
    *(f"data.{k}=0" for k in ("pretrain_docs", "sft_train", "sft_test", "rankings_train", "rankings_test", "pairs_train",
                              "pairs_test", "rl_prompts", "eval_prompts")),
    "data.k=1", "data.labeler_temperature=0",
    "pretrain.vocab_size=299", "pretrain.n_layer=0", "pretrain.n_embd=0", "pretrain.n_head=0", "pretrain.n_head=3",
    "pretrain.n_positions=0", "pretrain.seq_len=0", "pretrain.seq_len=512", "pretrain.batch_size=0", "pretrain.steps=0",
    "pretrain.lr=0", "pretrain.warmup_steps=-1", "pretrain.weight_decay=-0.1", "pretrain.max_grad_norm=0",
    "pretrain.checkpoint_every=0",
    "sft.eval_fraction=0", "sft.eval_fraction=1", "sft.epochs=0", "sft.batch_size=0", "sft.batch_size=30",
    "sft.micro_batch_size=0", "sft.lr=-1e-4", "sft.warmup_ratio=-0.1", "sft.warmup_ratio=1", "sft.weight_decay=-1",
    "sft.max_grad_norm=0", "sft.max_length=7", "sft.max_steps=-1", "sft.eval_every=0", "sft.checkpoint_every=0",
    "reward.eval_fraction=1", "reward.epochs=0", "reward.batch_size=0", "reward.batch_size=24", "reward.micro_batch_size=0",
    "reward.rows_per_forward=-1", "reward.lr=0", "reward.warmup_ratio=1", "reward.weight_decay=-1",
    "reward.max_grad_norm=0", "reward.max_length=7", "reward.margin=-0.1", "reward.center_rewards_coef=-0.1",
    "reward.normalize_samples=-1", "reward.max_steps=-1", "reward.eval_every=0", "reward.checkpoint_every=0",
    "ppo.updates=0", "ppo.rollout_batch_size=0", "ppo.rollout_batch_size=60", "ppo.mini_batch_size=0",
    "ppo.mini_batch_size=8", "ppo.micro_batch_size=0", "ppo.ppo_epochs=0", "ppo.max_prompt_tokens=0",
    "ppo.response_length=0", "ppo.temperature=0", "ppo.lr=0", "ppo.weight_decay=-1", "ppo.max_grad_norm=0",
    "ppo.kl_coef=-0.1", "ppo.kl_target=0", "ppo.kl_horizon=0", "ppo.gamma=-0.1", "ppo.gamma=1.1", "ppo.lam=-0.1",
    "ppo.lam=1.1", "ppo.cliprange=0", "ppo.cliprange_value=0", "ppo.vf_coef=-0.1", "ppo.reward_clip=-1",
    "ppo.missing_eos_penalty=-1", "ppo.ptx_coef=-0.1", "ppo.ptx_batch_size=0", "ppo.sample_every=0", "ppo.n_samples=0",
    "ppo.checkpoint_every=0", "ppo.snapshot_every=-1", "ppo.watch_prompts=1",
    "evaluate.n_prompts=0", "evaluate.batch_size=0", "evaluate.bon_n=-1", "evaluate.bon_prompts=0",
    "evaluate.alarm_window=1", "evaluate.alarm_tolerance=-0.1", "evaluate.alarm_z=-1", "evaluate.n_side_by_side=-1",
    "evaluate.snapshot_prompts=0", "evaluate.gate_margin=-0.1", "evaluate.gate_z=-1",
    "label.n_prompts=0", "label.k=1", "label.batch_size=0", "label.rounds=0",
]
# a divisibility rule names the batch left undivided: micro_batch_size=12 leaves mini_batch_size=16 undivided
CROSS_RULES = [("ppo.micro_batch_size=12", "ppo.mini_batch_size")]


@pytest.mark.parametrize("override, key", [(o, o.partition("=")[0]) for o in RULES] + CROSS_RULES, ids=str)
def test_every_rule_names_the_key_at_fault(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", overrides=[override])
    assert err.value.key == key, str(err.value)
    assert str(err.value).startswith(key + ": ") and err.value.reason


def test_stop_on_alarm_needs_snapshots_to_watch():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", overrides=["ppo.stop_on_alarm=true", "ppo.snapshot_every=0"])
    assert err.value.key == "ppo.stop_on_alarm" and "snapshot_every" in err.value.reason


def _schema_keys(pred):
    """Dotted keys whose JSON-schema property (or one branch of an optional) satisfies `pred`."""
    schema = config_schema()
    out = set()
    for section, ref in schema["properties"].items():
        props = schema["$defs"][ref["$ref"].split("/")[-1]]["properties"]
        out |= {f"{section}.{k}" for k, p in props.items() if any(pred(b) for b in p.get("anyOf", [p]))}
    return out


def test_the_rule_table_covers_every_bounded_key():
    bounded = _schema_keys(lambda p: {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(p))
    assert len(bounded) > 80
    assert bounded <= {o.partition("=")[0] for o in RULES}, "add a case to RULES for each new bounded key"


@pytest.mark.parametrize("key", sorted(_schema_keys(lambda p: p.get("type") == "number")))
def test_non_finite_numbers_are_rejected_naming_the_key(key):
    section, name = key.split(".")
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ConfigError) as err:
            from_dict({section: {name: value}})
        assert err.value.key == key and "finite" in err.value.reason
    for spelling in (".inf", "-.inf", ".nan", "inf", "nan"):  # YAML's spellings and strings float() reads
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "params.yaml", overrides=[f"{key}={spelling}"])
        assert err.value.key == key


def test_params_yaml_restates_the_dataclass_defaults():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg, defaults = load_config(ROOT / "params.yaml"), Config()
    differ = [f"{s}.{k}: params.yaml {getattr(getattr(cfg, s), k)!r}, default {getattr(getattr(defaults, s), k)!r}"
              for s, keys in raw.items() for k in keys if getattr(getattr(cfg, s), k) != getattr(getattr(defaults, s), k)]
    assert differ == []
    assert sum(len(keys) for keys in raw.values()) > 100  # the check above saw the whole file


def test_every_key_is_documented_in_the_schema():
    defs = config_schema()["$defs"]
    props = {f"{name}.{k}": p for name, d in defs.items() for k, p in d["properties"].items()}
    assert len(props) > 120
    assert [k for k, p in props.items() if len(p.get("description", "")) < 10] == []  # the field docstrings


def test_json_schema_accepts_params_yaml_and_catches_bad_values():
    jsonschema = pytest.importorskip("jsonschema")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    jsonschema.validate(raw, config_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**raw, "ppo": {**raw["ppo"], "cliprange": 0}}, config_schema())


@pytest.mark.parametrize("profile", [None, ROOT / "profiles" / "gpu-pythia-410m.yaml"], ids=["default", "gpu"])
def test_dump_params_is_yaml_that_reloads_to_the_same_config(profile):
    cfg = load_config(ROOT / "params.yaml", profile=profile, overrides=["ppo.lr=1e-6", "reward.columns={chosen: c}"])
    text = dump_params(cfg)
    assert from_dict(yaml.safe_load(text)) == cfg
    assert "lr: 1.0e-06" in text  # PyYAML writes floats YAML 1.1 reads back as floats


def test_replace_keeps_the_dataclass_api_and_revalidates():
    cfg = load_config(ROOT / "params.yaml")
    tuned = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_coef=0.1, mini_batch_size=32))
    assert (tuned.ppo.kl_coef, tuned.ppo.n_minibatches, tuned.sft) == (0.1, 2, cfg.sft)
    assert [f.name for f in dataclasses.fields(tuned)][:2] == ["base", "data"] and dataclasses.asdict(tuned)["ppo"]["kl_coef"] == 0.1
    with pytest.raises(ValueError, match="cliprange"):
        dataclasses.replace(cfg.ppo, cliprange=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuned.ppo.kl_coef = 0.2


def test_an_empty_section_means_its_defaults():
    assert from_dict({"sft": None, "ppo": {}}) == Config()


def test_profile_merge_and_overrides(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("sft:\n  epochs: 3\n")
    cfg = load_config(ROOT / "params.yaml", profile=profile, overrides=["sft.lr=1e-4", "base.model=gpt2"])
    assert (cfg.sft.epochs, cfg.sft.lr, cfg.base.model) == (3, 1e-4, "gpt2")
    assert cfg.sft.batch_size == load_config(ROOT / "params.yaml").sft.batch_size
    with pytest.raises(ConfigError, match=r"sft\.nope"):
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
