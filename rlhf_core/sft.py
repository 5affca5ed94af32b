"""Supervised fine-tuning on demonstrations: next-token loss on the response tokens only.

    python -m rlhf_core sft            # reads params.yaml: sections base + sft

Writes <out>/model (save_pretrained, safetensors), <out>/metrics.json, <out>/samples.jsonl; a kill leaves
<out>/checkpoint, from which the next run resumes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from rlhf_core import io, loaders, runtime
from rlhf_core.config import Config
from rlhf_core.losses import lm_loss
from rlhf_core.models import load_causal_lm, load_tokenizer, save_pretrained
from rlhf_core.sampling import generate
from rlhf_core.training import (
    MetricsSink,
    StageResult,
    batched,
    by_length,
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

Row = tuple[list[int], list[int]]  # (token ids, loss mask: 1 on completion tokens)


def tokenize_example(tok, prompt: str, completion: str, max_length: int) -> Row:
    """prompt + completion + EOS; an over-long example loses the start of its prompt, then the end of its completion."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c = c[:max_length - 1]
    p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p
    return p + c, [0] * len(p) + [1] * len(c)


def pack(rows: list[Row], max_length: int) -> list[Row]:
    """Concatenate examples into rows of exactly max_length tokens (the last row may be shorter).

    Attention crosses example boundaries inside a row (the usual cheap packing); the loss still covers only
    completion tokens, and each example starts after the previous one's EOS.
    """
    ids, mask = [t for r in rows for t in r[0]], [m for r in rows for m in r[1]]
    return [(ids[i:i + max_length], mask[i:i + max_length]) for i in range(0, len(ids), max_length)]


def collate(rows: list[Row], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask, each (B, T)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)], loss_mask[i, :len(m)] = torch.tensor(r), 1, torch.tensor(m)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}


@torch.no_grad()
def length_sorted_batches(rows: list[Row], size: int, pad_id: int, device) -> list[tuple[list[int], dict]]:
    """(row indices, collated batch) for length-sorted chunks of `size` rows (training.by_length), each padded only to
    its own longest row."""
    return [(idx, collate([rows[i] for i in idx], pad_id, device))
            for idx in by_length([len(ids) for ids, _ in rows], size)]


def evaluate_loss(model, rows: list[Row], pad_id: int, micro: int, device, bf16: bool) -> float:
    """Token-weighted mean completion loss over `rows`."""
    model.eval()
    total, count = 0.0, 0.0
    for _, b in length_sorted_batches(rows, micro, pad_id, device):
        with runtime.autocast(device, bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss, n = lm_loss(logits, b["input_ids"], b["loss_mask"])
        total, count = total + loss.item() * n.item(), count + n.item()
    model.train()
    return total / max(count, 1)


def load_splits(cfg: Config, out_dir: Path) -> tuple[list[loaders.SFTExample], list[loaders.SFTExample]]:
    s = cfg.sft
    kw = dict(format=s.format, columns=s.columns or None, on_error=s.on_error)
    train = loaders.load_sft(cfg.data_path(s.train_data), report_path=out_dir / "data_report_train.json", **kw)
    if s.eval_data:
        return train, loaders.load_sft(cfg.data_path(s.eval_data), report_path=out_dir / "data_report_eval.json", **kw)
    return split_held_out(train, s.eval_fraction, cfg.base.seed)


def train_sft(cfg: Config, base_model: str, out_dir: Path, sink: MetricsSink = null_sink) -> StageResult:
    """Fine-tune `base_model` on cfg.sft's demonstrations; returns the model dir and metrics."""
    s, out_dir = cfg.sft, Path(out_dir)
    runtime.seed_everything(cfg.base.seed)
    runtime.set_threads(cfg.base)
    device = runtime.resolve_device(cfg.base)
    bf16 = runtime.use_bf16(cfg.base, device)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. data
    tok = load_tokenizer(cfg.base.tokenizer or base_model)
    train, held_out = load_splits(cfg, out_dir)
    train_rows = [tokenize_example(tok, e.prompt, e.completion, s.max_length) for e in train]
    eval_rows = [tokenize_example(tok, e.prompt, e.completion, s.max_length) for e in held_out]
    if s.packing:
        train_rows = pack(train_rows, s.max_length)

    # 2. model, optimizer, schedule; resume when a checkpoint exists
    model = load_causal_lm(base_model, tok).to(device)
    model.train()
    steps_per_epoch = len(train_rows) // s.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"sft: {len(train_rows)} training rows are fewer than one batch of {s.batch_size}")
    total_steps = min(steps_per_epoch * s.epochs, s.max_steps or steps_per_epoch * s.epochs)
    opt = make_optimizer(model, s.lr, s.weight_decay)
    sched = make_scheduler(opt, total_steps, int(s.warmup_ratio * total_steps))
    ckpt_dir = out_dir / "checkpoint"
    state = load_checkpoint(ckpt_dir, model, opt, sched) or {"step": 0, "base_eval_loss": None}
    if state["base_eval_loss"] is None:
        state["base_eval_loss"] = evaluate_loss(model, eval_rows, tok.pad_token_id, s.micro_batch_size, device, bf16)
        sink({"eval/loss": state["base_eval_loss"]}, 0)

    # 3. train: each optimizer step = `accum` micro batches, loss weighted by completion tokens
    bar = progress(total_steps, "sft", initial=state["step"])
    step, metrics = state["step"], {}
    for epoch in range(step // steps_per_epoch, -(-total_steps // steps_per_epoch)):
        order = epoch_order(len(train_rows), cfg.base.seed, epoch)
        for i, batch_idx in enumerate(batched(order, s.batch_size, drop_last=True)):
            if epoch * steps_per_epoch + i < step:
                continue
            if step >= total_steps:
                break  # already done before the resume
            micro = [b for _, b in length_sorted_batches([train_rows[j] for j in batch_idx], s.micro_batch_size,
                                                         tok.pad_token_id, device)]
            n_tokens = sum(b["loss_mask"][:, 1:].sum() for b in micro).clamp(min=1)
            loss_sum = 0.0
            for b in micro:
                with runtime.autocast(device, bf16):
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                loss, n = lm_loss(logits, b["input_ids"], b["loss_mask"])
                (loss * n / n_tokens).backward()
                loss_sum += (loss * n).item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            step += 1
            metrics = {"train/loss": loss_sum / n_tokens.item(), "train/grad_norm": grad_norm.item(),
                       "train/lr": sched.get_last_lr()[0], "train/epoch": step / steps_per_epoch}
            if step % s.eval_every == 0 or step == total_steps:
                metrics["eval/loss"] = evaluate_loss(model, eval_rows, tok.pad_token_id, s.micro_batch_size, device, bf16)
                metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50))
            sink(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", refresh=False)
            if step % s.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(ckpt_dir, model, opt, sched, {**state, "step": step})
    bar.close()

    # 4. outputs: the model, a few samples, metrics
    final = {"eval/loss": metrics.get("eval/loss", float("nan")), "eval/perplexity": metrics.get("eval/perplexity", float("nan")),
             "eval/base_loss": state["base_eval_loss"], "train/loss": metrics.get("train/loss", float("nan")),
             "train/steps": step, "train/examples": len(train), "eval/examples": len(held_out), "bf16": float(bf16)}
    model_dir = out_dir / "model"
    with io.atomic_path(model_dir) as tmp:
        save_pretrained(model, tok, tmp)
    prompts = [e.prompt for e in held_out[:8]]
    samples = generate(model, tok, prompts, max_new_tokens=min(64, s.max_length), seed=cfg.base.seed)
    io.write_jsonl(out_dir / "samples.jsonl", [{"prompt": p, "completion": c} for p, c in zip(prompts, samples)])
    write_metrics(out_dir / "metrics.json", final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return StageResult({"model": model_dir, "metrics": out_dir / "metrics.json", "samples": out_dir / "samples.jsonl"}, final)
