"""Command line: run any pipeline stage by name from params.yaml.

    python -m rlhf_core data                 # generate the embedded demo data under base.data_dir
    python -m rlhf_core pretrain             # tiny base model (skipped when base.model names a pretrained one)
    python -m rlhf_core sft
    python -m rlhf_core reward
    python -m rlhf_core ppo
    python -m rlhf_core evaluate             # held-out metrics, over-optimization curves from PPO snapshots
    python -m rlhf_core all                  # every stage in order
    python -m rlhf_core label                # K samples per prompt from label.model, ranked (rlhf_core/label.py)
    python -m rlhf_core check-config --profile profiles/gpu-pythia-410m.yaml
    python -m rlhf_core sft --set sft.lr=1e-4 --set base.seed=1

DVC stages and Prefect tasks call `run_stage`, the same function this command calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlhf_core.config import Config, ConfigError, dump_params, load_config

STAGES = ("data", "pretrain", "sft", "reward", "ppo", "evaluate")
LABELING = ("label",)
"""stages outside the default chain: run on their own, or by the labeling-rounds flow (flows/labeling.py)"""


def run_stage(cfg: Config, stage: str, sink=None):
    """Run one stage with its inputs taken from the previous stages' standard output locations, holding the stage's
    output directory for itself (a second run on the same directory is refused, naming the holder)."""
    from rlhf_core.io import exclusive_lock
    from rlhf_core.training import null_sink

    if stage not in STAGES + LABELING:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES + LABELING)}")
    if stage == "data":
        return generate_demo_data(cfg)
    out = cfg.stage_dir(stage)
    with exclusive_lock(out / ".lock", f"the {stage} output directory {out}"):
        return _run(cfg, stage, out, sink or null_sink)


def _run(cfg: Config, stage: str, out: Path, sink):
    from rlhf_core.models import base_model_path

    sft_model, reward_model = str(cfg.stage_dir("sft") / "model"), str(cfg.stage_dir("reward") / "model")
    if stage == "pretrain":
        from rlhf_core.pretrain import pretrain
        return pretrain(cfg, out, sink)
    if stage == "sft":
        from rlhf_core.sft import train_sft
        return train_sft(cfg, base_model_path(cfg), out, sink)
    if stage == "reward":
        from rlhf_core.labeler import SimulatedLabeler
        from rlhf_core.reward import train_reward
        init = {"sft": sft_model, "base": base_model_path(cfg)}.get(cfg.reward.init_from, cfg.reward.init_from)
        gold = SimulatedLabeler() if cfg.reward.gold_eval else None
        return train_reward(cfg, init, sft_model, out, sink, gold=gold)
    if stage == "ppo":
        from rlhf_core.labeler import SimulatedLabeler
        from rlhf_core.ppo import train_ppo
        return train_ppo(cfg, sft_model, reward_model, out, sink, gold=SimulatedLabeler())
    if stage == "evaluate":
        from rlhf_core.evaluate import evaluate
        from rlhf_core.labeler import SimulatedLabeler
        ppo = cfg.stage_dir("ppo")
        return evaluate(cfg, sft_model, reward_model, {"policy": ppo / "model"}, out, sink, gold=SimulatedLabeler(),
                        snapshots=ppo / "snapshots")
    if stage == "label":
        from rlhf_core.label import label, model_path
        return label(cfg, model_path(cfg), out, sink)
    raise ValueError(f"{stage!r} has no runner")


def stage_inputs(cfg: Config, stage: str) -> dict:
    """The data a stage reads, as the stage itself declares it ({"sft.train_data": loaders.DataInput, ...}); the
    `data` stage reads what every later stage reads."""
    from rlhf_core import evaluate, label, ppo, pretrain, reward, sft

    declared = {"pretrain": pretrain.inputs, "sft": sft.inputs, "reward": reward.inputs, "ppo": ppo.inputs,
                "evaluate": evaluate.inputs, "label": label.inputs}
    if stage == "data":
        return {k: v for inputs in declared.values() for k, v in inputs(cfg).items()}
    return declared[stage](cfg)


def generate_demo_data(cfg: Config):
    """The embedded demo data under base.data_dir, sized by the `data` section (deterministic in base.seed)."""
    from rlhf_core.demo_data import generate
    from rlhf_core.training import StageResult

    return StageResult(generate(Path(cfg.base.data_dir), seed=cfg.base.seed, data=cfg.data), {})


def add_config_arguments(ap: argparse.ArgumentParser) -> None:
    """--params, --profile and --set, the same on every command of the project."""
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    ap.add_argument("--profile", default=None, help="a partial params file merged over --params (e.g. a GPU profile)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one dotted key, e.g. --set sft.lr=1e-4 (repeatable)")


def config_from_arguments(args: argparse.Namespace) -> Config:
    """The config those arguments name; a bad one exits with status 2 and the dotted key."""
    try:
        return load_config(args.params, profile=args.profile, overrides=args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def expected_errors() -> tuple[type[Exception], ...]:
    """Errors that say what went wrong and what to do: bad data, a busy output directory, a diverged run, an
    unloadable model."""
    from rlhf_core.io import LockedError
    from rlhf_core.label import LabelsPending
    from rlhf_core.loaders import DataError
    from rlhf_core.models import ModelLoadError
    from rlhf_core.training import NonFiniteError

    return DataError, LockedError, ModelLoadError, NonFiniteError, LabelsPending


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=(*STAGES, *LABELING, "all", "check-config"), help="what to run")
    add_config_arguments(ap)
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    if args.stage == "check-config":
        print(dump_params(cfg), end="")
        print("config OK", file=sys.stderr)
        return 0
    for stage in STAGES if args.stage == "all" else (args.stage,):
        t0 = time.perf_counter()
        try:
            result = run_stage(cfg, stage)
        except expected_errors() as e:  # a clear one-paragraph message, not a traceback
            print(f"{stage}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(json.dumps({"stage": stage, "seconds": round(time.perf_counter() - t0, 1),
                          "outputs": {k: str(v) for k, v in result.outputs.items()},
                          "metrics": result.metrics}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
