"""The CPU precision decision: once per host, cached across processes, explicit dtype first, never a crash on a bad
cache. The CPU is faked (a cpuinfo file) and the timer replaced, so these tests say the same on every host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core import runtime
from rlhf_core.config import BaseConfig

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
RECORD_KEYS = {"precision", "precision_source", "cpu_bf16_native", "bf16_speedup", "host_key"}


def cpuinfo(model: str, flags: str) -> str:
    core = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\nmodel name\t: {model}\nflags\t\t: fpu sse2 avx2 {flags}\n"
    return "\n".join(core.format(i) for i in range(2))


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A fake avx512_bf16 host with its own cache dir; `host.set(model, flags)` changes the CPU, `host.ratios` is
    what the next measurement returns and `host.calls` counts measurements."""
    class Host:
        calls = 0
        ratios = [2.0] * 7

        def set(self, model="AMD EPYC 9R14", flags="avx512f avx512_bf16"):
            (tmp_path / "cpuinfo").write_text(cpuinfo(model, flags))
            return self

        def measure(self):
            self.calls += 1
            return list(self.ratios)

    h = Host().set()
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(runtime, "measure_bf16_speedup", h.measure)
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    return h


def cache_file() -> Path:
    return runtime.cache_dir() / f"precision-{runtime.host_key(*runtime.cpu_info())}.json"


def test_decision_is_measured_once_then_read_from_the_cache(host):
    first = runtime.host_precision()
    assert (first["precision"], first["source"], first["bf16_speedup"]) == ("bf16", "measured", 2.0)
    assert first["cpu_model"] == "AMD EPYC 9R14" and first["cpu_flags"] == ["avx512_bf16", "avx512f"]
    for _ in range(3):
        again = runtime.host_precision()
        assert again == {**first, "source": "host-cache"}
    assert host.calls == 1
    assert runtime.host_precision(refresh=True)["source"] == "measured" and host.calls == 2


def test_every_stage_gets_the_cached_answer_whatever_the_load_does_later(host):
    base = BaseConfig(dtype="auto")
    assert runtime.use_bf16(base, CPU)
    host.ratios = [0.05] * 7  # a later measurement would say fp32; nothing measures again
    assert all(runtime.use_bf16(base, CPU) for _ in range(5)) and host.calls == 1


@pytest.mark.parametrize(("ratios", "precision"), [
    ([2.0] * 4 + [0.05] * 3, "bf16"),  # three pairs skewed by a burst of load: the median ignores them
    ([0.05] * 4 + [2.0] * 3, "fp32"),
    ([1.2] * 7, "fp32"),  # faster, but not clearly: keep fp32
    ([1.3] * 7, "bf16"),
])
def test_bf16_only_when_the_median_ratio_clears_the_margin(host, ratios, precision):
    host.ratios = ratios
    assert runtime.host_precision()["precision"] == precision


def test_host_without_native_bf16_gets_fp32_without_timing(host):
    host.set(model="Intel Xeon E5-2686", flags="avx512f")  # avx512f alone: bf16 is emulated, ~100x slower
    decision = runtime.host_precision()
    assert (decision["precision"], decision["source"], decision["bf16_speedup"]) == ("fp32", "cpu-flags", None)
    assert not runtime.use_bf16(BaseConfig(dtype="auto"), CPU)
    assert host.calls == 0 and not runtime.cache_dir().exists()


def test_explicit_dtype_wins_and_is_recorded_as_params(host):
    assert not runtime.use_bf16(BaseConfig(dtype="fp32"), CPU)  # on a host that would pick bf16
    host.set(flags="")
    record = runtime.precision_record(BaseConfig(dtype="bf16"), CPU)  # on a host that would pick fp32
    assert record == {"precision": "bf16", "precision_source": "params", "cpu_bf16_native": False,
                      "bf16_speedup": None, "host_key": runtime.host_key(*runtime.cpu_info())}
    assert host.calls == 0


def test_record_of_an_auto_cpu_run(host):
    record = runtime.precision_record(BaseConfig(dtype="auto"), CPU)
    assert set(record) == RECORD_KEYS
    assert record == {"precision": "bf16", "precision_source": "measured", "cpu_bf16_native": True,
                      "bf16_speedup": 2.0, "host_key": runtime.host_key(*runtime.cpu_info())}
    assert runtime.precision_record(BaseConfig(dtype="auto"), CPU)["precision_source"] == "host-cache"


def test_cuda_follows_the_device_not_the_cpu_probe(host, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    record = runtime.precision_record(BaseConfig(dtype="auto"), torch.device("cuda"))
    assert (record["precision"], record["precision_source"]) == ("bf16", "cuda") and host.calls == 0


def test_cache_is_keyed_by_host(host):
    runtime.host_precision()
    other = host.set(model="AMD EPYC 7R13")
    other.ratios = [0.9] * 7
    assert runtime.host_precision()["source"] == "measured" and host.calls == 2
    files = sorted(p.name for p in runtime.cache_dir().glob("precision-*.json"))
    assert len(files) == 2
    assert runtime.host_precision()["precision"] == "fp32"
    host.set()
    assert runtime.host_precision()["precision"] == "bf16" and host.calls == 2


def test_cache_survives_a_new_process(host, tmp_path):
    first = runtime.host_precision()
    child = f"""
import json, pathlib
from rlhf_core import runtime
runtime.CPUINFO = pathlib.Path({str(runtime.CPUINFO)!r})
def no_timing(): raise AssertionError("measured again in a new process")
runtime.measure_bf16_speedup = no_timing
print(json.dumps(runtime.host_precision()))
"""
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=os.environ, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == {**first, "source": "host-cache"}


@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"precision": "bf16"}',
                                  '{"host_key": "%s", "precision": "bf16", "bf16_speedup": null}'])
def test_corrupt_cache_is_measured_again_not_a_crash(host, text):
    runtime.host_precision()
    cache_file().write_text(text.replace("%s", runtime.host_key(*runtime.cpu_info())))
    with pytest.warns(UserWarning, match="unreadable precision cache"):
        decision = runtime.host_precision()
    assert decision["source"] == "measured" and host.calls == 2
    assert json.loads(cache_file().read_text())["precision"] == "bf16"


def test_cli_prints_this_hosts_decision_and_caches_it(tmp_path):
    env = {**os.environ, "RLHF_CACHE_DIR": str(tmp_path)}
    run = [sys.executable, "-m", "rlhf_core.runtime"]
    first = json.loads(subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
    second = json.loads(subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
    assert first["precision"] in ("bf16", "fp32") and first["host_key"] == runtime.host_key(*runtime.cpu_info())
    # a host with native bf16 measures once, then reads the cache; one without decides from its flags each time
    assert first["source"] in ("measured", "cpu-flags")
    assert second == {**first, "source": "host-cache" if first["source"] == "measured" else "cpu-flags"}
