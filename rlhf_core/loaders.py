"""Load SFT, preference, prompt and pretraining-corpus data sets into the project's record types, rejecting bad rows
loudly.

Sources (read into raw rows by `rlhf_core.readers`): a local `.jsonl`, `.json` (array or JSON lines),
`.jsonl.gz`/`.json.gz`, `.parquet`, `.csv`, a directory written by `Dataset.save_to_disk`/`DatasetDict.save_to_disk`,
or else a Hugging Face hub name. Any malformed input (bad bytes, bad JSON, corrupt gzip, wrong types, text that is not
valid Unicode) raises `DataError` naming file, 1-based row (the line, for JSON lines) and field, never another
exception; `on_error="skip"` drops bad rows instead and can write a report of them. A file that cannot be read at all
is a `DataError` in either mode.

    from rlhf_core.loaders import load_preferences
    groups = load_preferences("../shared/data/hh-rlhf-harmless/comparisons.jsonl.gz", format="hh")
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core.io import write_json
from rlhf_core.readers import DataError, json_kind, read_rows

HUMAN, ASSISTANT, SYSTEM = "\n\nHuman:", "\n\nAssistant:", "\n\nSystem:"
_ROLE_MARKERS = {"system": SYSTEM, "user": HUMAN, "assistant": ASSISTANT}
COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "responses", "ranks")


class _RowError(Exception):
    """A bad value in the row being parsed; the loading loop adds the file and row number."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class SFTExample:
    """One supervised fine-tuning example."""

    prompt: str
    """the text the model is conditioned on (for dialogues: the turns so far, ending with "\\n\\nAssistant:")"""
    completion: str
    """the target text the model learns to produce after `prompt`"""


@dataclass(frozen=True)
class PreferenceGroup:
    """Responses to one prompt with the human preferences among them (a pairwise row is a group of two)."""

    prompt: str
    """the text every response continues"""
    responses: tuple[str, ...]
    """the candidate responses, in file order"""
    pairs: tuple[tuple[int, int], ...]
    """(winner_index, loser_index) into `responses`, one per human judgement"""

    def __post_init__(self):
        for w, lo in self.pairs:
            if w == lo or not (0 <= w < len(self.responses) and 0 <= lo < len(self.responses)):
                raise ValueError(f"pair {(w, lo)} does not index two different responses of {len(self.responses)}")

    def split_into_pairs(self) -> list[PreferenceGroup]:
        """Each pair as its own two-response group, to train on a ranking's pairs as if they were independent rows."""
        pick = self.responses
        return [PreferenceGroup(self.prompt, (pick[w], pick[lo]), ((0, 1),)) for w, lo in self.pairs]


def render_dialogue(messages: Sequence[dict]) -> str:
    """Chat messages as the project's dialogue text: "\\n\\nHuman: …\\n\\nAssistant: …" (system: "\\n\\nSystem: …")."""
    parts = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise TypeError(f"message {i} is {json_kind(message)}, expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in _ROLE_MARKERS:
            raise ValueError(f"message {i} has unknown role {reprlib.repr(role)} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise TypeError(f"message {i} content is {json_kind(content)}, expected a string")
        parts.append(f"{_ROLE_MARKERS[role]} {content}")
    return "".join(parts)


def ranking_pairs(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """All (winner, loser) index pairs implied by `ranks` (1 = best), ordered best winner first: C(K,2) of them, less
    the pairs of equal ranks (a tie is no comparison)."""
    order = sorted(range(len(ranks)), key=ranks.__getitem__)  # indices, best first
    return tuple((order[a], order[b]) for a, b in itertools.combinations(range(len(order)), 2)
                 if ranks[order[a]] != ranks[order[b]])


# ---------------------------------------------------------------------------------------------------- row parsers


def _get(row: dict, name: str, cols: dict[str, str]) -> tuple[str, Any]:
    """(file column, value) for the project's column `name`; a missing column or a null value is an error."""
    col = cols.get(name, name)
    if col not in row:
        raise _RowError(col, "missing field")
    if row[col] is None:
        raise _RowError(col, "missing value (null)")
    return col, row[col]


def _typed(col: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _RowError(col, f"expected {'a string' if kind is str else 'a list'}, got {json_kind(value)}")
    return value


def _render(col: str, messages: Any) -> str:
    """`render_dialogue` for a row's field, its complaints naming that field."""
    try:
        return render_dialogue(_typed(col, messages, list))
    except (TypeError, ValueError) as e:
        raise _RowError(col, str(e)) from None


def _text(row: dict, name: str, cols: dict[str, str]) -> str:
    col, value = _get(row, name, cols)
    if not _typed(col, value, str).strip():
        raise _RowError(col, f"empty {'response' if name in ('chosen', 'rejected') else name}")
    return value


def _split_messages(col: str, messages: Any) -> tuple[str, str]:
    """(prompt ending in "\\n\\nAssistant:", " " + last assistant content) of a dialogue ending with the assistant."""
    _render(col, messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError(col, "dialogue has no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise _RowError(col, f"last turn is {messages[-1]['role']!r}, expected 'assistant'")
    if not any(m["content"].strip() for m in messages[:-1]):
        raise _RowError(col, "empty prompt (no turn before the assistant response)")
    if not messages[-1]["content"].strip():
        raise _RowError(col, "empty response")
    return render_dialogue(messages[:-1]) + ASSISTANT, " " + messages[-1]["content"]


def _split_hh(col_c: str, chosen: str, col_r: str, rejected: str) -> tuple[str, str, str]:
    """(shared prompt ending in "\\n\\nAssistant:", chosen response, rejected response) of two HH-RLHF dialogues."""
    ends = []
    for col, text in ((col_c, chosen), (col_r, rejected)):
        if (i := text.rfind(ASSISTANT)) < 0:
            raise _RowError(col, "dialogue has no assistant turn")
        ends.append(i + len(ASSISTANT))
    # Normally each dialogue's last marker ends the shared prompt. In a few real rows the response itself invents a
    # further "\n\nAssistant:" turn (HH harmless-base test rows 1255, 1689 of our sample), so the shared prompt is the
    # other dialogue's; a marker that ends neither dialogue's last turn would mean the two diverged earlier.
    for end, text, other in ((ends[0], chosen, rejected), (ends[1], rejected, chosen)):
        if other.startswith(text[:end]):
            return text[:end], chosen[end:], rejected[end:]
    raise _RowError(col_r, "dialogues do not share a prompt")


def _distinct(col: str, chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise _RowError(col, "identical to chosen")


def _sft_prompt_completion(row: dict, cols: dict[str, str]) -> SFTExample:
    return SFTExample(_text(row, "prompt", cols), _text(row, "completion", cols))


def _sft_messages(row: dict, cols: dict[str, str]) -> SFTExample:
    return SFTExample(*_split_messages(*_get(row, "messages", cols)))


def _pref_pairwise(row: dict, cols: dict[str, str]) -> PreferenceGroup:
    (col_c, chosen), (col_r, rejected) = _get(row, "chosen", cols), _get(row, "rejected", cols)
    if isinstance(chosen, list) or isinstance(rejected, list):
        # Conversational (TRL style): an optional prompt message list, then chosen/rejected lists ending in the answer.
        col_p = cols.get("prompt", "prompt")
        prefix = row[col_p] if row.get(col_p) is not None else []
        _render(col_p, prefix)
        prompt, good = _split_messages(col_c, prefix + _typed(col_c, chosen, list))
        prompt_r, bad = _split_messages(col_r, prefix + _typed(col_r, rejected, list))
        if prompt_r != prompt:
            raise _RowError(col_r, "dialogues do not share a prompt")
    else:
        prompt, good, bad = _text(row, "prompt", cols), _text(row, "chosen", cols), _text(row, "rejected", cols)
    _distinct(col_r, good, bad)
    return PreferenceGroup(prompt, (good, bad), ((0, 1),))


def _pref_hh(row: dict, cols: dict[str, str]) -> PreferenceGroup:
    (col_c, chosen), (col_r, rejected) = _get(row, "chosen", cols), _get(row, "rejected", cols)
    prompt, good, bad = _split_hh(col_c, _typed(col_c, chosen, str), col_r, _typed(col_r, rejected, str))
    # No empty-response check here: an empty final assistant turn is a real HH answer (the assistant said nothing,
    # preferred over a harmful reply in 4 of the 1,800 harmless-base rows), unlike an empty string in a flat column.
    _distinct(col_r, good, bad)
    return PreferenceGroup(prompt, (good, bad), ((0, 1),))


def _pref_ranking(row: dict, cols: dict[str, str]) -> PreferenceGroup:
    prompt = _text(row, "prompt", cols)
    col_s, responses = _get(row, "responses", cols)
    col_k, ranks = _get(row, "ranks", cols)
    k = len(_typed(col_s, responses, list))
    if k < 2:
        raise _RowError(col_s, f"a ranking needs at least 2 responses, got {k}")
    for i, response in enumerate(responses, 1):
        if not isinstance(response, str) or not response.strip():
            raise _RowError(col_s, f"response {i} is {'empty' if isinstance(response, str) else json_kind(response)}")
    stripped = [r.strip() for r in responses]
    if len(set(stripped)) < k:
        dup = next(i for i, r in enumerate(stripped) if stripped.index(r) != i)
        raise _RowError(col_s, f"response {dup + 1} duplicates response {stripped.index(stripped[dup]) + 1}")
    if len(_typed(col_k, ranks, list)) != k:
        raise _RowError(col_k, f"{len(ranks)} ranks for {k} responses")
    if any(not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= k for r in ranks) or len(set(ranks)) < 2:
        # equal ranks are ties (labelers may tie, rlhf_core.label): no comparison between them
        raise _RowError(col_k, f"ranks {reprlib.repr(ranks)} are not a permutation of 1..{k} (1 = best; equal ranks "
                        "are ties, not all equal)")
    return PreferenceGroup(prompt, tuple(responses), ranking_pairs(ranks))


def _prompt_column(row: dict, cols: dict[str, str]) -> str:
    col, value = _get(row, "prompt", cols)
    if isinstance(value, list):  # a conversational prompt (TRL prompt-only style): the turns so far
        return _prompt_messages({col: value}, {"messages": col})
    return _text(row, "prompt", cols)


def _prompt_messages(row: dict, cols: dict[str, str]) -> str:
    col, messages = _get(row, "messages", cols)
    # A dialogue that ends with the assistant is an SFT row: its prompt is everything before that reference answer.
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        return _split_messages(col, messages)[0]
    if not (text := _render(col, messages)).strip():
        raise _RowError(col, "empty prompt")
    return text + ASSISTANT


# ------------------------------------------------------------------------------------------------ public loaders


def load_sft(source: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None, split: str = "train",
             on_error: str = "raise", report_path: str | Path | None = None) -> list[SFTExample]:
    """SFT examples from `prompt_completion` (prompt, completion) or `messages` (chat ending in the assistant) rows."""
    parsers = {"prompt_completion": _sft_prompt_completion, "messages": _sft_messages}
    return _load(source, format, parsers, _detect_sft, columns, split, on_error, report_path)


def load_preferences(source: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                     split: str = "train", on_error: str = "raise",
                     report_path: str | Path | None = None) -> list[PreferenceGroup]:
    """Preference groups from `preference` (prompt/chosen/rejected, text or messages), `hh` or `ranking` rows."""
    parsers = {"preference": _pref_pairwise, "hh": _pref_hh, "ranking": _pref_ranking}
    return _load(source, format, parsers, _detect_preference, columns, split, on_error, report_path)


def load_prompts(source: str | Path, *, columns: dict[str, str] | None = None, split: str = "train",
                 on_error: str = "raise", report_path: str | Path | None = None) -> list[str]:
    """Prompts for RL and evaluation: the `prompt` column, or `messages` rendered and ending in "\\n\\nAssistant:".

    An HH file (chosen/rejected dialogues) yields its shared prompts, so the preference data's prompts can drive PPO.
    """
    parsers = {"prompt": _prompt_column, "messages": _prompt_messages, "hh": lambda row, c: _pref_hh(row, c).prompt}
    return _load(source, "auto", parsers, _detect_prompts, columns, split, on_error, report_path)


def read_corpus(source: str | Path, *, on_error: str = "raise", report_path: str | Path | None = None) -> list[str]:
    """A pretraining (or PPO-ptx) corpus: the `text` of every row, each a non-empty string; bad rows as in `load_sft`."""
    parsers = {"text": lambda row, cols: _text(row, "text", cols)}
    return _load(source, "auto", parsers, lambda has, first: "text" if has("text") else None, None, "train", on_error,
                 report_path)


def is_corpus(source: str | Path) -> bool:
    """Whether `source` is a corpus for `read_corpus` rather than SFT data: its first row has a `text` column and no
    prompt, completion or messages column. A missing or unreadable source is not: its loader then says why."""
    try:
        rows = read_rows(source, "train")[1]
    except DataError:
        return False
    first = next((row for _, row in rows if isinstance(row, dict) and row), {})
    return "text" in first and not {"prompt", "completion", "messages"} & first.keys()


def load_rows(source: str | Path, *, split: str = "train") -> tuple[str, list[dict]]:
    """Read `source` into (display name, list of row dicts); raise `DataError` at the first unreadable row."""
    name, rows = read_rows(source, split)
    for _, row in rows:
        if isinstance(row, DataError):
            raise row
    return name, [row for _, row in rows]


def _detect_sft(has: Callable[[str], bool], first: Callable[[str], Any]) -> str | None:
    return "messages" if has("messages") else "prompt_completion" if has("prompt") and has("completion") else None


def _detect_preference(has: Callable[[str], bool], first: Callable[[str], Any]) -> str | None:
    if has("responses") and has("ranks"):
        return "ranking"
    if not (has("chosen") and has("rejected")):
        return None
    # HH rows hold two whole dialogues as text and no prompt column; message lists carry their prompt themselves.
    return "preference" if has("prompt") or isinstance(first("chosen"), list) else "hh"


def _detect_prompts(has: Callable[[str], bool], first: Callable[[str], Any]) -> str | None:
    found = [n for n, ok in (("prompt", has("prompt")), ("messages", has("messages")),
                             ("hh", has("chosen") and has("rejected"))) if ok]
    return found[0] if found else None


def _load(source, format, parsers, detect, columns, split, on_error, report_path) -> list:
    """Parse every row of `source`; raise at the first bad row, or skip, count and report the bad rows."""
    if format != "auto" and format not in parsers:
        raise ValueError(f"Unknown format: {format!r} (expected one of: auto, {', '.join(parsers)})")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    cols = dict(columns or {})
    if unknown := sorted(set(cols) - set(COLUMNS)):
        raise ValueError(f"Unknown column key: {unknown[0]!r} (expected some of: {', '.join(COLUMNS)})")
    name, rows = read_rows(source, split)
    found = format if format != "auto" else _detect(name, rows, detect, cols, parsers)
    records, errors = [], []
    for row_no, row in rows:
        error = row if isinstance(row, DataError) else None
        if error is None:
            try:
                records.append(parsers[found](row, cols))
                continue
            except _RowError as e:
                error = DataError(name, row_no, e.field, e.reason)
        if on_error == "raise":
            raise error
        errors.append(error)
    if report_path is not None:
        write_json(report_path, {"source": name, "rows_total": len(rows), "rows_ok": len(records),
                                 "rows_skipped": len(errors),
                                 "errors": [{"row": e.row, "field": e.field, "reason": e.reason} for e in errors]})
    if not records:
        first_error = str(errors[0]).removeprefix(f"{name}, ")
        raise DataError(name, None, None, f"all {len(rows)} rows are invalid (first: {first_error})")
    return records


def _detect(name: str, rows: list, detect: Callable, cols: dict[str, str], parsers: dict) -> str | None:
    """The format of the first object row whose columns `detect` knows: every reader yields rows with one set of
    columns, and the first rows that do not fit (a `{}`, a typo) are then reported as bad rows, not a bad file."""
    objects = [row for _, row in rows if isinstance(row, dict)]
    for row in objects:
        if found := detect(lambda n, row=row: cols.get(n, n) in row, lambda n, row=row: row.get(cols.get(n, n))):
            return found
    if objects:
        raise DataError(name, None, None, f"cannot detect the format from columns {sorted(objects[0])}; pass format= "
                        f"({', '.join(parsers)}) or columns= to map names")
    return None  # no object row at all: every row is already a DataError


# ----------------------------------------------------------------------------------------------------------------------
# what a stage reads


@dataclass(frozen=True)
class DataInput:
    """One data set a stage reads: where (a resolved local path or a hub name) and how that stage loads it. Stages
    declare theirs (`<stage>.inputs(cfg)`), so the stage, the data stage and MLflow lineage load them one way."""

    source: str
    """local path (resolved under base.data_dir) or hub dataset name"""
    loader: Callable[..., list]
    """load(source, **options, report_path=...) -> records"""
    options: tuple[tuple[str, Any], ...] = ()
    """the loader's keyword options (format, columns, on_error, ...)"""

    def load(self, report_path: str | Path | None = None) -> list:
        kw = dict(self.options)
        if report_path is not None and "on_error" in kw:
            kw["report_path"] = report_path
        return self.loader(self.source, **kw)

    @property
    def local(self) -> Path | None:
        """The local file or folder, or None for a hub dataset."""
        path = Path(self.source)
        return path if path.exists() else None


def declare(cfg, specs: dict[str, str | None], loader: Callable[..., list], **options) -> dict[str, DataInput]:
    """{config key: DataInput} for the data specs a stage names (None = not used), resolved by cfg.data_path."""
    return {key: DataInput(cfg.data_path(spec), loader, tuple(options.items())) for key, spec in specs.items() if spec}
