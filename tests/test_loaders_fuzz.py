"""Fuzz the loaders: any malformed file either loads or raises `DataError` naming the file, never another exception.

Files are valid rows of every format, mutated at the value level (wrong types, missing keys, deep nesting, huge
numbers, NaN, lone surrogates, NUL) and at the byte level (random bytes, truncation, bad UTF-8, corrupt gzip), then
written as .jsonl, .json, .jsonl.gz, .json.gz, .csv or .parquet and read by every loader in both `on_error` modes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_core.loaders import (
    DataError,
    PreferenceGroup,
    SFTExample,
    load_preferences,
    load_prompts,
    load_sft,
    read_corpus,
)

TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
SFT = [{"prompt": "Q: 2+2?", "completion": " 4"}, {"messages": TURNS}]
PREFERENCES = [
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Go away."},
    {"prompt": TURNS[:1], "chosen": TURNS[1:], "rejected": [{"role": "assistant", "content": "no"}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
    {"prompt": "Name a fruit.", "responses": [" apple", " rock", " pear"], "ranks": [2, 3, 1]},
]
CORPUS = [{"text": "A sentence of the corpus."}]
# Each loader with the valid rows it reads; a file is built mostly from its own loader's rows, so that the damage,
# not a mismatched format, is what gets tested.
LOADERS = {load_sft: SFT, load_preferences: PREFERENCES, load_prompts: SFT + PREFERENCES[:3], read_corpus: CORPUS}
VALID_ROWS = SFT + PREFERENCES + CORPUS
KEYS = sorted({key for row in VALID_ROWS for key in row} | {"role", "content"})


class Raw(str):
    """JSON text written as is: values Python cannot produce with json.dumps (5,000 digits, 5,000 brackets, ...)."""


NASTY = [Raw("[" * 5000), Raw("[" * 900 + "]" * 900), Raw("1" * 5000), Raw("-" + "9" * 4400), Raw("1e999"),
         Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw('"\\ud800"'), Raw('"ok \\udfff"'), Raw('"a\\u0000b"'),
         None, True, 0, -1, 2.5, "", "   ", "\n\nAssistant:", [], {}, [None], [[1, 2]], [1, 1, 2], [3, 2, 1, 0],
         {"role": "assistant"}, [{"role": ["user"], "content": "x"}], [{"role": "user", "content": 5}]]

ORDINARY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
values = st.one_of(st.sampled_from(NASTY), ORDINARY, st.lists(ORDINARY, max_size=4),
                   st.dictionaries(st.sampled_from(KEYS), ORDINARY, max_size=3))


def dump(value) -> str:
    """JSON text of `value`, with `Raw` pieces spliced in verbatim (recursion is safe: nesting here is shallow)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


# Strategies are built once here: building them inside every draw made generation cost more than loading.
ACTIONS = st.sampled_from(["keep", "keep", "replace", "drop", "add", "swap-row"])
NEW_KEYS = st.sampled_from([*KEYS, "\ud800", "a\x00"])
INDEX = st.integers(0, 1 << 16)
INJURIES = st.sampled_from(["insert", "truncate", "flip", "line"])
LINES = st.sampled_from([b"[" * 5000, b"1" * 5000, b"\xff\xfe", b"\x00", b"{}", b"[]", b'"s"', b"7"])
# CSV and Parquet go through `datasets` (~50 ms a file), so they are drawn less often than the JSON containers.
SUFFIXES = st.sampled_from([".jsonl"] * 3 + [".json", ".json", ".jsonl.gz", ".json.gz", ".csv", ".parquet"])


def mutated_row(draw, valid: dict):
    """`valid`, possibly with a field replaced, removed or added, or the whole row replaced by a value."""
    row, keys = dict(valid), sorted(valid)
    action = draw(ACTIONS)
    if action == "replace" or action == "add":
        row[keys[draw(INDEX) % len(keys)] if action == "replace" else draw(NEW_KEYS)] = draw(values)
    elif action == "drop":
        del row[keys[draw(INDEX) % len(keys)]]
    return draw(values) if action == "swap-row" else row


def byte_damage(draw, data: bytes) -> bytes:
    """`data` with up to two byte-level injuries: random bytes, truncation, bad UTF-8, NUL, a whole nasty line."""
    for _ in range(draw(INDEX) % 3):
        at, kind = draw(INDEX) % (len(data) + 1), draw(INJURIES)
        if kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ (1 + draw(INDEX) % 255)]) + data[at + 1:]
        elif kind == "line":
            data = data[:at] + b"\n" + draw(LINES) + b"\n" + data[at:]
    return data


def to_csv(rows: list) -> bytes:
    """Rows as CSV: the union of keys as the header, each cell as JSON text (so lists and numbers arrive as text)."""
    header = sorted({str(k) for row in rows if isinstance(row, dict) for k in row}) or ["text"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        cells = row if isinstance(row, dict) else {}
        writer.writerow([dump(v) if not isinstance(v, str) else v for v in (cells.get(k, "") for k in header)])
    return out.getvalue().encode("utf-8", "surrogatepass")


def to_parquet(rows: list) -> bytes:
    """Rows as Parquet where Arrow can type them, else every cell as its JSON text (as a file from elsewhere would)."""
    def utf8(text: str) -> str:  # Arrow holds only valid UTF-8
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")

    dicts = [{utf8(k): v for k, v in row.items()} for row in rows if isinstance(row, dict)]
    try:
        return parquet_bytes(dicts)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return parquet_bytes([{k: utf8(dump(v)) for k, v in row.items()} for row in dicts])


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


@st.composite
def malformed_file(draw, loader) -> tuple[str, bytes]:
    """(file suffix, file bytes) of a few mutated rows, serialized and then damaged."""
    choices = LOADERS[loader] if draw(INDEX) % 5 else VALID_ROWS
    valid = choices[draw(INDEX) % len(choices)]
    rows = [mutated_row(draw, valid) for _ in range(1 + draw(INDEX) % 4)]
    suffix = draw(SUFFIXES)
    if suffix == ".csv":
        data = to_csv(rows)
    elif suffix == ".parquet":
        data = to_parquet(rows)
    elif suffix.startswith(".json") and draw(INDEX) % 2:
        data = ("[" + ", ".join(dump(r) for r in rows) + "]").encode("utf-8", "surrogatepass")
    else:
        data = "\n".join(dump(r) for r in rows).encode("utf-8", "surrogatepass")
    if suffix.endswith(".gz"):
        data = gzip.compress(byte_damage(draw, data) if draw(INDEX) % 2 else data)
    return suffix, byte_damage(draw, data)  # on a .gz file: a corrupt or truncated gzip body


FILES = {loader: malformed_file(loader) for loader in LOADERS}


def texts(record: str | SFTExample | PreferenceGroup) -> list[str]:
    """Every string a loaded record holds: what a tokenizer will be given."""
    if isinstance(record, str):
        return [record]
    return [record.prompt, record.completion] if isinstance(record, SFTExample) else [record.prompt, *record.responses]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data(), st.sampled_from(list(LOADERS)), st.sampled_from(["raise", "skip"]))
def test_malformed_files_load_or_raise_data_error(tmp_path_factory, draw, loader, on_error):
    suffix, data = draw.draw(FILES[loader], label="file")
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path, report = folder / f"data{suffix}", folder / "report.json"
    path.write_bytes(data)
    try:
        records = loader(path, on_error=on_error, report_path=report if on_error == "skip" else None)
    except DataError as e:  # any other exception propagates and fails the test
        assert e.file == str(path) and (e.row is None or e.row >= 1)
        assert str(e).encode("utf-8")  # the message itself prints: no lone surrogate from the data leaks into it
        return
    for text in (t for record in records for t in texts(record)):
        text.encode("utf-8")  # what loads is valid Unicode, so the tokenizer cannot be the first to fail on it
        assert "\x00" not in text
