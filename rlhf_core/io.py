"""Atomic file output and exclusive locks: a file or a directory appears whole or not at all, and one run at a time
writes a given place.

Every stage writes through these helpers, so a crash or a kill never leaves a half-written output that a later step
(or DVC's hash) would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names it."""


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a directory and the directory itself: the rename that publishes it must not
    reach the disk before its contents do (a power loss would otherwise leave an empty file under the final name)."""
    paths = [path] if path.is_file() else [*sorted(p for p in path.rglob("*") if p.is_file()), path,
                                           *sorted(p for p in path.rglob("*") if p.is_dir())]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(path: str | os.PathLike) -> None:
    """Finish replacing a directory that a kill interrupted between atomic_path's two renames (the old version moved
    aside, the new one, complete and fsynced, not yet in place): put the new one in place. Anything else is left."""
    path = Path(path)
    if path.exists():
        return
    for tmp in sorted(path.parent.glob(f".{path.name}.*.tmp")):
        if (tmp / f"{path.name}.old").exists() and (tmp / path.name).exists():
            os.replace(tmp / path.name, path)
            shutil.rmtree(tmp, ignore_errors=True)
            return


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path` (file or directory), else
    delete it. A directory is replaced by two renames (rename() cannot replace a non-empty one); a kill between them
    is repaired by `recover`, which this calls first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if tmp.exists():
            _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            # rename() cannot replace a non-empty directory: move the old one aside first, then drop it.
            old = tmp.parent / (path.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically, with stable key order so reruns are byte-identical."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n" for row in rows)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write a JSON document atomically (indented, sorted keys). NaN and infinity are refused: they are not JSON, and
    a metrics file holding them breaks every reader downstream (DVC, MLflow, jq)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on `path` (created if missing) for the duration of the block, or raise `LockedError`
    naming the holder. The lock is `flock`: the kernel releases it when the holder exits or is killed, so a stale
    lock never needs cleaning; the file keeps the holder's pid, host, command and start time for the message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "another process"
            raise LockedError(f"{what} is in use by {holder} (lock file {path}); wait for it to finish, or stop it"
                              ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
