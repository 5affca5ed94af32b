"""DVC is the one cache: its stage hashes (data md5 + the stage's params + its code, from dvc.yaml) decide what reruns.

A Prefect task never decides for itself: it runs `dvc repro --single-item <stage>` and reports what DVC did. A stage
DVC ran wrote a record file (flows/stage.py); one it restored from its run-cache printed "is cached"; otherwise it was
unchanged. Prefect's own task cache stays off (`NO_CACHE`), so the two can never disagree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import yaml

from flows.lifecycle import die_with_parent
from rlhf_core.config import Config, dump_params, from_dict, load_config, to_dict
from rlhf_core.io import write_text

RAN, RESTORED, SKIPPED = "ran", "restored", "skipped"
RECORD_ENV = "RLHF_STAGE_RECORD"  # where the stage command writes {run_id, seconds} (flows/stage.py)
WHY = {RAN: "ran (inputs, params or code changed)", RESTORED: "restored from DVC's run-cache (seen before)",
       SKIPPED: "skipped (unchanged: data md5, params and code match dvc.lock)"}


def dvc_bin() -> str:
    return str(Path(sys.executable).parent / "dvc")


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for dvc and stage commands: this interpreter's bin first, so dvc.yaml's `python` is ours."""
    env = dict(os.environ, **(extra or {}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc(*args: str, repo: Path = Path("."), check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([dvc_bin(), *args], cwd=repo, env=tool_env(), capture_output=True, text=True, check=False,
                          preexec_fn=die_with_parent)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def data_md5(repo: Path = Path(".")) -> str:
    """The data version: the md5 that data.dvc records for data/."""
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def pipeline_stages(repo: Path = Path(".")) -> dict[str, dict]:
    """dvc.yaml's stages, with ${base.out_dir} (the only variable it uses) resolved from params.yaml."""
    out_dir = yaml.safe_load((repo / "params.yaml").read_text()).get("base", {}).get("out_dir", "outputs")
    text = (repo / "dvc.yaml").read_text().replace("${base.out_dir}", out_dir)
    return yaml.safe_load(text)["stages"]


def out_md5(stage: str, path: str, repo: Path = Path(".")) -> str | None:
    """DVC's hash of one output of `stage`, as dvc.lock records it (None when the stage has not run)."""
    lock = repo / "dvc.lock"
    stages = yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}
    return next((o["md5"] for o in stages.get(stage, {}).get("outs", []) if o["path"] == path), None)


def data_is_current(repo: Path = Path(".")) -> bool:
    """Does data/ hold exactly the version data.dvc names?"""
    return (repo / "data").is_dir() and json.loads(dvc("status", "--json", "data.dvc", repo=repo).stdout or "{}") == {}


def stream(cmd: list[str], env: dict[str, str], on_line: Callable[[str], None],
           poll: Callable[[], None] | None = None, repo: Path = Path(".")) -> list[str]:
    """Run `cmd`, handing each output line to `on_line` and calling `poll` about once a second; returns the lines,
    raises with the last ones on failure. The command dies with this process (a killed flow leaves no stage
    running)."""
    proc = subprocess.Popen(cmd, cwd=repo, text=True, env=tool_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            on_line(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        reader.join(timeout=1.0)
        if poll:
            poll()
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{''.join(lines[-40:])}")
    return lines


def repro(stage: str, env: dict[str, str], on_line: Callable[[str], None], poll: Callable[[], None] | None = None,
          repo: Path = Path(".")) -> tuple[str, dict | None]:
    """`dvc repro --single-item <stage>`; returns RAN, RESTORED or SKIPPED, and the stage command's record (its
    MLflow run id and seconds) when it ran."""
    with tempfile.TemporaryDirectory(prefix="rlhf-stage-") as tmp:
        record = Path(tmp) / "record.json"
        lines = stream([dvc_bin(), "repro", "--single-item", stage], {**env, RECORD_ENV: str(record)}, on_line, poll,
                       repo)
        if record.exists():
            return RAN, json.loads(record.read_text())
        return (RESTORED if any("is cached" in x for x in lines) else SKIPPED), None


def write_params(cfg: Config, path: Path = Path("params.yaml")) -> bool:
    """Make params.yaml say `cfg` (which `rlhf_core.config.load_config` merged from it, a profile and overrides), as
    `dvc exp run --set-param` does, so that DVC's hashes see it. Only the values that differ are rewritten (a ruamel
    round trip: comments and layout survive), atomically. Returns whether the file changed."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    old = path.read_text()
    doc = rt.load(old)
    _assign(doc, to_dict(load_config(path)), to_dict(cfg))
    buf = StringIO()
    rt.dump(doc, buf)
    if buf.getvalue() == old:
        return False
    if from_dict(yaml.safe_load(buf.getvalue())) != cfg:
        raise RuntimeError(f"cannot write this config into {path} faithfully; write it by hand:\n{dump_params(cfg)}")
    write_text(path, buf.getvalue())
    return True


def _assign(doc, old: dict, new: dict) -> None:
    """Set in `doc` (the file's YAML tree) each value of `new` that differs from `old` (what the file says now)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict) and set(old[key]) <= set(value):
            section = doc.get(key) if isinstance(doc.get(key), dict) else {}  # {}: the file leaves it to defaults
            _assign(section, old[key], value)
            if section:
                doc[key] = section
        elif old.get(key) != value:
            doc[key] = list(value) if isinstance(value, tuple) else value
