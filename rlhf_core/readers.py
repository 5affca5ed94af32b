"""Read a data source into numbered raw rows, the layer under `rlhf_core.loaders` (which parses rows into records).

`read_rows` takes a local `.jsonl`, `.json` (array or JSON lines), `.jsonl.gz`/`.json.gz`, `.parquet` or `.csv`, a
directory written by `Dataset.save_to_disk`/`DatasetDict.save_to_disk`, or else a Hugging Face hub name, and returns
each row as a dict or as the `DataError` it earned (bad UTF-8 or JSON on that line, not an object, NUL or a lone
surrogate in it), so a loader can raise at the first bad row or skip it. A source that cannot be read at all (missing,
corrupt gzip, unsupported type, no rows) raises `DataError` at once.

    from rlhf_core.readers import read_rows
    name, rows = read_rows("data/prefs.jsonl", split="train")  # [(1, {"prompt": ...}), (2, DataError(...)), ...]
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import re
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

_LOCAL_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv")
# NUL and lone surrogates (JSON can spell "\ud800") load as Python strings but break UTF-8 encoding and tokenizers.
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


class DataError(ValueError):
    """A data set that cannot be loaded: `str()` reads `data/prefs.jsonl, row 17, field 'chosen': empty response`."""

    def __init__(self, file: str, row: int | None, field: str | None, reason: str):
        # All four go to args so the error survives pickling (Prefect ships exceptions between processes).
        super().__init__(str(file), row, field, reason)
        self.file, self.row, self.field, self.reason = str(file), row, field, reason

    def __str__(self) -> str:
        where = [self.file] + ([f"row {self.row}"] if self.row is not None else [])
        where += [f"field {self.field!r}"] if self.field is not None else []
        return f"{', '.join(where)}: {self.reason}"


def json_kind(value: Any) -> str:
    """A JSON-ish type name for messages: 'a number', 'a list', 'null'."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_rows(source: str | Path, split: str) -> tuple[str, list[tuple[int, dict | DataError]]]:
    """(display name, [(1-based row, row dict or the DataError that row raised)]); unreadable lines stay skippable."""
    name, path = str(source), Path(source).expanduser()
    if path.is_dir():
        rows = _read_with_datasets(name, "disk", path, split)
    elif path.is_file():
        rows = _read_file(name, path)
    elif isinstance(source, Path) or name.lower().endswith(_LOCAL_SUFFIXES) or name.startswith(("/", ".", "~")):
        raise DataError(name, None, None, "no such file or directory")
    else:
        rows = _read_with_datasets(name, "hub", name, split)
    if not rows:
        raise DataError(name, None, None, "no rows (empty file)")
    # Vetted once here for every reader, so no row parser (nor a tokenizer, later) meets a non-object or broken text.
    return name, [(row_no, _vet(name, row_no, row)) for row_no, row in rows]


def _read_file(name: str, path: Path) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    inner = Path(path.stem).suffix.lower() if suffix == ".gz" else suffix
    if inner in (".jsonl", ".json"):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(name, None, None, f"cannot read the file ({e.strerror or e})") from None
        if suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as e:  # bad header: OSError; truncated: EOFError; corrupt: zlib
                raise DataError(name, None, None, f"not a valid gzip file ({type(e).__name__}: {e})") from None
        data = data.removeprefix(codecs.BOM_UTF8)
        return _parse_json_document(name, data) if inner == ".json" else _parse_json_lines(name, data)
    if suffix in (".parquet", ".csv") and suffix == inner:
        return _read_with_datasets(name, suffix[1:], path, None)
    raise DataError(name, None, None, f"unsupported file type; expected one of {', '.join(_LOCAL_SUFFIXES)} or a "
                    "save_to_disk directory (.gz only for .jsonl and .json)")


def _parse_json_lines(name: str, data: bytes) -> list[tuple[int, Any]]:
    # Parsed here rather than by `datasets` so that a bad line is reported by number and can be skipped alone.
    rows: list[tuple[int, Any]] = []
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((line_no, DataError(name, line_no, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                                                  f"column {e.start + 1})")))
            continue
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except (ValueError, RecursionError) as e:
            rows.append((line_no, DataError(name, line_no, None, _json_fault(e, with_line=False))))
    return rows


def _parse_json_document(name: str, data: bytes) -> list[tuple[int, Any]]:
    """A `.json` file: a JSON array of objects (row = element number) or else JSON lines."""
    if not data.lstrip().startswith(b"["):
        return _parse_json_lines(name, data)
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise DataError(name, None, None, f"not valid UTF-8 (byte 0x{data[e.start]:02x} on line {line_no})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(name, None, None, _json_fault(e, with_line=True)) from None
    return list(enumerate(doc, 1))


def _json_fault(e: ValueError | RecursionError, with_line: bool) -> str:
    """Why `json.loads` failed: bad syntax (at its column, and line if `with_line`), or JSON Python cannot hold."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at {f'line {e.lineno}, ' if with_line else ''}column {e.colno})"
    if isinstance(e, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON (an integer longer than {sys.get_int_max_str_digits()} digits)"


def _vet(name: str, row_no: int, row: Any) -> dict | DataError:
    """The row, or the `DataError` it earns: not an object, or a string in it (key or value) that is not valid text."""
    if isinstance(row, DataError):
        return row
    if not isinstance(row, dict):
        return DataError(name, row_no, None, f"expected a JSON object, got {json_kind(row)}")
    for key, value in row.items():
        stack = [key, value]  # a loop, not recursion: JSON may nest ~1,000 deep
        while stack:
            if isinstance(v := stack.pop(), str) and (bad := _BAD_CHAR.search(v)):
                why = "contains a NUL character" if bad[0] == "\x00" else f"not valid Unicode: lone surrogate {bad[0]!a}"
                # A broken column name is shown escaped: the message itself must encode (reports, logs, terminals).
                return DataError(name, row_no, ascii(key) if _BAD_CHAR.search(key) else key, why)
            if isinstance(v, dict):
                stack += [*v, *v.values()]
            elif isinstance(v, (list, tuple)):
                stack += v
    return row


def _read_with_datasets(name: str, kind: str, target: Any, split: str | None) -> list[tuple[int, Any]]:
    """Parquet, CSV, save_to_disk directories and hub names through `datasets`, caching only to a temporary dir."""
    import datasets  # heavy: imported only when a file needs it

    # keep_in_memory + a throwaway cache_dir: nothing lands in ~/.cache and no stale fingerprinted cache is reused.
    with tempfile.TemporaryDirectory(prefix="rlhf-datasets-") as cache:
        try:
            if kind == "parquet":
                ds = datasets.Dataset.from_parquet(str(target), cache_dir=cache, keep_in_memory=True)
            elif kind == "csv":
                # Every cell as text: pandas would turn a completion like "42" into a number.
                with open(target, newline="", encoding="utf-8") as f:
                    header, body = next(reader := csv.reader(f), []), next(reader, None)
                if body is None:
                    return []  # header only: `datasets` would fail obscurely; the caller reports "no rows"
                text = datasets.Features({c: datasets.Value("string") for c in header})
                ds = datasets.Dataset.from_csv(str(target), cache_dir=cache, keep_in_memory=True, features=text)
            elif kind == "disk":
                ds = datasets.load_from_disk(str(target), keep_in_memory=True)
            else:
                ds = datasets.load_dataset(target, split=split, cache_dir=cache, keep_in_memory=True)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(name, None, None, f"no split {split!r} (available: {', '.join(ds)})")
                ds = ds[split]
            return list(enumerate(ds.to_list(), 1))  # inside the `try`: arrow may fail only when it converts
        except DataError:
            raise
        except Exception as e:  # any reader failure is a data problem for the caller
            where = "from the Hugging Face hub" if kind == "hub" else f"as {kind}"
            raise DataError(name, None, None, f"cannot load {where}: {type(e).__name__}: {e}") from e
