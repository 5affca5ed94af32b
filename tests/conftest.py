"""Shared fixtures: a tiny pipeline (data -> pretrain -> sft -> reward) trained for real, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HH_SAMPLE = SHARED / "data" / "hh-rlhf-harmless" / "comparisons.jsonl.gz"


def tiny_params(tmp: Path) -> dict:
    """A config small enough to train every stage in seconds on 2 CPU cores."""
    return {
        "base": {"data_dir": str(tmp / "data"), "out_dir": str(tmp / "outputs"), "dtype": "fp32"},
        "data": {"pretrain_docs": 1500, "sft_train": 320, "sft_test": 48, "rankings_train": 192, "rankings_test": 48,
                 "pairs_train": 64, "pairs_test": 32, "rl_prompts": 64, "eval_prompts": 32},
        "pretrain": {"vocab_size": 400, "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "seq_len": 64,
                     "batch_size": 16, "steps": 60, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 10},
        "sft": {"epochs": 3, "batch_size": 16, "micro_batch_size": 8, "lr": 3e-3, "max_length": 64, "eval_every": 5,
                "checkpoint_every": 4},
        "reward": {"epochs": 1, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-3, "max_length": 64, "normalize_samples": 16,
                   "eval_every": 6, "checkpoint_every": 3},
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Run every stage once on the tiny config; returns (cfg, {stage: StageResult})."""
    from rlhf_core.cli import run_stage
    from rlhf_core.config import from_dict

    tmp = tmp_path_factory.mktemp("tiny")
    cfg = from_dict(tiny_params(tmp))
    results = {stage: run_stage(cfg, stage) for stage in ("data", "pretrain", "sft", "reward")}
    return cfg, results
