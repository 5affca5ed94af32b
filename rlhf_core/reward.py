"""Reward model: a scalar head on the SFT trunk, trained on human comparisons with the Bradley-Terry loss.

    python -m rlhf_core reward

Rankings of K responses train InstructGPT's way (ranking_mode: grouped): one forward per response and all C(K,2)
pairs of a prompt in the same batch, each weighted 1/C(K,2). After training, a bias is set so that SFT completions
score mean 0 (N+ detail 6). Writes <out>/model (loads with AutoModelForSequenceClassification), <out>/metrics.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from rlhf_core import io, loaders, runtime
from rlhf_core.config import Config
from rlhf_core.losses import ranking_loss
from rlhf_core.models import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    reward_model_from_lm,
    save_pretrained,
    shift_reward,
)
from rlhf_core.sampling import generate
from rlhf_core.sft import length_sorted_batches, tokenize_example
from rlhf_core.training import (
    MetricsSink,
    StageResult,
    batched,
    epoch_order,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    null_sink,
    progress,
    save_checkpoint,
    split_held_out,
    write_metrics,
)


def rewards_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar reward per row, read at the last real token (EOS) of a right-padded batch: (B,)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, 0].float()


def rewards_of_rows(model, rows: list, pad_id: int, device, bf16: bool, rows_per_forward: int) -> torch.Tensor:
    """Rewards of token rows (from tokenize_example), in the rows' order: (N,). The forwards run over length-sorted
    chunks of `rows_per_forward` rows (training.by_length), so little compute goes to padding; each reward is the
    same as in one forward over all rows (the autograd graph covers every chunk when grad is on)."""
    order, parts = [], []
    for idx, batch in length_sorted_batches(rows, rows_per_forward, pad_id, device):
        with runtime.autocast(device, bf16):
            parts.append(rewards_of(model, batch))
        order.extend(idx)
    return torch.cat(parts)[torch.argsort(torch.tensor(order, device=device))]


def group_rows(groups: list[loaders.PreferenceGroup], tok, max_length: int, device):
    """Token rows of all responses of `groups`, plus (P, 2) pair indices into them and (P,) group ids."""
    rows, pairs, group_ids = [], [], []
    for g_idx, g in enumerate(groups):
        offset = len(rows)
        rows.extend(tokenize_example(tok, g.prompt, r, max_length) for r in g.responses)
        pairs.extend((offset + w, offset + lo) for w, lo in g.pairs)
        group_ids.extend([g_idx] * len(g.pairs))
    return rows, torch.tensor(pairs, device=device), torch.tensor(group_ids, device=device)


@torch.no_grad()
def score_texts(model, tok, prompts: list[str], responses: list[str], max_length: int, batch_size: int = 64,
                bf16: bool = False) -> list[float]:
    """Reward of each (prompt, response) as the model sees it after training (EOS appended); forwards of
    `batch_size` rows, grouped by length."""
    device = next(model.parameters()).device
    model.eval()
    rows = [tokenize_example(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    if not rows:
        return []
    return rewards_of_rows(model, rows, tok.pad_token_id, device, bf16, batch_size).tolist()


class RewardModelScorer:
    """A trained reward-model checkpoint behind the same `score_batch` interface as the simulated labeler, so a real
    reward model can stand in as the gold scorer of evaluation."""

    def __init__(self, path: str, max_length: int = 512, batch_size: int = 32):
        self.tok, self.model = load_tokenizer(path), load_reward_model(path)
        self.max_length, self.batch_size = max_length, batch_size

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        return score_texts(self.model, self.tok, prompts, responses, self.max_length, self.batch_size)


def evaluate(model, tok, groups: list[loaders.PreferenceGroup], cfg: Config, device, bf16: bool,
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
            k = len(g.responses)
            for i in range(k):
                for j in range(i + 1, k):
                    d_gold = g_scores[o + i] - g_scores[o + j]
                    if abs(d_gold) > 1e-9:
                        total += 1
                        agree += (d_gold > 0) == (scores[o + i] > scores[o + j])
        metrics["eval/gold_accuracy"] = agree / max(total, 1)
    model.train()
    return metrics


def load_splits(cfg: Config, out_dir: Path):
    r = cfg.reward
    kw = dict(format=r.format, columns=r.columns or None, on_error=r.on_error)
    train = loaders.load_preferences(cfg.data_path(r.train_data), report_path=out_dir / "data_report_train.json", **kw)
    if r.eval_data:
        held_out = loaders.load_preferences(cfg.data_path(r.eval_data), report_path=out_dir / "data_report_eval.json", **kw)
    else:
        train, held_out = split_held_out(train, r.eval_fraction, cfg.base.seed)
    if r.ranking_mode == "pairs":
        train = [p for g in train for p in g.split_into_pairs()]
    return train, held_out


def train_reward(cfg: Config, init_model: str, sft_model: str | None, out_dir: Path, sink: MetricsSink = null_sink,
                 gold=None) -> StageResult:
    """Train a reward model from `init_model`'s trunk; `sft_model` samples set the reward offset (None = skip).
    `gold` (a scorer such as the simulated labeler) adds held-out accuracy against the gold ordering."""
    r, out_dir = cfg.reward, Path(out_dir)
    runtime.seed_everything(cfg.base.seed)
    runtime.set_threads(cfg.base)
    device = runtime.resolve_device(cfg.base)
    bf16 = runtime.use_bf16(cfg.base, device)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. data and model
    tok = load_tokenizer(cfg.base.tokenizer or init_model)
    train, held_out = load_splits(cfg, out_dir)
    model = reward_model_from_lm(init_model, tok).to(device)
    model.train()
    steps_per_epoch = len(train) // r.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"reward: {len(train)} training comparisons are fewer than one batch of {r.batch_size}")
    total_steps = min(steps_per_epoch * r.epochs, r.max_steps or steps_per_epoch * r.epochs)
    opt = make_optimizer(model, r.lr, r.weight_decay)
    sched = make_scheduler(opt, total_steps, int(r.warmup_ratio * total_steps))
    ckpt_dir = out_dir / "checkpoint"
    step = (load_checkpoint(ckpt_dir, model, opt, sched) or {"step": 0})["step"]

    # 2. train: one forward per response; every micro batch's loss weighted by its share of the batch's prompts
    bar = progress(total_steps, f"reward ({r.ranking_mode})", initial=step)
    metrics: dict[str, float] = {}
    sequences = sum(len(g.responses) for g in train[:step * r.batch_size])
    for epoch in range(step // steps_per_epoch, -(-total_steps // steps_per_epoch)):
        order = epoch_order(len(train), cfg.base.seed, epoch)
        for i, batch_idx in enumerate(batched(order, r.batch_size, drop_last=True)):
            if epoch * steps_per_epoch + i < step:
                continue
            if step >= total_steps:
                break
            loss_sum, correct, n_pairs = 0.0, 0, 0
            for mb in batched(batch_idx, r.micro_batch_size):
                groups = [train[j] for j in mb]
                rows, pairs, group_ids = group_rows(groups, tok, r.max_length, device)
                rewards = rewards_of_rows(model, rows, tok.pad_token_id, device, bf16, r.rows_per_forward)  # (N,)
                loss = ranking_loss(rewards, pairs, group_ids, r.margin, r.center_rewards_coef)
                (loss * len(mb) / len(batch_idx)).backward()
                loss_sum += loss.item() * len(mb) / len(batch_idx)
                correct += (rewards[pairs[:, 0]] > rewards[pairs[:, 1]]).sum().item()
                n_pairs += len(pairs)
                sequences += len(rewards)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.max_grad_norm)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            step += 1
            metrics = {"train/loss": loss_sum, "train/accuracy": correct / n_pairs, "train/grad_norm": grad_norm.item(),
                       "train/lr": sched.get_last_lr()[0], "train/sequences": sequences}
            if step % r.eval_every == 0 and step < total_steps:  # the last evaluation follows the reward shift
                metrics.update(evaluate(model, tok, held_out, cfg, device, bf16, gold))
            sink(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{metrics['train/accuracy']:.2f}", refresh=False)
            if step % 100 == 0 and step < total_steps:
                save_checkpoint(ckpt_dir, model, opt, sched, {"step": step})
    bar.close()

    # 3. shift rewards so SFT completions score mean 0
    offset = 0.0
    if sft_model and r.normalize_samples > 0:
        policy = load_causal_lm(sft_model, tok).to(device)
        prompts = [held_out[i % len(held_out)].prompt for i in range(r.normalize_samples)]
        completions = generate(policy, tok, prompts, max_new_tokens=min(64, r.max_length), seed=cfg.base.seed)
        offset = -float(np.mean(score_texts(model, tok, prompts, completions, r.max_length, 64, bf16)))
        shift_reward(model, offset)
        del policy
    held_out_metrics = evaluate(model, tok, held_out, cfg, device, bf16, gold)
    sink(held_out_metrics, step)
    final = {**held_out_metrics,
             "train/loss": metrics.get("train/loss", float("nan")), "train/steps": step,
             "train/comparisons": len(train), "train/sequences": sequences, "reward_offset": offset, "bf16": float(bf16)}

    # 4. outputs
    with io.atomic_path(out_dir / "model") as tmp:
        save_pretrained(model, tok, tmp)
    write_metrics(out_dir / "metrics.json", final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return StageResult({"model": out_dir / "model", "metrics": out_dir / "metrics.json"}, final)
