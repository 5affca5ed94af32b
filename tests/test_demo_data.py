"""The demo data set: byte-stable, held-out eval messages, the schema every stage reads, and headroom above SFT."""

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest

from rlhf_core.config import DataConfig
from rlhf_core.demo_data import generate, messages
from rlhf_core.labeler import SimulatedLabeler, user_message, words

SIZES = DataConfig(pretrain_docs=400, sft_train=300, sft_test=50, rankings_train=300, rankings_test=50, pairs_train=300,
                   pairs_test=50, rl_prompts=200, eval_prompts=100)  # fmt: skip
LAB = SimulatedLabeler()


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _digests(paths):
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in paths.items()}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), seed=0, data=SIZES)


def test_same_seed_same_bytes(paths, tmp_path, capsys):
    again = generate(tmp_path / "again", seed=0, data=SIZES)
    assert capsys.readouterr().out == ""
    assert _digests(again) == _digests(paths)
    other = _digests(generate(tmp_path / "other", seed=1, data=SIZES))
    assert other["pretrain"] != _digests(paths)["pretrain"] and other["pairs_train"] != _digests(paths)["pairs_train"]


def test_eval_messages_appear_in_no_training_file(paths):
    eval_messages = {user_message(r["prompt"]) for r in _rows(paths["eval_prompts"])}
    assert len(eval_messages) == SIZES.eval_prompts  # distinct prompts
    seen = {user_message(r["text"]) for r in _rows(paths["pretrain"]) if "Human:" in r["text"]}
    for name in ("sft_train", "sft_test", "rankings_train", "rankings_test", "pairs_train", "pairs_test", "rl_prompts"):
        seen |= {user_message(r["prompt"]) for r in _rows(paths[name])}
    assert len(seen) > 500 and not eval_messages & seen


def test_schema(paths):
    prompt = re.compile(r"\n\nHuman: [^\n]+\n\nAssistant:")
    assert {tuple(sorted(r)) for r in _rows(paths["pretrain"])} == {("text",)}
    for name in ("sft_train", "sft_test"):
        rows = _rows(paths[name])
        assert len(rows) == getattr(SIZES, name)
        assert all(set(r) == {"prompt", "completion"} and prompt.fullmatch(r["prompt"]) for r in rows)
        assert all(r["completion"].startswith(" ") and 3 <= len(words(r["completion"])) <= 30 for r in rows)
    for name in ("rankings_train", "rankings_test"):
        for r in _rows(paths[name]):
            assert set(r) == {"prompt", "responses", "ranks"} and prompt.fullmatch(r["prompt"])
            assert len(r["responses"]) == SIZES.k == len(set(r["responses"]))
            assert sorted(r["ranks"]) == list(range(1, SIZES.k + 1))
    for name in ("pairs_train", "pairs_test"):
        for r in _rows(paths[name]):
            assert set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
    for name in ("rl_prompts", "eval_prompts"):
        assert all(set(r) == {"prompt"} and prompt.fullmatch(r["prompt"]) for r in _rows(paths[name]))
    readme = paths["readme"].read_text()
    assert "seed 0" in readme and f"temperature {LAB.temperature}" in readme


def test_data_section_sets_the_labeler_noise(paths, tmp_path):
    noisy = generate(tmp_path, seed=0, data=dataclasses.replace(SIZES, labeler_temperature=4.0))
    assert "temperature 4.0" in noisy["readme"].read_text()

    def agreement(p):
        return np.mean([LAB.score(r["prompt"], r["chosen"]) > LAB.score(r["prompt"], r["rejected"]) for r in _rows(p)])
    assert agreement(noisy["pairs_train"]) < agreement(paths["pairs_train"]) - 0.1  # labels near coin flips at T=4


def test_messages_are_short_and_the_vocabulary_small(paths):
    assert all(4 <= len(words(m)) <= 15 for _, m in messages())
    vocab = set()
    for p in paths.values():
        vocab |= set(words(p.read_text(encoding="utf-8")))
    assert 200 < len(vocab) < 1500


def test_labels_prefer_the_higher_gold_most_of_the_time(paths):
    pairs = _rows(paths["pairs_train"])
    agree = np.mean([LAB.score(r["prompt"], r["chosen"]) > LAB.score(r["prompt"], r["rejected"]) for r in pairs])
    ranked = _rows(paths["rankings_train"])
    best_is_top = np.mean([r["ranks"][int(np.argmax(LAB.score_batch([r["prompt"]] * SIZES.k, r["responses"])))] == 1
                           for r in ranked])  # fmt: skip
    assert 0.7 < agree < 0.9 and best_is_top > 0.5


def test_sft_demonstrations_are_decent_but_leave_headroom(paths):
    sft = np.array([LAB.score(r["prompt"], r["completion"]) for r in _rows(paths["sft_train"])])
    ranked = np.array([LAB.score(r["prompt"], x) for r in _rows(paths["rankings_train"]) for x in r["responses"]])
    # measured at default sizes: SFT mean 0.82, all ranked responses 0.40, their 90th percentile 1.16, best SFT 1.46
    assert sft.mean() > ranked.mean() + 0.2
    assert sft.mean() < np.percentile(ranked, 90) - 0.2 and sft.mean() < sft.max() - 0.4
