"""One flow at a time per checkout, and nothing left behind when a flow dies, even by `kill -9`.

- `one_flow_per_checkout()`: an flock on `.rlhf/pipeline.lock` held for the whole flow (pipeline or sweep). Two flows
  in one checkout would share params.yaml, outputs/ and dvc.lock: the second would rewrite params.yaml under the
  first's running stage, and DVC would record the second's params for the first's outputs. The kernel frees the lock
  when its holder dies, so a killed flow never leaves a stale one.
- `die_with_parent()` (a `preexec_fn`) and `die_with_flow()` (the stage command, on itself): Linux's
  PR_SET_PDEATHSIG, so the dvc process, the stage command under it and the local Prefect API die with the flow.
- `local_prefect_api()`: when no PREFECT_API_URL is set, the temporary Prefect API as a child that dies with the
  flow. Prefect's own temporary server is stopped by an atexit hook, which `kill -9` never runs: it stayed orphaned.
- `close_abandoned_runs()`: what a killed flow left RUNNING in this checkout (MLflow runs whose process is gone,
  Prefect flow runs), closed as KILLED and Crashed when the next flow starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rlhf_core import io

LOCK = Path(".rlhf") / "pipeline.lock"  # relative to the repository root, where every flow runs
CHECKOUT_TAG, PID_TAG = "rlhf.checkout", "rlhf.pid"
FLOW_PID_ENV = "RLHF_FLOW_PID"  # the flow's pid, for the stage commands it starts
_HELD: set[Path] = set()  # the lock files this process holds
_PR_SET_PDEATHSIG = 1
# resolved once here: a preexec_fn runs between fork and exec, where loading a library could deadlock
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def checkout() -> str:
    """This checkout as `host:/abs/path`: the same path on two machines sharing a tracking server is two checkouts."""
    return f"{socket.gethostname()}:{Path.cwd().resolve()}"


def owner_tags() -> dict[str, str]:
    """Tags for an MLflow run: which checkout and which process opened it (who must close it)."""
    return {CHECKOUT_TAG: checkout(), PID_TAG: str(os.getpid())}


@contextlib.contextmanager
def one_flow_per_checkout() -> Iterator[None]:
    """Hold this checkout's flow lock, or raise `rlhf_core.io.LockedError` naming the flow that holds it. Within a
    process that holds it already (`python -m flows.pipeline` takes it before its flow starts), a no-op."""
    path = LOCK.resolve()
    if path in _HELD:
        yield
        return
    path.parent.mkdir(exist_ok=True)
    if not (path.parent / ".gitignore").exists():
        io.write_text(path.parent / ".gitignore", "*\n")  # the folder ignores itself: no entry in .gitignore needed
    with io.exclusive_lock(path, f"this checkout ({Path.cwd().resolve()})"):
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)


@contextlib.contextmanager
def flow_process() -> Iterator[None]:
    """What `python -m flows.pipeline` (or `flows.sweep`) runs its flow in: this checkout's lock, taken before the
    seconds it takes to start Prefect (a second flow is refused at once, with the holder's pid and command), and a
    local Prefect API that dies with the process. (The flow takes the lock itself too: a worker calls it directly.)"""
    try:
        with one_flow_per_checkout(), local_prefect_api():
            yield
    except io.LockedError as e:
        raise SystemExit(f"refused: {e}") from None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have Linux send `sig` to this process when its parent dies (also by kill -9). As `preexec_fn` it applies to the
    child. The parent is the *thread* that forked: start children from a thread that outlives them."""
    if _prctl is not None and _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def die_with(pid: int) -> None:
    """Kill this process when `pid` (not our parent) exits: a thread waits on a pidfd (Linux >= 5.3)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        os.kill(os.getpid(), signal.SIGKILL)
        return
    except (AttributeError, OSError):  # not Linux >= 5.3: PR_SET_PDEATHSIG alone
        return

    def wait_then_die() -> None:
        select.select([fd], [], [])  # readable once the process has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_then_die, name=f"die-with-{pid}", daemon=True).start()


def die_with_flow() -> None:
    """For the stage command: die with the process that ran it (`dvc repro`, or bash, which execs the command), and
    with the flow that ran that one (RLHF_FLOW_PID) whatever sits in between: dash (/bin/sh, DVC's shell when SHELL
    is unset, as under a worker) stays between DVC and the command and would outlive both. A flow that died while
    this process was starting is caught here too (its pid is gone)."""
    die_with_parent()
    if pid := os.environ.get(FLOW_PID_ENV):
        die_with(int(pid))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_prefect_api() -> Iterator[str | None]:
    """Point Prefect at a temporary local API that dies with this process, when no PREFECT_API_URL is configured.
    It is what Prefect would start by itself (uvicorn on a free port, database under PREFECT_HOME, no UI, no
    services), started here with PR_SET_PDEATHSIG. Yields the API URL (None when one was configured)."""
    import httpx
    import prefect
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        yield None
        return
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    proc, url = None, ""
    try:
        while time.monotonic() < deadline:
            if proc is None or proc.poll() == 3:  # 3: the port was taken meanwhile
                port = free_port()
                url = f"http://127.0.0.1:{port}/api"
                proc = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                     "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                     "--log-level", "error", "--lifespan", "on"], env=env, preexec_fn=die_with_parent)
            elif proc.poll() is not None:
                raise RuntimeError(f"the local Prefect API exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the local Prefect API did not answer at {url} in time (raise "
                               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
        # the environment, not `temporary_settings`: Prefect's log and event workers run in threads of their own,
        # which see the process-global settings (else each starts Prefect's own temporary server after all)
        os.environ["PREFECT_API_URL"] = url
        refresh_global_settings_context()
        try:
            yield url
        finally:
            _drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        refresh_global_settings_context()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues (it does so at exit, when this API would be gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


def alive(pid: int, since_ms: int) -> bool:
    """Is process `pid` alive and the one that existed at `since_ms` (not a later process given the same pid)?"""
    import psutil

    try:
        return psutil.Process(pid).create_time() <= since_ms / 1000 + 1
    except psutil.Error:
        return False


def close_abandoned_runs(flow_run_id: str | None = None) -> dict[str, list[str]]:
    """Close what a killed flow of this checkout left RUNNING: MLflow runs whose opening process is dead (KILLED),
    and Prefect flow runs of this checkout other than `flow_run_id` (Crashed). Call it under
    `one_flow_per_checkout()`: no other flow of this checkout can then be alive. Tags `flow_run_id` with the
    checkout, so that the next flow finds it if this one is killed."""
    from mlflow import MlflowClient

    client, here = MlflowClient(), checkout()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{CHECKOUT_TAG}` = '{here}'")
    killed = [r.info.run_id for r in found if not alive(int(r.data.tags.get(PID_TAG, 0)), r.info.start_time)]
    for run_id in killed:
        client.set_terminated(run_id, "KILLED")
    return {"mlflow_killed": killed, "prefect_crashed": _crash_flow_runs(flow_run_id) if flow_run_id else []}


def _crash_flow_runs(current: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    tag = f"{CHECKOUT_TAG}:{checkout()}"
    with get_client(sync_client=True) as client:
        me = client.read_flow_run(current)
        if tag not in me.tags:
            client.update_flow_run(me.id, tags=[*me.tags, tag])
        running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag]), state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING]))))
        crashed = [str(r.id) for r in running if r.id != me.id]
        for run_id in crashed:
            client.set_flow_run_state(run_id, Crashed(message="its process died (found by the next flow run of "
                                                              "this checkout)"), force=True)
    return crashed
