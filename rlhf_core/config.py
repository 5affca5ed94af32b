"""Typed, strict configuration: `params.yaml` loads into frozen dataclasses, one per section.

    cfg = load_config("params.yaml")                      # the tiny CPU default
    cfg = load_config("params.yaml", profile="profiles/gpu-pythia-410m.yaml", overrides=["ppo.lr=1e-6"])

A profile is a partial params file deep-merged over the base file; overrides are dotted `key=value` pairs (YAML values).
Unknown keys, wrong types and impossible values are rejected with the dotted key name, before any work starts.
This module imports only the standard library and PyYAML, so DVC, Prefect and notebooks can load configs cheaply.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted name of the offending key."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


@dataclass(frozen=True)
class BaseConfig:
    seed: int = 0
    """global seed: data generation, initialisation, sampling and shuffling all derive from it"""
    model: str | None = None
    """pretrained causal LM (hub name or local dir); null = pretrain the tiny default model on the demo corpus"""
    tokenizer: str | None = None
    """tokenizer to load (hub name or dir); null = the model's own, or a BPE trained on the demo corpus"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """where to train: auto picks cuda when available, else cpu"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype: bf16 autocast with fp32 master weights, or plain fp32; auto = bf16 where the device supports it"""
    data_dir: str = "data"
    """where the demo generator writes and relative data paths resolve"""
    out_dir: str = "outputs"
    """where stage outputs (models, metrics, reports) go, one sub-directory per stage"""
    num_threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default"""

    def __post_init__(self):
        _require(self.num_threads >= 0, "num_threads", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    pretrain_docs: int = 20000
    """documents in the generated pretraining corpus"""
    sft_train: int = 4000
    """generated SFT demonstrations (train split)"""
    sft_test: int = 400
    """generated SFT demonstrations (held-out split)"""
    rankings_train: int = 2000
    """generated prompts with K ranked responses (train)"""
    rankings_test: int = 300
    """generated prompts with K ranked responses (held-out)"""
    pairs_train: int = 2000
    """generated pairwise comparisons (train)"""
    pairs_test: int = 300
    """generated pairwise comparisons (held-out)"""
    rl_prompts: int = 2000
    """generated prompts for PPO rollouts"""
    eval_prompts: int = 300
    """generated held-out prompts for evaluation"""
    k: int = 4
    """responses ranked per prompt in the generated rankings (K >= 2; InstructGPT used 4 to 9)"""
    labeler_temperature: float | None = None
    """Bradley-Terry noise temperature of the simulated labeler; null = the labeler's default"""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int):
                _require(v >= 1, f.name, "must be >= 1")
        _require(self.k >= 2, "k", f"a ranking needs K >= 2 responses, got {self.k}")
        t = self.labeler_temperature
        _require(t is None or t > 0, "labeler_temperature", "must be > 0")


@dataclass(frozen=True)
class PretrainConfig:
    vocab_size: int = 1024
    """BPE vocabulary size of the demo tokenizer (special tokens included)"""
    n_layer: int = 4
    """transformer blocks of the tiny GPT-2 model"""
    n_embd: int = 128
    """model width"""
    n_head: int = 4
    """attention heads (must divide n_embd)"""
    n_positions: int = 256
    """context length of the model"""
    seq_len: int = 128
    """tokens per training sequence (packed corpus)"""
    batch_size: int = 32
    """sequences per optimizer step"""
    steps: int = 400
    """optimizer steps"""
    lr: float = 2e-3
    """peak learning rate (AdamW)"""
    warmup_steps: int = 30
    """linear warmup steps before cosine decay to 0"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "seq_len", "batch_size", "steps"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes + special tokens + merges)")
        _require(self.n_embd % self.n_head == 0, "n_head", f"must divide n_embd={self.n_embd}")
        _require(self.seq_len <= self.n_positions, "seq_len", f"must be <= n_positions={self.n_positions}")
        _check_optim(self)


@dataclass(frozen=True)
class SFTConfig:
    train_data: str = "sft/train.jsonl"
    """demonstrations: a local file/dir (relative to base.data_dir unless absolute or ./-prefixed) or a hub dataset name"""
    eval_data: str | None = "sft/test.jsonl"
    """held-out demonstrations; null = hold out eval_fraction of train_data"""
    eval_fraction: float = 0.05
    """share of train_data held out when eval_data is null"""
    format: Literal["auto", "prompt_completion", "messages"] = "auto"
    """row format of the data files"""
    columns: dict[str, str] = field(default_factory=dict)
    """map the project's column names (prompt, completion, messages) to the file's"""
    on_error: Literal["raise", "skip"] = "raise"
    """bad rows: stop with an error naming file/row/field, or skip them and write a report"""
    epochs: int = 2
    """passes over the demonstrations"""
    batch_size: int = 32
    """examples per optimizer step (micro_batch_size x gradient accumulation)"""
    micro_batch_size: int = 8
    """examples per forward pass, the batch's examples sorted by length first (so each micro batch pads little; the
    gradient is the batch's either way); must divide batch_size"""
    lr: float = 5e-4
    """peak learning rate (AdamW)"""
    warmup_ratio: float = 0.05
    """fraction of steps with linear warmup, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    max_length: int = 128
    """prompt + completion tokens; longer examples lose the start of the prompt"""
    packing: bool = False
    """concatenate examples into full max_length rows (no padding); the loss stays on completion tokens"""
    max_steps: int = 0
    """stop after this many optimizer steps (0 = run all epochs); the LR schedule spans the steps that run"""
    eval_every: int = 50
    """optimizer steps between held-out evaluations"""
    checkpoint_every: int = 100
    """optimizer steps between resumable checkpoints"""

    def __post_init__(self):
        _check_batches(self)
        _check_optim(self)
        _require(0 < self.eval_fraction < 1, "eval_fraction", "must be in (0, 1)")
        _require(self.max_length >= 8, "max_length", "must be >= 8")
        _require(self.eval_every >= 1 and self.checkpoint_every >= 1, "eval_every", "intervals must be >= 1")


@dataclass(frozen=True)
class RewardConfig:
    train_data: str = "prefs/rankings_train.jsonl"
    """comparisons: pairs or K-wise rankings (local path or hub name)"""
    eval_data: str | None = "prefs/rankings_test.jsonl"
    """held-out comparisons; null = hold out eval_fraction of train_data"""
    eval_fraction: float = 0.1
    """share of train_data held out when eval_data is null"""
    format: Literal["auto", "preference", "hh", "ranking"] = "auto"
    """row format of the data files"""
    columns: dict[str, str] = field(default_factory=dict)
    """map the project's column names (prompt, chosen, rejected, responses, ranks) to the file's"""
    on_error: Literal["raise", "skip"] = "raise"
    """bad rows: stop with an error naming file/row/field, or skip them and write a report"""
    ranking_mode: Literal["grouped", "pairs"] = "grouped"
    """grouped: InstructGPT's way, all C(K,2) pairs of a prompt in one batch, one forward per response, weight
    1/C(K,2); pairs: every comparison as an independent example (the baseline)"""
    init_from: str = "sft"
    """the reward model's trunk: "sft" (InstructGPT), "base", or a model dir / hub name"""
    epochs: int = 1
    """passes over the comparisons (1 avoids overfitting: InstructGPT, N+)"""
    batch_size: int = 32
    """comparisons (prompts in grouped mode) per optimizer step"""
    micro_batch_size: int = 16
    """comparisons per backward pass; must divide batch_size"""
    rows_per_forward: int = 8
    """responses per forward pass: a micro batch's responses run in length-sorted chunks of this many, each padded
    only to its own longest (same rewards and gradient as one forward, less compute on padding; 0 = one forward)"""
    lr: float = 2e-4
    """peak learning rate (AdamW)"""
    warmup_ratio: float = 0.05
    """fraction of steps with linear warmup, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    max_length: int = 128
    """prompt + response tokens"""
    margin: float = 0.0
    """subtract this margin inside the Bradley-Terry sigmoid (0 = plain BT)"""
    center_rewards_coef: float = 0.0
    """weight of the (r_w + r_l)^2 term that keeps rewards centred (0 = off; ~0.01 in TRL)"""
    normalize_samples: int = 256
    """SFT completions generated after training to set the bias so SFT outputs score mean 0 (0 = skip)"""
    max_steps: int = 0
    """stop after this many optimizer steps (0 = run all epochs; the LR schedule spans the steps that run)"""
    eval_every: int = 50
    """optimizer steps between held-out evaluations"""
    gold_eval: bool = True
    """also measure held-out accuracy against the simulated labeler's gold ordering (meaningful on the demo data,
    which that labeler labelled; turn off for real human data)"""

    def __post_init__(self):
        _check_batches(self)
        _check_optim(self)
        _require(0 < self.eval_fraction < 1, "eval_fraction", "must be in (0, 1)")
        _require(self.margin >= 0, "margin", "must be >= 0")
        _require(self.center_rewards_coef >= 0, "center_rewards_coef", "must be >= 0")
        _require(self.normalize_samples >= 0, "normalize_samples", "must be >= 0")
        _require(self.rows_per_forward >= 0, "rows_per_forward", "must be >= 0")
        _require(self.max_length >= 8, "max_length", "must be >= 8")


@dataclass(frozen=True)
class PPOConfig:
    prompts: str = "rl/prompts.jsonl"
    """prompts to roll out on (local path under base.data_dir, or a hub dataset name)"""
    sample_prompts: str = "eval/prompts.jsonl"
    """held-out prompts for the table of sample completions written every sample_every updates"""
    columns: dict[str, str] = field(default_factory=dict)
    """map the project's column names (prompt, messages) to the file's"""
    updates: int = 60
    """PPO iterations: each samples rollout_batch_size responses, then runs ppo_epochs over them"""
    rollout_batch_size: int = 64
    """prompts (= responses) per rollout batch"""
    mini_batch_size: int = 16
    """responses per PPO optimizer step; must divide rollout_batch_size"""
    micro_batch_size: int = 16
    """responses per forward/backward (gradient accumulation); must divide mini_batch_size"""
    ppo_epochs: int = 4
    """passes over each rollout batch, minibatches reshuffled each pass"""
    max_prompt_tokens: int = 48
    """prompts keep their last this-many tokens"""
    response_length: int = 32
    """new tokens sampled per response at most"""
    stop_at_eos: bool = True
    """end each response at its first EOS; false samples exactly response_length tokens (TRL's stop_token=None)"""
    temperature: float = 0.7
    """sampling temperature; log-probs are recomputed with the same temperature (N+ detail 3)"""
    lr: float = 1e-4
    """peak learning rate of policy and value model (AdamW, eps 1e-5)"""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """linear: annealed to 0 over the run (N+ detail 12); constant: no decay, so the policy keeps moving to the end
    (over-optimization sweeps: snapshots spread along KL instead of piling up where the LR reaches 0)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the SFT policy (initial value when adaptive_kl is on)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward: k1 = log pi - log pi_ref, k3 = (r - 1) - log r"""
    adaptive_kl: bool = False
    """adapt beta towards kl_target (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """target KL (nats per response) of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive controller"""
    gamma: float = 1.0
    """discount factor of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    cliprange: float = 0.2
    """PPO clip range of the policy ratio"""
    cliprange_value: float = 0.2
    """clip range of the value prediction around its old value"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_rewards: bool = False
    """whiten the per-token rewards of each batch before GAE (off by default: N+ detail 10)"""
    reward_clip: float = 0.0
    """clip reward-model scores to [-reward_clip, reward_clip] (0 = off)"""
    missing_eos: Literal["replace", "subtract", "none"] = "replace"
    """a response with no EOS: its score is replaced by -missing_eos_penalty (N+), or the penalty is subtracted (TRL)"""
    missing_eos_penalty: float = 1.0
    """size of the no-EOS penalty"""
    value_model: Literal["separate", "shared"] = "separate"
    """separate: a value model initialised from the reward model (N+); shared: a value head on the policy trunk"""
    ptx_coef: float = 0.0
    """gamma of PPO-ptx: weight of the language-model loss on ptx_data mixed into every policy step (0 = plain PPO)"""
    ptx_data: str = "sft/train.jsonl"
    """demonstrations (prompt/completion or messages) or a {"text"} corpus for the PPO-ptx term"""
    ptx_batch_size: int = 16
    """examples per PPO-ptx batch"""
    sample_every: int = 10
    """updates between tables of sample completions on sample_prompts"""
    n_samples: int = 8
    """completions in each sample table"""
    checkpoint_every: int = 1
    """updates between resumable checkpoints"""
    snapshot_every: int = 0
    """updates between saved policy snapshots for over-optimization curves (0 = none)"""

    def __post_init__(self):
        _check_optim(self)
        for name in ("updates", "rollout_batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                     "max_prompt_tokens", "response_length", "ptx_batch_size", "sample_every", "n_samples",
                     "checkpoint_every", "kl_horizon"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.rollout_batch_size % self.mini_batch_size == 0, "rollout_batch_size",
                 f"{self.rollout_batch_size} does not divide into minibatches of {self.mini_batch_size}")
        _require(self.mini_batch_size % self.micro_batch_size == 0, "mini_batch_size",
                 f"{self.mini_batch_size} does not divide into micro batches of {self.micro_batch_size}")
        _require(self.temperature > 0, "temperature", "must be > 0")
        _require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        _require(self.kl_target > 0, "kl_target", "must be > 0")
        _require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        _require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        _require(self.cliprange > 0 and self.cliprange_value > 0, "cliprange", "clip ranges must be > 0")
        _require(self.vf_coef >= 0 and self.ptx_coef >= 0, "vf_coef", "loss weights must be >= 0")
        _require(self.reward_clip >= 0 and self.missing_eos_penalty >= 0, "reward_clip", "must be >= 0")
        _require(self.snapshot_every >= 0, "snapshot_every", "must be >= 0")

    @property
    def n_minibatches(self) -> int:
        return self.rollout_batch_size // self.mini_batch_size


@dataclass(frozen=True)
class EvalConfig:
    prompts: str = "eval/prompts.jsonl"
    """held-out prompts to evaluate on (local path under base.data_dir, or a hub dataset name)"""
    columns: dict[str, str] = field(default_factory=dict)
    """map the project's column names (prompt, messages) to the file's"""
    n_prompts: int = 300
    """evaluate on at most this many prompts (the first ones of the file)"""
    batch_size: int = 64
    """prompts per generation / scoring batch"""
    bon_n: int = 16
    """largest n of the best-of-n curve: bon_n samples per prompt from SFT, n = 1..bon_n (0 = no best-of-n)"""
    bon_prompts: int = 100
    """prompts of the best-of-n curve (the first ones of the evaluation prompts)"""
    alarm_window: int = 3
    """reward-hacking alarm: evaluations (snapshots) over which the proxy must rise while the gold falls"""
    alarm_tolerance: float = 0.02
    """reward-hacking alarm: how far (gold units) the gold must fall below its running maximum"""
    alarm_z: float = 2.0
    """reward-hacking alarm: the fall must also exceed this many standard errors of the gold difference (0 = off)"""
    n_side_by_side: int = 10
    """prompts in the report's side-by-side table of SFT and policy completions"""

    def __post_init__(self):
        for name in ("n_prompts", "batch_size", "bon_prompts"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.bon_n >= 0, "bon_n", "must be >= 0")
        _require(self.n_side_by_side >= 0, "n_side_by_side", "must be >= 0")
        _require(self.alarm_window >= 2, "alarm_window", "a slope needs >= 2 evaluations")
        _require(self.alarm_tolerance >= 0 and self.alarm_z >= 0, "alarm_tolerance", "alarm thresholds must be >= 0")


def _check_optim(c) -> None:
    if hasattr(c, "max_steps"):
        _require(c.max_steps >= 0, "max_steps", "must be >= 0")
    _require(c.lr > 0, "lr", f"must be > 0, got {c.lr}")
    _require(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    _require(c.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    if hasattr(c, "warmup_ratio"):
        _require(0 <= c.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    if hasattr(c, "epochs"):
        _require(c.epochs >= 1, "epochs", "must be >= 1")


def _check_batches(c) -> None:
    _require(c.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    _require(c.batch_size >= 1, "batch_size", "must be >= 1")
    _require(c.batch_size % c.micro_batch_size == 0, "batch_size",
             f"{c.batch_size} does not divide into micro batches of {c.micro_batch_size}")


@dataclass(frozen=True)
class Config:
    base: BaseConfig = BaseConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvalConfig = EvalConfig()

    def data_path(self, spec: str) -> str:
        """Resolve a data spec: absolute paths and ./ or ../ paths stay, other existing-looking paths go under data_dir;
        anything that is not a local path is returned as is (a hub dataset name)."""
        p = Path(spec).expanduser()
        if p.is_absolute() or spec.startswith(("./", "../")):
            return str(p)
        under = Path(self.base.data_dir) / p
        if under.exists() or not _looks_like_hub_name(spec):
            return str(under)
        return spec

    def stage_dir(self, stage: str) -> Path:
        return Path(self.base.out_dir) / stage


def _looks_like_hub_name(spec: str) -> bool:
    return spec.count("/") == 1 and "." not in spec.split("/")[-1]


# ----------------------------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path = "params.yaml", *, profile: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read params.yaml (plus an optional profile overlay and dotted overrides) into a validated Config."""
    raw = _read_yaml(path)
    if profile is not None:
        raw = _deep_merge(raw, _read_yaml(profile))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(item, "override must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    return _build(Config, raw, prefix="")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _read_yaml(path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level must be a mapping of sections")
    return data


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"{p} is not a section")
    node[last] = value


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e.key}", e.reason) from None


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        kt, vt = args
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
        return {_coerce(kt, k, f"{key}.{k}"): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported config type {tp}")  # a bug in this module, not in the user's file


def dump_params(cfg: Config) -> str:
    """The full resolved config as YAML (logged beside every run)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

