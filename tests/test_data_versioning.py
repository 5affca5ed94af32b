"""The demo data is deterministic and versioned by DVC: regenerating it reproduces data.dvc's hash, and a fresh clone
can pull it from a local remote. Uses the real dvc CLI in temporary git repositories."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.cli import generate_demo_data
from rlhf_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "t@example.com"], path)
    run(["git", "config", "user.name", "t"], path)
    run([DVC, "init", "-q"], path)
    run([DVC, "config", "core.analytics", "false"], path)
    run([DVC, "config", "core.site_cache_dir", str(path / ".dvc" / "site")], path)
    return path


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> Path:
    """The demo data at params.yaml's sizes (the version data.dvc records), generated into a temp dir."""
    import dataclasses

    cfg = load_config(ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("gen") / "data"
    generate_demo_data(dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, data_dir=str(out))))
    return out


def test_regenerated_data_hashes_to_data_dvc(default_data, tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    shutil.copytree(default_data, repo / "data")
    run([DVC, "add", "-q", "data"], repo)
    ours = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert ours["md5"] == committed["md5"] and ours["nfiles"] == committed["nfiles"]


def test_generation_is_byte_identical(default_data, tmp_path):
    import dataclasses

    cfg = load_config(ROOT / "params.yaml")
    again = tmp_path / "again"
    generate_demo_data(dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, data_dir=str(again))))
    files = sorted(p.relative_to(default_data) for p in default_data.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (default_data / f).read_bytes() == (again / f).read_bytes(), f


def test_fresh_clone_pulls_data_from_the_local_remote(default_data, tmp_path):
    origin = dvc_repo(tmp_path / "origin")
    remote = tmp_path / "remote"
    run([DVC, "remote", "add", "-d", "local", str(remote)], origin)
    shutil.copytree(default_data, origin / "data")
    run([DVC, "add", "-q", "data"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "data"], origin)
    run([DVC, "push", "-q"], origin)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    run([DVC, "config", "--local", "core.site_cache_dir", str(clone / ".dvc" / "site")], clone)
    assert not (clone / "data").exists()
    run([DVC, "pull", "-q"], clone)
    assert (clone / "data" / "sft" / "train.jsonl").read_bytes() == (default_data / "sft" / "train.jsonl").read_bytes()
    assert "up to date" in run([DVC, "status", "data.dvc"], clone)


def test_repo_config_has_a_default_local_remote():
    cfg = (ROOT / ".dvc" / "config").read_text()
    assert "remote = local" in cfg and "rlhf-dvc-remote" in cfg
    assert (ROOT / "data.dvc").exists()
    assert "/data/" in (ROOT / ".gitignore").read_text().split()
