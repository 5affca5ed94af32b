"""Typed, strict configuration: `params.yaml` loads into frozen dataclasses, one per section.

    cfg = load_config("params.yaml")                      # the tiny CPU default
    cfg = load_config("params.yaml", profile="profiles/gpu-pythia-410m.yaml", overrides=["ppo.lr=1e-6"])

A profile is a partial params file deep-merged over the base file; overrides are dotted `key=value` pairs (YAML values).
The dataclass defaults below are the tuned values; params.yaml restates them. Validation is pydantic's: each field
declares its type and bounds, so unknown keys, wrong types, non-finite numbers and impossible values are rejected as a
`ConfigError` naming the dotted key, before any work starts. `config_schema()` gives the JSON schema (docs included).
This module imports only PyYAML and pydantic (no torch), so DVC, Prefect and notebooks can load configs cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass


class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted name of the offending key."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


def _require(ok: bool, key: str, reason: str) -> None:
    """A cross-field rule; `key` is relative to its section (from_dict prefixes the section)."""
    if not ok:
        raise ConfigError(key, reason)


def _divides(c, whole: str, part: str) -> None:
    w, p = getattr(c, whole), getattr(c, part)
    _require(w % p == 0, whole, f"{w} does not divide into groups of {part}={p}")


def _yaml_float(v):
    # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() accepts and let pydantic reject the rest
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def _number(**bounds):
    # The bounds sit before the string conversion: after it, pydantic writes them into the JSON schema as "gt", not
    # "exclusiveMinimum". Strict keeps bools out (lax float reads True as 1.0); ints are still welcome.
    return Annotated[float, Strict(), Field(**bounds), BeforeValidator(_yaml_float)]


# Strict per type, not per class: a class-wide strict=True also refuses a plain dict for a nested section.
Int = Annotated[int, Strict()]  # no bools, no 1.5
PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
PosFloat, NonNegFloat = _number(gt=0), _number(ge=0)
Share, Ratio, Unit = _number(gt=0, lt=1), _number(ge=0, lt=1), _number(ge=0, le=1)  # (0, 1), [0, 1), [0, 1]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]  # no "yes", no 1
Columns = dict[Str, Str]
# allow_inf_nan=False rejects inf and nan in every float field; attribute docstrings become the schema's descriptions
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)
_section = dataclass(frozen=True, config=_STRICT)


@_section
class BaseConfig:
    seed: Int = 0
    """global seed: data generation, initialisation, sampling and shuffling all derive from it"""
    model: Str | None = None
    """pretrained causal LM (hub name or local dir); null = pretrain the tiny default model on the demo corpus"""
    tokenizer: Str | None = None
    """tokenizer to load (hub name or dir); null = the model's own, or a BPE trained on the demo corpus"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """where to train: auto picks cuda when available, else cpu"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype: bf16 autocast with fp32 master weights, or plain fp32; auto = bf16 where the device supports it"""
    data_dir: Str = "data"
    """where the demo generator writes and relative data paths resolve"""
    out_dir: Str = "outputs"
    """where stage outputs (models, metrics, reports) go, one sub-directory per stage"""
    num_threads: NonNegInt = 0
    """torch intra-op threads on CPU; 0 = torch's default"""


@_section
class DataConfig:
    pretrain_docs: PosInt = 20000
    """documents in the generated pretraining corpus"""
    sft_train: PosInt = 4000
    """generated SFT demonstrations (train split)"""
    sft_test: PosInt = 400
    """generated SFT demonstrations (held-out split)"""
    rankings_train: PosInt = 2000
    """generated prompts with K ranked responses (train)"""
    rankings_test: PosInt = 300
    """generated prompts with K ranked responses (held-out)"""
    pairs_train: PosInt = 2000
    """generated pairwise comparisons (train)"""
    pairs_test: PosInt = 300
    """generated pairwise comparisons (held-out)"""
    rl_prompts: PosInt = 2000
    """generated prompts for PPO rollouts"""
    eval_prompts: PosInt = 300
    """generated held-out prompts for evaluation"""
    k: Annotated[Int, Field(ge=2)] = 4
    """responses ranked per prompt in the generated rankings (K >= 2; InstructGPT used 4 to 9)"""
    labeler_temperature: PosFloat | None = None
    """Bradley-Terry noise temperature of the simulated labeler; null = the labeler's default"""


@_section
class PretrainConfig:
    vocab_size: Annotated[Int, Field(ge=300)] = 1024
    """BPE vocabulary size of the demo tokenizer (special tokens included; >= 300 = 256 bytes + specials + merges)"""
    n_layer: PosInt = 4
    """transformer blocks of the tiny GPT-2 model"""
    n_embd: PosInt = 128
    """model width"""
    n_head: PosInt = 4
    """attention heads (must divide n_embd)"""
    n_positions: PosInt = 256
    """context length of the model"""
    seq_len: PosInt = 128
    """tokens per training sequence (packed corpus)"""
    batch_size: PosInt = 32
    """sequences per optimizer step"""
    steps: PosInt = 300
    """optimizer steps"""
    lr: PosFloat = 6e-3
    """peak learning rate (AdamW); measured held-out loss: 300 steps at 6e-3 -> 0.703, 400 at 2e-3 -> 0.718"""
    warmup_steps: NonNegInt = 30
    """linear warmup steps before cosine decay to 0"""
    weight_decay: NonNegFloat = 0.01
    """AdamW weight decay"""
    max_grad_norm: PosFloat = 1.0
    """gradient clipping norm"""
    checkpoint_every: PosInt = 200
    """optimizer steps between resumable checkpoints"""

    @model_validator(mode="after")
    def _shapes(self):
        _require(self.n_embd % self.n_head == 0, "n_head", f"must divide n_embd={self.n_embd}")
        _require(self.seq_len <= self.n_positions, "seq_len", f"must be <= n_positions={self.n_positions}")
        return self


@_section
class SFTConfig:
    train_data: Str = "sft/train.jsonl"
    """demonstrations: a local file/dir (relative to base.data_dir unless absolute or ./-prefixed) or a hub dataset name"""
    eval_data: Str | None = "sft/test.jsonl"
    """held-out demonstrations; null = hold out eval_fraction of train_data"""
    eval_fraction: Share = 0.05
    """share of train_data held out when eval_data is null"""
    format: Literal["auto", "prompt_completion", "messages"] = "auto"
    """row format of the data files"""
    columns: Columns = field(default_factory=dict)
    """map the project's column names (prompt, completion, messages) to the file's"""
    on_error: Literal["raise", "skip"] = "raise"
    """bad rows: stop with an error naming file/row/field, or skip them and write a report"""
    epochs: PosInt = 2
    """passes over the demonstrations"""
    batch_size: PosInt = 32
    """examples per optimizer step (micro_batch_size x gradient accumulation)"""
    micro_batch_size: PosInt = 8
    """examples per forward pass, the batch's examples sorted by length first (so each micro batch pads little; the
    gradient is the batch's either way); must divide batch_size"""
    lr: PosFloat = 5e-4
    """peak learning rate (AdamW)"""
    warmup_ratio: Ratio = 0.05
    """fraction of steps with linear warmup, then cosine decay to 0"""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay"""
    max_grad_norm: PosFloat = 1.0
    """gradient clipping norm"""
    max_length: Annotated[Int, Field(ge=8)] = 128
    """prompt + completion tokens; longer examples lose the start of the prompt"""
    packing: Bool = False
    """concatenate examples into full max_length rows (no padding); the loss stays on completion tokens"""
    max_steps: NonNegInt = 0
    """stop after this many optimizer steps (0 = run all epochs); the LR schedule spans the steps that run"""
    eval_every: PosInt = 50
    """optimizer steps between held-out evaluations"""
    checkpoint_every: PosInt = 100
    """optimizer steps between resumable checkpoints"""

    @model_validator(mode="after")
    def _batches(self):
        _divides(self, "batch_size", "micro_batch_size")
        return self


@_section
class RewardConfig:
    train_data: Str = "prefs/rankings_train.jsonl"
    """comparisons: pairs or K-wise rankings (local path or hub name)"""
    eval_data: Str | None = "prefs/rankings_test.jsonl"
    """held-out comparisons; null = hold out eval_fraction of train_data"""
    eval_fraction: Share = 0.1
    """share of train_data held out when eval_data is null"""
    format: Literal["auto", "preference", "hh", "ranking"] = "auto"
    """row format of the data files"""
    columns: Columns = field(default_factory=dict)
    """map the project's column names (prompt, chosen, rejected, responses, ranks) to the file's"""
    on_error: Literal["raise", "skip"] = "raise"
    """bad rows: stop with an error naming file/row/field, or skip them and write a report"""
    ranking_mode: Literal["grouped", "pairs"] = "grouped"
    """grouped: InstructGPT's way, all C(K,2) pairs of a prompt in one batch, one forward per response, weight
    1/C(K,2); pairs: every comparison as an independent example (the baseline)"""
    init_from: Str = "sft"
    """the reward model's trunk: "sft" (InstructGPT), "base", or a model dir / hub name"""
    epochs: PosInt = 2
    """passes over the comparisons (InstructGPT and N+ use 1 against overfitting; on the noisy demo labels 2 measured
    0.91 gold accuracy vs 0.895, and PPO against the 1-epoch reward model beat SFT only half the time)"""
    batch_size: PosInt = 16
    """comparisons (prompts in grouped mode) per optimizer step"""
    micro_batch_size: PosInt = 16
    """comparisons per backward pass; must divide batch_size"""
    rows_per_forward: NonNegInt = 8
    """responses per forward pass: a micro batch's responses run in length-sorted chunks of this many, each padded
    only to its own longest (same rewards and gradient as one forward, less compute on padding; 0 = one forward)"""
    lr: PosFloat = 5e-4
    """peak learning rate (AdamW)"""
    warmup_ratio: Ratio = 0.05
    """fraction of steps with linear warmup, then cosine decay to 0"""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay"""
    max_grad_norm: PosFloat = 1.0
    """gradient clipping norm"""
    max_length: Annotated[Int, Field(ge=8)] = 128
    """prompt + response tokens"""
    margin: NonNegFloat = 0.0
    """subtract this margin inside the Bradley-Terry sigmoid (0 = plain BT)"""
    center_rewards_coef: NonNegFloat = 0.0
    """weight of the (r_w + r_l)^2 term that keeps rewards centred (0 = off; ~0.01 in TRL)"""
    normalize_samples: NonNegInt = 256
    """SFT completions generated after training to set the bias so SFT outputs score mean 0 (0 = skip)"""
    max_steps: NonNegInt = 0
    """stop after this many optimizer steps (0 = run all epochs; the LR schedule spans the steps that run)"""
    eval_every: PosInt = 1000
    """optimizer steps between held-out evaluations"""
    checkpoint_every: PosInt = 100
    """optimizer steps between resumable checkpoints"""
    gold_eval: Bool = True
    """also measure held-out accuracy against the simulated labeler's gold ordering (meaningful on the demo data,
    which that labeler labelled; turn off for real human data)"""

    @model_validator(mode="after")
    def _batches(self):
        _divides(self, "batch_size", "micro_batch_size")
        return self


@_section
class PPOConfig:
    prompts: Str = "rl/prompts.jsonl"
    """prompts to roll out on (local path under base.data_dir, or a hub dataset name)"""
    sample_prompts: Str = "eval/prompts.jsonl"
    """held-out prompts for the table of sample completions written every sample_every updates"""
    columns: Columns = field(default_factory=dict)
    """map the project's column names (prompt, messages) to the file's"""
    updates: PosInt = 30
    """PPO iterations: each samples rollout_batch_size responses, then runs ppo_epochs over them"""
    rollout_batch_size: PosInt = 64
    """prompts (= responses) per rollout batch"""
    mini_batch_size: PosInt = 16
    """responses per PPO optimizer step; must divide rollout_batch_size"""
    micro_batch_size: PosInt = 16
    """responses per forward/backward (gradient accumulation); must divide mini_batch_size"""
    ppo_epochs: PosInt = 4
    """passes over each rollout batch, minibatches reshuffled each pass"""
    max_prompt_tokens: PosInt = 48
    """prompts keep their last this-many tokens"""
    response_length: PosInt = 32
    """new tokens sampled per response at most"""
    stop_at_eos: Bool = True
    """end each response at its first EOS; false samples exactly response_length tokens (TRL's stop_token=None)"""
    temperature: PosFloat = 0.7
    """sampling temperature; log-probs are recomputed with the same temperature (N+ detail 3)"""
    lr: PosFloat = 3e-5
    """peak learning rate of policy and value model (AdamW, eps 1e-5). On the demo, 1e-4 reached KL ~2 nats within
    5 of 30 updates and then sat there (the RL curve a vertical cloud, Gao fit R² ~0); 3e-5 reaches the same gold at
    less KL with the snapshots spread along √KL (fit R² 0.94)"""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """linear: annealed to 0 over the run (N+ detail 12); constant: no decay, so the policy keeps moving to the end
    (over-optimization sweeps: snapshots spread along KL instead of piling up where the LR reaches 0)"""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay"""
    max_grad_norm: PosFloat = 1.0
    """gradient clipping norm"""
    kl_coef: NonNegFloat = 0.05
    """beta: weight of the per-token KL penalty to the SFT policy (initial value when adaptive_kl is on)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward: k1 = log pi - log pi_ref, k3 = (r - 1) - log r"""
    adaptive_kl: Bool = False
    """adapt beta towards kl_target (Ziegler et al. 2019)"""
    kl_target: PosFloat = 6.0
    """target KL (nats per response) of the adaptive controller"""
    kl_horizon: PosInt = 10000
    """horizon (episodes) of the adaptive controller"""
    gamma: Unit = 1.0
    """discount factor of GAE"""
    lam: Unit = 0.95
    """lambda of GAE"""
    cliprange: PosFloat = 0.2
    """PPO clip range of the policy ratio"""
    cliprange_value: PosFloat = 0.2
    """clip range of the value prediction around its old value"""
    vf_coef: NonNegFloat = 0.1
    """weight of the value loss"""
    whiten_rewards: Bool = False
    """whiten the per-token rewards of each batch before GAE (off by default: N+ detail 10)"""
    reward_clip: NonNegFloat = 0.0
    """clip reward-model scores to [-reward_clip, reward_clip] (0 = off)"""
    missing_eos: Literal["replace", "subtract", "none"] = "replace"
    """a response with no EOS: its score is replaced by -missing_eos_penalty (N+), or the penalty is subtracted (TRL)"""
    missing_eos_penalty: NonNegFloat = 1.0
    """size of the no-EOS penalty"""
    value_model: Literal["separate", "shared"] = "separate"
    """separate: a value model initialised from the reward model (N+); shared: a value head on the policy trunk"""
    ptx_coef: NonNegFloat = 0.0
    """gamma of PPO-ptx: weight of the language-model loss on ptx_data mixed into every policy step (0 = plain PPO)"""
    ptx_data: Str = "sft/train.jsonl"
    """demonstrations (prompt/completion or messages) or a {"text"} corpus for the PPO-ptx term"""
    ptx_batch_size: PosInt = 16
    """examples per PPO-ptx batch"""
    sample_every: PosInt = 10
    """updates between tables of sample completions on sample_prompts"""
    n_samples: PosInt = 8
    """completions in each sample table"""
    checkpoint_every: PosInt = 1
    """updates between resumable checkpoints"""
    snapshot_every: NonNegInt = 5
    """updates between saved policy snapshots for over-optimization curves (0 = none); evaluate draws the RL curve
    (Gao et al. 2022) from them, so every run shows gold and proxy against sqrt(KL)"""
    stop_on_alarm: Bool = False
    """watch gold and proxy on `watch_prompts` held-out prompts at each snapshot; stop when the reward-hacking alarm
    (evaluate.alarm_*) fires, and output the snapshot with the highest gold instead of the last policy"""
    watch_prompts: Annotated[Int, Field(ge=2)] = 64
    """held-out prompts (the first of sample_prompts) the online watch samples at each snapshot (stop_on_alarm)"""

    @model_validator(mode="after")
    def _batches(self):
        _divides(self, "rollout_batch_size", "mini_batch_size")
        _divides(self, "mini_batch_size", "micro_batch_size")
        _require(self.snapshot_every > 0 or not self.stop_on_alarm, "stop_on_alarm", "watches the snapshots: it "
                 "needs snapshot_every > 0")
        return self

    @property
    def n_minibatches(self) -> int:
        return self.rollout_batch_size // self.mini_batch_size


@_section
class EvalConfig:
    prompts: Str = "eval/prompts.jsonl"
    """held-out prompts to evaluate on (local path under base.data_dir, or a hub dataset name)"""
    columns: Columns = field(default_factory=dict)
    """map the project's column names (prompt, messages) to the file's"""
    n_prompts: PosInt = 300
    """evaluate on at most this many prompts (the first ones of the file)"""
    batch_size: PosInt = 64
    """prompts per generation / scoring batch"""
    bon_n: NonNegInt = 16
    """largest n of the best-of-n curve: bon_n samples per prompt from SFT, n = 1..bon_n (0 = no best-of-n)"""
    bon_prompts: PosInt = 100
    """prompts of the best-of-n curve (the first ones of the evaluation prompts)"""
    alarm_window: Annotated[Int, Field(ge=2)] = 3
    """reward-hacking alarm: evaluations (snapshots) over which the proxy must rise while the gold falls"""
    alarm_tolerance: NonNegFloat = 0.02
    """reward-hacking alarm: how far (gold units) the gold must fall below its running maximum"""
    alarm_z: NonNegFloat = 2.0
    """reward-hacking alarm: the fall must also exceed this many standard errors of the gold difference (0 = off)"""
    snapshot_prompts: PosInt = 128
    """PPO snapshots are evaluated on the first this-many evaluation prompts (the RL curve; the policy gets all)"""
    gate_margin: NonNegFloat = 0.0
    """champion gate: a candidate whose paired gold deficit to the champion is within this margin (gold units) plus
    gate_z standard errors is promoted"""
    gate_z: NonNegFloat = 2.0
    """champion gate: standard errors of the paired gold difference allowed as noise"""
    n_side_by_side: NonNegInt = 10
    """prompts in the report's side-by-side table of SFT and policy completions"""


@_section
class LabelConfig:
    model: Str = "sft"
    """the model whose samples are labeled: "sft", "ppo" (those stages' models) or a model dir"""
    prompts: Str = "rl/prompts.jsonl"
    """prompts to sample responses to (local path under base.data_dir, or a hub dataset name)"""
    columns: Columns = field(default_factory=dict)
    """map the project's column names (prompt, messages) to the file's"""
    n_prompts: PosInt = 2000
    """label at most this many prompts (the first ones of the file)"""
    k: Annotated[Int, Field(ge=2)] = 4
    """responses sampled per prompt (ppo section's temperature, length and EOS rule); duplicates are dropped"""
    batch_size: PosInt = 256
    """responses per sampling batch"""
    labeler: Literal["simulated", "human"] = "simulated"
    """simulated: the demo's labeler ranks the samples (Plackett-Luce on the gold); human: people do (README)"""
    labels: Str | None = None
    """people's labels under base.data_dir: a Label Studio JSON export, the task CSV with ranks, or JSONL"""
    rounds: PosInt = 2
    """labeling rounds (label -> reward model on all rounds so far -> PPO -> label the new policy ...) of
    `python -m rlhf_core.rounds`, the DVC `rounds` stage and flows/labeling.py"""


@_section
class Config:
    base: BaseConfig = BaseConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvalConfig = EvalConfig()
    label: LabelConfig = LabelConfig()

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


_ADAPTER = TypeAdapter(Config)


def config_schema() -> dict:
    """The JSON schema of params.yaml (types, bounds, defaults and each key's docs), e.g. for editor completion."""
    return _ADAPTER.json_schema()


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
    """Validate a params mapping into a Config; the first problem found is raised as a ConfigError."""
    if isinstance(raw, dict):  # an empty YAML section (`sft:` with everything commented out) reads as null
        raw = {k: {} if v is None else v for k, v in raw.items()}
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise _config_error(e.errors()[0]) from None


def _config_error(err: dict) -> ConfigError:
    loc = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a cross-field rule, raised inside its section
        return ConfigError(".".join([*loc, cause.key]), cause.reason)
    key = ".".join(loc) or "<root>"
    if err["type"] == "unexpected_keyword_argument":
        node = Config()
        for name in loc[:-1]:
            node = getattr(node, name)
        known = ", ".join(sorted(f.name for f in dataclasses.fields(node)))
        return ConfigError(key, f"unknown key (known: {known})")
    return ConfigError(key, f"{err['msg']}, got {err['input']!r}")


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
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(key, f"{p} is not a section")
    node[last] = value


def dump_params(cfg: Config) -> str:
    """The full resolved config as YAML (logged beside every run)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
