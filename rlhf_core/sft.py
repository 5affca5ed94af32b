"""Supervised fine-tuning on demonstrations: next-token loss on the response tokens only.

    python -m rlhf_core sft            # reads params.yaml: sections base + sft

Writes <out>/model (save_pretrained, safetensors), <out>/metrics.json, <out>/samples.jsonl; a kill leaves
<out>/checkpoint, from which the next run with the same settings resumes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from rlhf_core import io, loaders, runtime
from rlhf_core.batching import Row, length_sorted_batches, pack, tokenize_example
from rlhf_core.config import Config
from rlhf_core.forwards import decode_responses, sample
from rlhf_core.losses import lm_loss
from rlhf_core.models import load_causal_lm, load_tokenizer, save_pretrained
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


def inputs(cfg: Config) -> dict[str, loaders.DataInput]:
    """The data this stage reads, and how: the data stage, lineage and the stage itself use this one definition."""
    s = cfg.sft
    return loaders.declare(cfg, {"sft.train_data": s.train_data, "sft.eval_data": s.eval_data}, loaders.load_sft,
                           format=s.format, columns=s.columns or None, on_error=s.on_error)


def demonstration_splits(cfg: Config, out_dir: Path) -> tuple[list[loaders.SFTExample], list[loaders.SFTExample]]:
    """(train, held-out) demonstrations: eval_data when given, else a seeded eval_fraction of train_data."""
    data = inputs(cfg)
    train = data["sft.train_data"].load(report_path=out_dir / "data_report_train.json")
    if "sft.eval_data" in data:
        return train, data["sft.eval_data"].load(report_path=out_dir / "data_report_eval.json")
    return split_held_out(train, cfg.sft.eval_fraction, cfg.base.seed)


def evaluate_loss(model, rows: list[Row], pad_id: int, micro: int, device, bf16: bool) -> float:
    """Token-weighted mean completion loss over `rows`."""
    model.eval()
    total, count = 0.0, 0.0
    for _, b in length_sorted_batches(rows, micro, pad_id, device):
        with torch.no_grad(), runtime.autocast(device, bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss, n = lm_loss(logits, b["input_ids"], b["loss_mask"])
        total, count = total + loss.item() * n.item(), count + n.item()
    model.train()
    return total / max(count, 1)


def accumulate_gradients(model, rows: list[Row], micro: int, pad_id: int, device, bf16: bool) -> float:
    """Backward of one batch's completion loss over length-sorted micro batches, each weighted by its share of the
    batch's completion tokens (so the gradient is the whole batch's); returns the batch's mean token loss."""
    batches = [b for _, b in length_sorted_batches(rows, micro, pad_id, device)]
    n_tokens = sum(b["loss_mask"][:, 1:].sum() for b in batches).clamp(min=1)
    loss_sum = 0.0
    for b in batches:
        with runtime.autocast(device, bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss, n = lm_loss(logits, b["input_ids"], b["loss_mask"])
        (loss * n / n_tokens).backward()
        loss_sum += (loss * n).item()
    return loss_sum / n_tokens.item()


def train_sft(cfg: Config, base_model: str, out_dir: Path, sink: MetricsSink = null_sink) -> StageResult:
    """Fine-tune `base_model` on cfg.sft's demonstrations; returns the model dir and metrics."""
    s, out_dir = cfg.sft, Path(out_dir)
    device, bf16 = setup_stage(cfg, out_dir)

    # 1. data
    tok = load_tokenizer(cfg.base.tokenizer or base_model)
    train, held_out = demonstration_splits(cfg, out_dir)
    train_rows = [tokenize_example(tok, e.prompt, e.completion, s.max_length) for e in train]
    eval_rows = [tokenize_example(tok, e.prompt, e.completion, s.max_length) for e in held_out]
    if s.packing:
        train_rows = pack(train_rows, s.max_length)

    # 2. model, optimizer, schedule; resume when a checkpoint made with the same settings exists
    model = load_causal_lm(base_model, tok).to(device)
    model.train()
    per_epoch, total_steps = plan_steps(len(train_rows), s, "sft")
    opt = make_optimizer(model, s.lr, s.weight_decay)
    sched = make_scheduler(opt, total_steps, int(s.warmup_ratio * total_steps))
    ckpt_dir = out_dir / "checkpoint"
    made_with = fingerprint(cfg, "sft", {"base_model": base_model, **{k: d.source for k, d in inputs(cfg).items()}},
                            bf16)
    state = load_checkpoint(ckpt_dir, model, opt, sched, made_with) or {"step": 0, "history": []}
    replay(sink, state["history"])
    sink = recording(sink, state["history"])
    if not state["history"]:
        sink({"eval/loss": evaluate_loss(model, eval_rows, tok.pad_token_id, s.micro_batch_size, device, bf16)}, 0)

    # 3. train: each optimizer step = micro batches of length-sorted examples, loss weighted by completion tokens
    bar = progress(total_steps, "sft", initial=state["step"], sink=sink)
    for step, batch_idx in epoch_batches(len(train_rows), s.batch_size, cfg.base.seed, per_epoch, total_steps,
                                         state["step"]):
        metrics = {"train/loss": accumulate_gradients(model, [train_rows[j] for j in batch_idx], s.micro_batch_size,
                                                      tok.pad_token_id, device, bf16)}
        metrics["train/grad_norm"] = optimizer_step(model.parameters(), opt, sched, s.max_grad_norm,
                                                    metrics["train/loss"], f"sft step {step + 1}")
        metrics.update({"train/lr": sched.get_last_lr()[0], "train/epoch": (step + 1) / per_epoch})
        if (step + 1) % s.eval_every == 0 or step + 1 == total_steps:
            metrics["eval/loss"] = evaluate_loss(model, eval_rows, tok.pad_token_id, s.micro_batch_size, device, bf16)
            metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50))
        sink(metrics, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", refresh=False)
        state["step"] = step + 1
        if state["step"] % s.checkpoint_every == 0 or state["step"] == total_steps:
            save_checkpoint(ckpt_dir, model, opt, sched, {**state, "fingerprint": made_with})
    bar.close()

    # 4. outputs: the model, a few samples, metrics (from the history: a resume with no step left writes them too)
    check_finite(model, "sft model")
    last = {k: v for row in state["history"] for k, v in row.items()}
    final = {"eval/loss": last["eval/loss"], "eval/perplexity": math.exp(min(last["eval/loss"], 50)),
             "eval/base_loss": state["history"][0]["eval/loss"], "train/loss": last.get("train/loss"),
             "train/steps": state["step"], "train/examples": len(train), "eval/examples": len(held_out),
             "bf16": float(bf16)}
    model_dir = out_dir / "model"
    with io.atomic_path(model_dir) as tmp:
        save_pretrained(model, tok, tmp)
    prompts = [e.prompt for e in held_out[:8]]
    torch.manual_seed(cfg.base.seed)
    texts = decode_responses(tok, sample(model, tok, prompts, temperature=1.0,
                                         max_new_tokens=min(64, s.max_length)).responses)
    io.write_jsonl(out_dir / "samples.jsonl", [{"prompt": p, "completion": c} for p, c in zip(prompts, texts)])
    write_metrics(out_dir / "metrics.json", {k: v for k, v in final.items() if v is not None})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return StageResult({"model": model_dir, "metrics": out_dir / "metrics.json", "samples": out_dir / "samples.jsonl"}, final)
