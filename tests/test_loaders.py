"""Tests for rlhf_core.loaders: every source and format, strict validation, skip reports, and the real HH sample."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_core.loaders import (
    DataError,
    PreferenceGroup,
    SFTExample,
    is_corpus,
    load_preferences,
    load_prompts,
    load_rows,
    load_sft,
    ranking_pairs,
    read_corpus,
    render_dialogue,
)

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "comparisons.jsonl.gz"

SFT_ROWS = [{"prompt": "Q: 2+2?", "completion": " 4"}, {"prompt": "Q: capital of France?", "completion": " Paris"}]
PREF_ROWS = [{"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Go away."},
             {"prompt": "Count to 2.", "chosen": " 1, 2", "rejected": " 7"}]


def write_lines(path: Path, rows: list) -> Path:
    """JSON lines; a `bytes` item is written raw (for malformed lines)."""
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------------ formats


def test_prompt_completion_jsonl(tmp_path):
    assert load_sft(write_lines(tmp_path / "sft.jsonl", SFT_ROWS)) == [SFTExample("Q: 2+2?", " 4"),
                                                                       SFTExample("Q: capital of France?", " Paris")]


def test_render_dialogue_uses_project_markers():
    text = render_dialogue([{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello."), user("Bye")])
    assert text == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye"


def test_messages_split_at_last_assistant_turn(tmp_path):
    rows = [{"messages": [user("Hi"), bot("Hello."), user("2+2?"), bot("4")]}]
    [ex] = load_sft(write_lines(tmp_path / "chat.jsonl", rows), format="messages")
    assert ex.prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant:"
    assert ex.completion == " 4"
    assert ex.prompt + ex.completion == render_dialogue(rows[0]["messages"])


def test_preference_text(tmp_path):
    groups = load_preferences(write_lines(tmp_path / "p.jsonl", PREF_ROWS))
    assert groups[0] == PreferenceGroup("Say hi.", (" Hi!", " Go away."), ((0, 1),))
    assert len(groups) == 2


def test_conversational_preference_shares_its_prefix(tmp_path):
    history = [user("Hi"), bot("Hello."), user("Tell me a joke")]
    implicit = {"chosen": [*history, bot("Knock knock.")], "rejected": [*history, bot("No.")]}
    explicit = {"prompt": history, "chosen": [bot("Knock knock.")], "rejected": [bot("No.")]}
    a, b = load_preferences(write_lines(tmp_path / "conv.jsonl", [implicit, explicit]))
    assert a == b == PreferenceGroup(render_dialogue(history) + "\n\nAssistant:", (" Knock knock.", " No."), ((0, 1),))


def test_hh_split_keeps_the_leading_space_and_reconstructs(tmp_path):
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?"
    row = {"chosen": prompt + "\n\nAssistant: Sure.", "rejected": prompt + "\n\nAssistant: No."}
    [g] = load_preferences(write_lines(tmp_path / "hh.jsonl", [row]), format="hh")
    assert g.prompt == prompt + "\n\nAssistant:" and g.responses == (" Sure.", " No.") and g.pairs == ((0, 1),)


def test_hh_response_that_invents_a_further_turn(tmp_path):
    # As in real rows: the chosen response itself contains "\n\nAssistant:", so its last marker is not the prompt's end.
    prompt = "\n\nHuman: Are you there?\n\nAssistant:"
    row = {"chosen": prompt + " Yes.  Human: ok?\n\nAssistant: Fine.", "rejected": prompt + " No."}
    [g] = load_preferences(write_lines(tmp_path / "hh.jsonl", [row]), format="hh")
    assert g.prompt == prompt and g.responses == (" Yes.  Human: ok?\n\nAssistant: Fine.", " No.")


def test_hh_keeps_an_empty_final_turn(tmp_path):
    # Real HH rows prefer an assistant that says nothing over a harmful reply; that is data, not a defect.
    row = {"chosen": "\n\nHuman: Mock me.\n\nAssistant: ", "rejected": "\n\nHuman: Mock me.\n\nAssistant: You fool."}
    [g] = load_preferences(write_lines(tmp_path / "hh.jsonl", [row]))
    assert g.responses == (" ", " You fool.")


def test_ranking_k4_gives_six_ordered_pairs(tmp_path):
    row = {"prompt": "Name a fruit.", "responses": [" apple", " rock", " pear", " fig"], "ranks": [2, 4, 1, 3]}
    [g] = load_preferences(write_lines(tmp_path / "rank.jsonl", [row]))
    assert g.responses == (" apple", " rock", " pear", " fig")
    # best first: pear (2), apple (0), fig (3), rock (1)
    assert g.pairs == ((2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1))


def test_split_into_pairs():
    g = PreferenceGroup("p", ("a", "b", "c"), ranking_pairs([3, 1, 2]))
    assert g.split_into_pairs() == [PreferenceGroup("p", ("b", "c"), ((0, 1),)),
                                    PreferenceGroup("p", ("b", "a"), ((0, 1),)),
                                    PreferenceGroup("p", ("c", "a"), ((0, 1),))]
    with pytest.raises(ValueError, match="does not index"):
        PreferenceGroup("p", ("a", "b"), ((0, 2),))


@given(st.integers(2, 8).flatmap(lambda k: st.permutations(list(range(1, k + 1)))))
def test_ranking_pairs_follow_the_order(ranks):
    pairs = ranking_pairs(ranks)
    assert len(pairs) == math.comb(len(ranks), 2)
    assert all(ranks[w] < ranks[lo] for w, lo in pairs)
    assert {frozenset(p) for p in pairs} == {frozenset((i, j)) for i in range(len(ranks)) for j in range(i)}


def test_prompts_from_prompt_messages_and_hh(tmp_path):
    assert load_prompts(write_lines(tmp_path / "a.jsonl", SFT_ROWS)) == ["Q: 2+2?", "Q: capital of France?"]
    chats = [{"messages": [user("Hi")]}, {"messages": [user("2+2?"), bot("4")]}]  # a reference answer is dropped
    assert load_prompts(write_lines(tmp_path / "b.jsonl", chats)) == ["\n\nHuman: Hi\n\nAssistant:",
                                                                      "\n\nHuman: 2+2?\n\nAssistant:"]
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}
    assert load_prompts(write_lines(tmp_path / "c.jsonl", [hh])) == ["\n\nHuman: Hi\n\nAssistant:"]


def test_column_mapping_and_errors_name_the_file_column(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in PREF_ROWS]
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert load_preferences(write_lines(tmp_path / "m.jsonl", rows), columns=cols)[0].responses == (" Hi!", " Go away.")
    rows[1]["good"] = rows[1]["bad"]
    with pytest.raises(DataError, match=r"row 2, field 'bad': identical to chosen"):
        load_preferences(write_lines(tmp_path / "m.jsonl", rows), columns=cols)
    with pytest.raises(ValueError, match="Unknown column key: 'promt'"):
        load_sft(tmp_path / "m.jsonl", columns={"promt": "question"})


def test_bad_arguments_and_undetectable_format(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match="Unknown format"):
        load_sft(path, format="alpaca")
    with pytest.raises(ValueError, match="on_error"):
        load_sft(path, on_error="ignore")
    with pytest.raises(DataError, match=r"x.jsonl: cannot detect the format from columns \['text'\]"):
        load_sft(path)


# ------------------------------------------------------------------------------------------------ sources


def test_json_array_json_lines_and_gzip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(SFT_ROWS, indent=2))
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in SFT_ROWS))
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(write_lines(tmp_path / "g.jsonl", SFT_ROWS).read_bytes()))
    (tmp_path / "g.json.gz").write_bytes(gzip.compress(json.dumps(SFT_ROWS).encode()))
    for name in ("a.json", "l.json", "g.jsonl.gz", "g.json.gz"):
        assert load_sft(tmp_path / name) == load_sft(tmp_path / "g.jsonl"), name
    (tmp_path / "bad.json").write_text('[{"prompt": "p", "completion": "c"}, 3]')
    with pytest.raises(DataError, match=r"bad.json, row 2: expected a JSON object, got a number"):
        load_sft(tmp_path / "bad.json")


def test_parquet_csv_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(PREF_ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    expected = load_preferences(write_lines(tmp_path / "p.jsonl", PREF_ROWS))
    for name in ("p.parquet", "p.csv", "single", "dict"):
        assert load_preferences(tmp_path / name) == expected, name
    assert load_preferences(tmp_path / "dict", split="test") == expected[1:]
    with pytest.raises(DataError, match="no split 'validation' \\(available: train, test\\)"):
        load_preferences(tmp_path / "dict", split="validation")


def test_csv_empty_cell_names_row_and_field(tmp_path):
    (tmp_path / "s.csv").write_text('prompt,completion\n"Q: 1+1?", 2\n"Q: 3+3?",\n')
    with pytest.raises(DataError, match=r"s.csv, row 2, field 'completion': missing value"):
        load_sft(tmp_path / "s.csv")


def test_load_rows_returns_name_and_dicts(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", SFT_ROWS)
    assert load_rows(path) == (str(path), SFT_ROWS)


# ------------------------------------------------------------------------------------------------ validation

PC, PREF, RANK = SFT_ROWS[0], PREF_ROWS[0], {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]}
HH = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
MSG = {"messages": [user("hi"), bot("yes")]}
TEXT = {"text": "A document."}
DEEP, DIGITS = b"[" * 5000, b"1" * 5000  # past Python's JSON nesting limit; past its int-from-text limit (4,300 digits)


def rank_line(ranks: bytes) -> bytes:
    return b'{"prompt": "p", "responses": ["a", "b", "c"], "ranks": ' + ranks + b"}"


# (id, loader, good first row, bad second row, field named, reason fragment)
MALFORMED = [
    ("missing-field", load_sft, PC, {"prompt": "p"}, "completion", "missing field"),
    ("null-value", load_sft, PC, {"prompt": None, "completion": "c"}, "prompt", "missing value"),
    ("number-prompt", load_sft, PC, {"prompt": 17, "completion": "c"}, "prompt", "expected a string, got a number"),
    ("blank-completion", load_sft, PC, {"prompt": "p", "completion": " \n\t"}, "completion", "empty completion"),
    ("blank-prompt", load_preferences, PREF, {**PREF, "prompt": "  "}, "prompt", "empty prompt"),
    ("empty-chosen", load_preferences, PREF, {**PREF, "chosen": ""}, "chosen", "empty response"),
    ("chosen-is-rejected", load_preferences, PREF, {**PREF, "rejected": PREF["chosen"]}, "rejected",
     "identical to chosen"),
    ("rank-all-tied", load_preferences, RANK, {**RANK, "ranks": [2, 2, 2]}, "ranks", "not a permutation of 1..3"),
    ("rank-out-of-range", load_preferences, RANK, {**RANK, "ranks": [1, 2, 4]}, "ranks", "not a permutation"),
    ("rank-not-int", load_preferences, RANK, {**RANK, "ranks": [1, 2, "3"]}, "ranks", "not a permutation"),
    ("rank-length", load_preferences, RANK, {**RANK, "ranks": [1, 2]}, "ranks", "2 ranks for 3 responses"),
    ("one-response", load_preferences, RANK, {**RANK, "responses": ["a"], "ranks": [1]}, "responses",
     "at least 2 responses, got 1"),
    ("duplicate-responses", load_preferences, RANK, {**RANK, "responses": ["a", "b", "a"]}, "responses",
     "response 3 duplicates response 1"),
    ("hh-no-assistant", load_preferences, HH, {**HH, "chosen": "\n\nHuman: hi"}, "chosen",
     "dialogue has no assistant turn"),
    ("hh-no-shared-prompt", load_preferences, HH, {**HH, "rejected": "\n\nHuman: bye\n\nAssistant: no"}, "rejected",
     "dialogues do not share a prompt"),
    ("last-turn-user", load_sft, MSG, {"messages": [user("hi"), bot("yes"), user("and?")]}, "messages",
     "last turn is 'user', expected 'assistant'"),
    ("no-assistant-turn", load_sft, MSG, {"messages": [user("hi")]}, "messages", "no assistant turn"),
    ("unknown-role", load_sft, MSG, {"messages": [{"role": "bot", "content": "x"}, bot("y")]}, "messages",
     "unknown role 'bot'"),
    ("not-json", load_sft, PC, b'{"prompt": "p", "completion": ', None, "not valid JSON"),
    ("not-an-object", load_sft, PC, b'["p", "c"]', None, "expected a JSON object, got a list"),
    ("bad-utf8", load_sft, PC, b'{"prompt": "caf\xe9", "completion": "c"}', None, "not valid UTF-8 (byte 0xe9"),
    ("deep-nesting-line", load_sft, PC, DEEP, None, "not valid JSON (nested too deeply)"),
    ("deep-nesting-in-field", load_sft, PC, b'{"prompt": ' + DEEP + b"]" * 5000 + b', "completion": "c"}', None,
     "nested too deeply"),
    ("deep-but-legal-nesting", load_preferences, RANK, rank_line(b"[1, 2, " + b"[" * 900 + b"]" * 900 + b"]"),
     "ranks", "ranks [1, 2, [[[[[[...]]]]]]] are not a perm"),
    ("5000-digit-integer", load_sft, PC, b'{"prompt": "p", "completion": ' + DIGITS + b"}", None,
     "not valid JSON (an integer longer than 4300 digits)"),
    ("lone-surrogate", load_sft, PC, b'{"prompt": "p", "completion": "ok \\ud800"}', "completion",
     "not valid Unicode: lone surrogate '\\ud800'"),
    ("lone-surrogate-in-a-message", load_sft, MSG, b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
     "messages", "not valid Unicode: lone surrogate"),
    ("lone-surrogate-in-a-key", load_sft, PC, b'{"prompt": "p", "completion": "c", "\\ud800": 1}', "'\\ud800'",
     "not valid Unicode: lone surrogate"),
    ("nul-byte", load_sft, PC, b'{"prompt": "p\x00", "completion": "c"}', None, "not valid JSON (Invalid control"),
    ("nul-escape", load_sft, PC, {"prompt": "p\x00", "completion": "c"}, "prompt", "contains a NUL character"),
    ("rank-nan", load_preferences, RANK, rank_line(b"[1, 2, NaN]"), "ranks", "ranks [1, 2, nan] are not a perm"),
    ("rank-infinity", load_preferences, RANK, rank_line(b"[1, 2, Infinity]"), "ranks", "are not a permutation"),
    ("rank-huge-float", load_preferences, RANK, rank_line(b"[1, 2, 1e999]"), "ranks", "ranks [1, 2, inf] are not"),
    ("rank-float", load_preferences, RANK, rank_line(b"[1, 2, 3.0]"), "ranks", "are not a permutation"),
    ("row-is-null", load_sft, PC, b"null", None, "expected a JSON object, got null"),
    ("row-is-a-string", load_prompts, PC, b'"Q: 2+2?"', None, "expected a JSON object, got a string"),
    ("role-not-a-string", load_sft, MSG, {"messages": [{"role": ["user"], "content": "x"}, bot("y")]}, "messages",
     "message 1 has unknown role ['user']"),
    ("corpus-missing-text", read_corpus, TEXT, {"txt": "x"}, "text", "missing field"),
    ("corpus-not-a-string", read_corpus, TEXT, {"text": ["x"]}, "text", "expected a string, got a list"),
    ("corpus-empty-text", read_corpus, TEXT, {"text": " \n"}, "text", "empty text"),
    ("corpus-lone-surrogate", read_corpus, TEXT, b'{"text": "\\ud83d"}', "text", "not valid Unicode: lone surrogate"),
]


@pytest.mark.parametrize(("loader", "good", "bad", "field", "reason"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_row_names_file_row_and_field(tmp_path, loader, good, bad, field, reason):
    path = write_lines(tmp_path / "broken_data.jsonl", [good, bad, good])
    with pytest.raises(DataError) as info:
        loader(path)
    err, msg = info.value, str(info.value)
    assert (err.file, err.row, err.field) == (str(path), 2, field)
    assert str(path) in msg and "row 2" in msg and reason in msg
    assert (f"field {field!r}" in msg) if field else ("field" not in msg)


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


GZ = gzipped(b"\n".join(json.dumps(PC).encode() for _ in range(50)))
# (id, file name, bytes, row named, reason fragment): failures of a whole file, or of a document that is one row
BAD_FILES = [
    ("gzip-corrupt-body", "c.jsonl.gz", GZ[:10] + b"\xff" * 8 + GZ[18:], None, "not a valid gzip file (error: "),
    ("gzip-truncated", "t.jsonl.gz", GZ[: len(GZ) // 2], None, "not a valid gzip file (EOFError: "),
    ("gzip-bad-header", "h.json.gz", b"not gzip", None, "not a valid gzip file (BadGzipFile: "),
    ("gzip-bad-crc", "k.jsonl.gz", GZ[:-8] + bytes(4) + GZ[-4:], None, "CRC check failed"),
    ("json-too-deep", "d.json", DEEP, None, "not valid JSON (nested too deeply)"),
    ("json-5000-digits", "i.json", b"[" + DIGITS + b"]", None, "an integer longer than 4300 digits"),
    ("json-not-utf8", "u.json", b'[{"prompt": "\xff"}]', None, "not valid UTF-8 (byte 0xff on line 1)"),
    ("json-is-a-string", "s.json", b'"hello"', 1, "expected a JSON object, got a string"),
    ("json-is-a-number", "n.json", b"42", 1, "expected a JSON object, got a number"),
    ("empty-jsonl", "e.jsonl", b"", None, "no rows (empty file)"),
    ("empty-json", "e.json", b"", None, "no rows (empty file)"),
    ("empty-gzip", "e.jsonl.gz", gzipped(b""), None, "no rows (empty file)"),
    ("empty-csv", "e.csv", b"", None, "no rows"),
    ("empty-parquet", "e.parquet", b"", None, "cannot load as parquet"),
    ("parquet-garbage", "g.parquet", b"PAR1 not really", None, "cannot load as parquet"),
    ("csv-unclosed-quote", "q.csv", b'prompt,completion\n"p,c\nx,y\n', None, "cannot load as csv"),
    ("csv-not-utf8", "b.csv", b"prompt,completion\ncaf\xe9,c\n", None, "cannot load as csv"),
]


@pytest.mark.parametrize(("name", "data", "row", "reason"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_malformed_file_raises_data_error_in_both_modes(tmp_path, name, data, row, reason, on_error):
    (path := tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as info:
        load_sft(path, on_error=on_error)
    assert (info.value.file, info.value.row) == (str(path), row if on_error == "raise" else None)
    assert reason in str(info.value)  # under "skip", inside "all 1 rows are invalid (first: ...)"


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "locked.jsonl", SFT_ROWS)

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)  # root reads any file, so chmod cannot make one unreadable
    with pytest.raises(DataError, match=r"locked.jsonl: cannot read the file \(Permission denied\)"):
        load_sft(path, on_error="skip")


def test_first_row_empty_object_is_a_bad_row_not_a_crash(tmp_path):
    path = write_lines(tmp_path / "first_empty.jsonl", [{}, *SFT_ROWS])
    with pytest.raises(DataError) as info:
        load_sft(path)
    assert (info.value.row, info.value.field, info.value.reason) == (1, "prompt", "missing field")
    assert load_sft(path, on_error="skip") == [SFTExample(**r) for r in SFT_ROWS]
    with pytest.raises(DataError, match=r"only_empty.jsonl: cannot detect the format from columns \[\]"):
        load_sft(write_lines(tmp_path / "only_empty.jsonl", [{}, {}]))


def test_skip_reports_lone_surrogates_and_loads_the_rest(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [SFT_ROWS[0], b'{"prompt": "\\udfff", "completion": "c"}', SFT_ROWS[1]])
    report = tmp_path / "report.json"
    assert load_sft(path, on_error="skip", report_path=report) == [SFTExample(**r) for r in SFT_ROWS]
    assert json.loads(report.read_text())["errors"] == [
        {"row": 2, "field": "prompt", "reason": "not valid Unicode: lone surrogate '\\udfff'"}]


def test_file_not_found_and_empty_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_sft(tmp_path / "missing.jsonl")
    assert (info.value.row, str(info.value)) == (None, f"{tmp_path / 'missing.jsonl'}: no such file or directory")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows \(empty file\)"):
        load_preferences(tmp_path / "empty.jsonl")
    (tmp_path / "header_only.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"header_only.csv: no rows"):
        load_sft(tmp_path / "header_only.csv")


def test_skip_counts_bad_rows_and_writes_report(tmp_path):
    rows = [SFT_ROWS[0], b"not json", {"prompt": "p"}, SFT_ROWS[1], {"prompt": "p", "completion": ""}]
    path, report = write_lines(tmp_path / "mixed.jsonl", rows), tmp_path / "reports" / "sft.json"
    assert load_sft(path, on_error="skip", report_path=report) == [SFTExample(**r) for r in SFT_ROWS]
    assert json.loads(report.read_text()) == {
        "source": str(path), "rows_total": 5, "rows_ok": 2, "rows_skipped": 3,
        "errors": [{"row": 2, "field": None, "reason": "not valid JSON (Expecting value at column 1)"},
                   {"row": 3, "field": "completion", "reason": "missing field"},
                   {"row": 5, "field": "completion", "reason": "empty completion"}]}
    assert sorted(p.name for p in report.parent.iterdir()) == ["sft.json"]  # atomic: no temp files left behind
    with pytest.raises(DataError, match="row 2"):
        load_sft(path)  # the default still stops at the first bad row


def test_skip_still_raises_when_every_row_is_bad(tmp_path):
    path = write_lines(tmp_path / "all_bad.jsonl", [{"prompt": "p", "completion": " "}, b"[]"])
    report = tmp_path / "r.json"
    with pytest.raises(DataError, match=r"all_bad.jsonl: all 2 rows are invalid \(first: row 1, field 'completion'"):
        load_sft(path, on_error="skip", report_path=report)
    assert json.loads(report.read_text())["rows_skipped"] == 2


def test_data_error_pickles():
    err = pickle.loads(pickle.dumps(DataError("d.jsonl", 3, "chosen", "empty response")))
    assert str(err) == "d.jsonl, row 3, field 'chosen': empty response" and err.row == 3


def test_import_pulls_in_neither_prefect_nor_dvc():
    code = "import sys, rlhf_core.loaders; print(sorted({'prefect', 'dvc', 'datasets'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ------------------------------------------------------------------------------------------------ corpus


def test_read_corpus_from_every_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows, texts = [{"text": "One."}, {"text": "Two, with a comma."}], ["One.", "Two, with a comma."]
    write_lines(tmp_path / "c.jsonl", rows)
    (tmp_path / "c.jsonl.gz").write_bytes(gzipped((tmp_path / "c.jsonl").read_bytes()))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    for name in ("c.jsonl", "c.jsonl.gz", "c.json", "c.parquet", "c.csv", "disk"):
        assert read_corpus(tmp_path / name) == texts, name
        assert is_corpus(tmp_path / name), name


def test_read_corpus_skips_and_reports_bad_rows(tmp_path):
    path = write_lines(tmp_path / "corpus.jsonl", [TEXT, {"text": 7}, b"{", TEXT])
    report = tmp_path / "report.json"
    assert read_corpus(path, on_error="skip", report_path=report) == [TEXT["text"]] * 2
    assert [(e["row"], e["field"]) for e in json.loads(report.read_text())["errors"]] == [(2, "text"), (3, None)]
    with pytest.raises(DataError, match=r"corpus.jsonl, row 2, field 'text': expected a string, got a number"):
        read_corpus(path)


def test_is_corpus_tells_a_corpus_from_sft_data(tmp_path):
    assert is_corpus(write_lines(tmp_path / "a.jsonl", [b"not json", {}, TEXT]))  # the first row with columns
    assert not is_corpus(write_lines(tmp_path / "b.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}]))
    assert not is_corpus(write_lines(tmp_path / "c.jsonl", SFT_ROWS))
    assert not is_corpus(write_lines(tmp_path / "d.jsonl", [{"messages": [user("hi"), bot("yo")], "text": "t"}]))
    assert not is_corpus(tmp_path / "missing.jsonl")  # load_sft then names the problem
    assert not is_corpus(write_lines(tmp_path / "e.jsonl", [b"{"]))


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("fmt", ["hh", "auto"])
def test_real_hh_sample_loads_every_row(fmt):
    if not HH_SAMPLE.exists():
        pytest.skip(f"real HH sample not present at {HH_SAMPLE}")
    with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    groups = load_preferences(HH_SAMPLE, format=fmt)
    assert len(raw) == len(groups) == 1800
    for row, g in zip(raw, groups, strict=True):
        assert g.prompt.startswith("\n\nHuman:") and g.prompt.endswith("\n\nAssistant:")
        assert (g.prompt + g.responses[0], g.prompt + g.responses[1]) == (row["chosen"], row["rejected"])
        assert g.responses[0] != g.responses[1] and g.pairs == ((0, 1),)
