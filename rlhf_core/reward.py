"""Reward model: a scalar head on the SFT trunk, trained on human comparisons with the Bradley-Terry loss.

    python -m rlhf_core reward

Rankings of K responses train InstructGPT's way (ranking_mode: grouped): one forward per response and all C(K,2)
pairs of a prompt in the same batch, each weighted 1/C(K,2). After training, a bias is set so that SFT samples drawn
the way PPO draws them (ppo.temperature, ppo.response_length, ppo.max_prompt_tokens, ppo.stop_at_eos) score mean 0
(N+ detail 6): PPO's rewards then start centred. Writes <out>/model (loads with
AutoModelForSequenceClassification), <out>/metrics.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from rlhf_core import io, loaders, runtime
from rlhf_core.batching import batched, tokenize_example
from rlhf_core.config import Config
from rlhf_core.forwards import read_scores, sample_as_ppo, score_rows, score_texts
from rlhf_core.losses import ranking_loss
from rlhf_core.models import load_causal_lm, load_tokenizer, reward_model_from_lm, save_pretrained, shift_reward
from rlhf_core.training import (
    MetricsSink,
    StageResult,
    check_finite,
    epoch_batches,
    fingerprint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    null_sink,
    optimizer_step,
    plan_steps,
    progress,
    recording,
    replay,
    save_checkpoint,
    setup_stage,
    split_held_out,
    write_metrics,
)

PPO_SAMPLING = ("ppo.temperature", "ppo.response_length", "ppo.max_prompt_tokens", "ppo.stop_at_eos")
"""The keys of the sampling the reward offset is centred on (the reward stage reads them from the ppo section)."""


def inputs(cfg: Config) -> dict[str, loaders.DataInput]:
    """The data this stage reads, and how: the data stage, lineage and the stage itself use this one definition."""
    r = cfg.reward
    return loaders.declare(cfg, {"reward.train_data": r.train_data, "reward.eval_data": r.eval_data},
                           loaders.load_preferences, format=r.format, columns=r.columns or None, on_error=r.on_error)


def comparison_splits(cfg: Config, out_dir: Path):
    """(train, held-out) preference groups; in "pairs" mode the training groups are split into single pairs."""
    r, data = cfg.reward, inputs(cfg)
    train = data["reward.train_data"].load(report_path=out_dir / "data_report_train.json")
    if "reward.eval_data" in data:
        held_out = data["reward.eval_data"].load(report_path=out_dir / "data_report_eval.json")
    else:
        train, held_out = split_held_out(train, r.eval_fraction, cfg.base.seed)
    if r.ranking_mode == "pairs":
        train = [p for g in train for p in g.split_into_pairs()]
    return train, held_out


def group_rows(groups: list[loaders.PreferenceGroup], tok, max_length: int, device):
    """Token rows of all responses of `groups`, plus (P, 2) pair indices into them and (P,) group ids."""
    rows, pairs, group_ids = [], [], []
    for g_idx, g in enumerate(groups):
        offset = len(rows)
        rows.extend(tokenize_example(tok, g.prompt, r, max_length) for r in g.responses)
        pairs.extend((offset + w, offset + lo) for w, lo in g.pairs)
        group_ids.extend([g_idx] * len(g.pairs))
    return rows, torch.tensor(pairs, device=device), torch.tensor(group_ids, device=device)


class RewardModelScorer:
    """A trained reward-model checkpoint behind the same `score_batch` interface as the simulated labeler, so a real
    reward model can stand in as the gold scorer of evaluation."""

    def __init__(self, path: str, max_length: int = 512, batch_size: int = 32):
        from rlhf_core.models import load_reward_model

        self.tok, self.model = load_tokenizer(path), load_reward_model(path)
        self.max_length, self.batch_size = max_length, batch_size

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        return score_texts(self.model, self.tok, prompts, responses, self.max_length, self.batch_size)


def held_out_accuracy(model, tok, groups: list[loaders.PreferenceGroup], cfg: Config, bf16: bool,
                      gold=None) -> dict[str, float]:
    """Held-out accuracy against the labels and (when a gold scorer is given) against the gold ordering."""
    r = cfg.reward
    prompts = [g.prompt for g in groups for _ in g.responses]
    responses = [resp for g in groups for resp in g.responses]
    scores = np.array(score_texts(model, tok, prompts, responses, r.max_length, r.micro_batch_size * 4, bf16))
    offsets = np.cumsum([0] + [len(g.responses) for g in groups])
    wins = np.array([scores[o + w] - scores[o + lo] for g, o in zip(groups, offsets) for w, lo in g.pairs])
    metrics = {"eval/accuracy": float((wins > 0).mean()), "eval/margin": float(wins.mean()),
               "eval/reward_mean": float(scores.mean()), "eval/reward_std": float(scores.std())}
    if gold is not None:
        g_scores = np.array(gold.score_batch(prompts, responses))
        agree, total = 0, 0
        for g, o in zip(groups, offsets):
            for i in range(len(g.responses)):
                for j in range(i + 1, len(g.responses)):
                    d_gold = g_scores[o + i] - g_scores[o + j]
                    if abs(d_gold) > 1e-9:
                        total += 1
                        agree += (d_gold > 0) == (scores[o + i] > scores[o + j])
        metrics["eval/gold_accuracy"] = agree / max(total, 1)
    return metrics


@torch.no_grad()
def sft_sample_offset(model, sft_model: str, tok, prompts: list[str], cfg: Config, device, bf16: bool) -> float:
    """Minus the mean reward of SFT samples drawn the way PPO draws them, read as PPO reads them (at the last kept
    token, before PPO's clip and no-EOS rule, which are PPO's own transformations of this score)."""
    p = cfg.ppo
    policy = load_causal_lm(sft_model, tok).to(device)
    torch.manual_seed(cfg.base.seed)
    scores = []
    for chunk in batched(prompts, 64):
        with runtime.autocast(device, bf16):
            c = sample_as_ppo(policy, tok, chunk, p)
            scores.append(read_scores(model, c.input_ids, c.attention_mask, c.last))
    return -torch.cat(scores).mean().item()


def accumulate_gradients(model, groups: list[loaders.PreferenceGroup], tok, r, device,
                         bf16: bool) -> tuple[float, float, int]:
    """Backward of one batch's ranking loss: one forward per response, every micro batch's loss weighted by its share
    of the batch's prompts. Returns (loss, pair accuracy, responses scored)."""
    loss_sum, correct, n_pairs, sequences = 0.0, 0, 0, 0
    for mb in batched(groups, r.micro_batch_size):
        rows, pairs, group_ids = group_rows(mb, tok, r.max_length, device)
        rewards = score_rows(model, rows, tok.pad_token_id, device, r.rows_per_forward, bf16)  # (N,)
        loss = ranking_loss(rewards, pairs, group_ids, r.margin, r.center_rewards_coef)
        (loss * len(mb) / len(groups)).backward()
        loss_sum += loss.item() * len(mb) / len(groups)
        correct += (rewards[pairs[:, 0]] > rewards[pairs[:, 1]]).sum().item()
        n_pairs, sequences = n_pairs + len(pairs), sequences + len(rewards)
    return loss_sum, correct / n_pairs, sequences


def train_reward(cfg: Config, init_model: str, sft_model: str | None, out_dir: Path, sink: MetricsSink = null_sink,
                 gold=None) -> StageResult:
    """Train a reward model from `init_model`'s trunk; `sft_model` samples set the reward offset (None = skip).
    `gold` (a scorer such as the simulated labeler) adds held-out accuracy against the gold ordering."""
    r, out_dir = cfg.reward, Path(out_dir)
    device, bf16 = setup_stage(cfg, out_dir)

    # 1. data and model; resume when a checkpoint made with the same settings exists
    tok = load_tokenizer(cfg.base.tokenizer or init_model)
    train, held_out = comparison_splits(cfg, out_dir)
    model = reward_model_from_lm(init_model, tok).to(device)
    model.train()
    per_epoch, total_steps = plan_steps(len(train), r, "reward")
    opt = make_optimizer(model, r.lr, r.weight_decay)
    sched = make_scheduler(opt, total_steps, int(r.warmup_ratio * total_steps))
    ckpt_dir = out_dir / "checkpoint"
    upstream = {"init_model": init_model, "sft_model": sft_model or "", **{k: d.source for k, d in inputs(cfg).items()}}
    made_with = fingerprint(cfg, "reward", upstream, bf16, extra=PPO_SAMPLING)
    state = load_checkpoint(ckpt_dir, model, opt, sched, made_with) or {"step": 0, "history": [], "sequences": 0}
    replay(sink, state["history"])
    sink = recording(sink, state["history"])

    # 2. train
    bar = progress(total_steps, f"reward ({r.ranking_mode})", initial=state["step"], sink=sink)
    for step, batch_idx in epoch_batches(len(train), r.batch_size, cfg.base.seed, per_epoch, total_steps,
                                         state["step"]):
        loss_sum, accuracy, sequences = accumulate_gradients(model, [train[j] for j in batch_idx], tok, r, device, bf16)
        state["sequences"] += sequences
        grad_norm = optimizer_step(model.parameters(), opt, sched, r.max_grad_norm, loss_sum, f"reward step {step + 1}")
        metrics = {"train/loss": loss_sum, "train/accuracy": accuracy, "train/grad_norm": grad_norm,
                   "train/lr": sched.get_last_lr()[0], "train/sequences": state["sequences"]}
        if (step + 1) % r.eval_every == 0 and step + 1 < total_steps:  # the last evaluation follows the reward shift
            metrics.update(held_out_accuracy(model, tok, held_out, cfg, bf16, gold))
        sink(metrics, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{metrics['train/accuracy']:.2f}", refresh=False)
        state["step"] = step + 1
        if state["step"] % r.checkpoint_every == 0 or state["step"] == total_steps:
            save_checkpoint(ckpt_dir, model, opt, sched, {**state, "fingerprint": made_with})
    bar.close()

    # 3. shift rewards so SFT samples score mean 0
    check_finite(model, "reward model")
    offset = 0.0
    if sft_model and r.normalize_samples > 0:
        prompts = [held_out[i % len(held_out)].prompt for i in range(r.normalize_samples)]
        offset = sft_sample_offset(model, sft_model, tok, prompts, cfg, device, bf16)
        shift_reward(model, offset)
    train_loss = next(row["train/loss"] for row in reversed(state["history"]) if "train/loss" in row)
    held_out_metrics = held_out_accuracy(model, tok, held_out, cfg, bf16, gold)
    sink(held_out_metrics, state["step"])
    final = {**held_out_metrics, "train/loss": train_loss, "train/steps": state["step"],
             "train/comparisons": len(train), "train/sequences": state["sequences"], "reward_offset": offset,
             "bf16": float(bf16)}

    # 4. outputs
    check_finite(model, "reward model")
    with io.atomic_path(out_dir / "model") as tmp:
        save_pretrained(model, tok, tmp)
    write_metrics(out_dir / "metrics.json", final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return StageResult({"model": out_dir / "model", "metrics": out_dir / "metrics.json"}, final)
