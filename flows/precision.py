"""The precision a run uses, where DVC and MLflow see it.

`rlhf_core.runtime` decides bf16 or fp32 once per host (`base.dtype: auto`), or takes base.dtype as given. The stage
commands write that decision to `.rlhf/precision.yaml` before they run, and every training stage lists it as a
params file in dvc.yaml, so dvc.lock records the precision each stage ran at, and a checkout that moves to a host
deciding otherwise reruns its stages instead of reusing outputs made at the other precision. The data stage declares
the file as an output (not cached), so a checkout without it gets it from the first `dvc repro`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rlhf_core import io, runtime
from rlhf_core.config import Config

PATH = Path(".rlhf") / "precision.yaml"


def record(cfg: Config) -> dict:
    """The run's precision record (runtime.precision_record), written to PATH when it says something new."""
    rec = runtime.precision_record(cfg.base, runtime.resolve_device(cfg.base))
    text = yaml.safe_dump({"precision": rec["precision"]})
    if not PATH.exists() or PATH.read_text() != text:
        io.write_text(PATH, text)
    return rec


def tags(rec: dict) -> dict[str, str]:
    """MLflow tags of a precision record: precision, where the decision came from, the host it holds for."""
    return {f"precision.{k}" if k != "precision" else "precision": str(v) for k, v in rec.items()}
