"""Each stage on a tiny model, trained for real on CPU: losses fall, outputs exist, reload and load with plain
transformers; SFT resumes after a crash to the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_core.config import from_dict
from rlhf_core.models import load_causal_lm, load_reward_model, load_tokenizer, reward_model_from_lm, shift_reward
from rlhf_core.batching import collate, tokenize_example
from rlhf_core.forwards import score_texts

from .conftest import tiny_params


def test_pretrain_builds_tokenizer_with_distinct_pad_and_left_padding(tiny_run):
    cfg, results = tiny_run
    model_dir = results["pretrain"].outputs["model"]
    tok = load_tokenizer(str(model_dir))
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert (model_dir / "model.safetensors").exists() and not list(model_dir.glob("*.bin"))
    m = results["pretrain"].metrics
    assert m["eval/loss"] < math.log(cfg.pretrain.vocab_size)  # learned something beyond uniform


def test_sft_held_out_loss_falls_below_the_base_model(tiny_run):
    m = tiny_run[1]["sft"].metrics
    assert m["eval/loss"] < 0.8 * m["eval/base_loss"]
    assert m["eval/perplexity"] == pytest.approx(math.exp(m["eval/loss"]), rel=1e-3)


def test_sft_only_learns_the_completion_tokens(tiny_run):
    tok = load_tokenizer(str(tiny_run[1]["sft"].outputs["model"]))
    ids, mask = tokenize_example(tok, "\n\nHuman: hi there\n\nAssistant:", " Hello friend.", 64)
    n_prompt = len(tok("\n\nHuman: hi there\n\nAssistant:", add_special_tokens=False)["input_ids"])
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert ids[-1] == tok.eos_token_id
    # too long: the prompt loses its start, the completion is kept whole
    ids, mask = tokenize_example(tok, "word " * 100, " Hello friend.", 16)
    assert len(ids) == 16 and sum(mask) == len(tok(" Hello friend.")["input_ids"]) + 1


def _batch(tok, n=4):
    rows = [tokenize_example(tok, f"\n\nHuman: message {i}\n\nAssistant:", " reply" * (i + 1), 64) for i in range(n)]
    return collate(rows, tok.pad_token_id, "cpu")


def test_sft_model_reloads_with_identical_logits_and_plain_automodel(tiny_run):
    from transformers import AutoModelForCausalLM

    path = str(tiny_run[1]["sft"].outputs["model"])
    tok = load_tokenizer(path)
    b = _batch(tok)
    with torch.no_grad():
        ours = load_causal_lm(path, tok)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        plain = AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=b["input_ids"],
                                                                   attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    assert tiny_run[1]["sft"].outputs["samples"].read_text().count("\n") == 8


def test_reward_model_reloads_identically_and_with_plain_automodel(tiny_run):
    from transformers import AutoModelForSequenceClassification

    path = str(tiny_run[1]["reward"].outputs["model"])
    tok = load_tokenizer(path)
    b = _batch(tok)
    with torch.no_grad():
        ours = load_reward_model(path)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        plain = AutoModelForSequenceClassification.from_pretrained(path).eval()(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert ours.shape == (4, 1)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    # the reward is read at the last real token: padding on the right changes nothing
    wide = collate([tokenize_example(tok, "\n\nHuman: a\n\nAssistant:", " b", 64)] * 2, tok.pad_token_id, "cpu")
    wide["input_ids"] = torch.cat([wide["input_ids"], torch.full((2, 5), tok.pad_token_id)], 1)
    wide["attention_mask"] = torch.cat([wide["attention_mask"], torch.zeros(2, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        padded = load_reward_model(path)(input_ids=wide["input_ids"], attention_mask=wide["attention_mask"]).logits
    assert padded[0].item() == pytest.approx(score_texts(load_reward_model(path), tok, ["\n\nHuman: a\n\nAssistant:"],
                                                         [" b"], 64)[0], abs=1e-5)


def test_reward_stage_learns_the_preferences(tiny_run):
    m = tiny_run[1]["reward"].metrics
    assert m["train/loss"] < math.log(2)  # below a coin flip's Bradley-Terry loss
    assert m["eval/accuracy"] > 0.6 and m["eval/gold_accuracy"] > 0.6
    assert m["train/sequences"] == 4 * m["train/comparisons"]  # grouped: one forward per response, K=4


def test_reward_offset_centres_sft_outputs_and_shift_is_exact(tiny_run):
    cfg, results = tiny_run
    assert results["reward"].metrics["reward_offset"] != 0.0
    path = str(results["sft"].outputs["model"])
    tok = load_tokenizer(path)
    rm = reward_model_from_lm(path, tok).eval()
    head = rm.score.weight
    assert head.std().item() == pytest.approx(1 / math.sqrt(head.shape[1] + 1), rel=0.35)
    prompts, responses = ["\n\nHuman: hello\n\nAssistant:"] * 3, [" hi", " hello there", " good day to you"]
    before = score_texts(rm, tok, prompts, responses, 64)
    where = shift_reward(rm, 1.25)
    after = score_texts(rm, tok, prompts, responses, 64)
    assert where == "final_norm.bias"
    assert [a - b for a, b in zip(after, before)] == pytest.approx([1.25] * 3, abs=1e-4)


def test_sft_resumes_after_a_crash_to_the_same_weights(tmp_path, tiny_run):
    """A run that dies mid-way and is restarted ends with the same weights as one that never stopped."""
    from rlhf_core.sft import train_sft

    cfg0, results = tiny_run
    base = str(results["pretrain"].outputs["model"])
    params = tiny_params(tmp_path)
    params["base"]["data_dir"] = cfg0.base.data_dir
    cfg = from_dict(params)

    class Crash(Exception):
        pass

    def crash_at_step_7(metrics, step):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train_sft(cfg, base, tmp_path / "resumed", sink=crash_at_step_7)
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").exists()
    assert not (tmp_path / "resumed" / "model").exists()  # nothing half-written
    train_sft(cfg, base, tmp_path / "resumed")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    reference = load_file(results["sft"].outputs["model"] / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def test_reward_stage_trains_on_real_hh_comparisons_through_the_profile(tmp_path, tiny_run):
    """The HH-RLHF sample beside the repo, through profiles/hh-rlhf-sample.yaml and overrides only (no code)."""
    from rlhf_core.cli import run_stage
    from rlhf_core.config import load_config

    from .conftest import HH_SAMPLE, ROOT

    if not HH_SAMPLE.exists():
        pytest.skip("../shared/data/hh-rlhf-harmless is not beside this checkout")
    sft = tiny_run[1]["sft"].outputs["model"]
    cfg = load_config(ROOT / "params.yaml", profile=ROOT / "profiles" / "hh-rlhf-sample.yaml", overrides=[
        f"base.out_dir={tmp_path}", f"reward.init_from={sft}", f"reward.train_data={HH_SAMPLE}",
        "reward.max_length=48", "reward.max_steps=3", "reward.batch_size=8", "reward.micro_batch_size=8"])
    result = run_stage(cfg, "reward")
    m = result.metrics
    assert m["train/steps"] == 3 and m["train/comparisons"] == 1530  # 85 % of 1,800 rows; 270 held out
    assert 0.0 <= m["eval/accuracy"] <= 1.0 and "eval/gold_accuracy" not in m
    assert (result.outputs["model"] / "model.safetensors").exists()
