"""The base model: a pretrained causal LM named in `base.model`, or, by default, a tiny GPT-2 trained here.

    python -m rlhf_core pretrain

With `base.model` set this stage trains nothing and records the name. Otherwise it trains a byte-level BPE tokenizer
on the demo corpus and pretrains a GPT-2-style model from a config on it (plain next-token loss on packed text), so
the embedded default needs no hub. Writes <out>/model, <out>/metrics.json.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from rlhf_core import io, loaders, runtime
from rlhf_core.config import Config
from rlhf_core.losses import lm_loss
from rlhf_core.models import num_params, save_pretrained, tiny_gpt2, train_tokenizer
from rlhf_core.training import (
    MetricsSink,
    StageResult,
    check_finite,
    fingerprint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    null_sink,
    optimizer_step,
    progress,
    recording,
    replay,
    save_checkpoint,
    setup_stage,
    write_metrics,
)


def inputs(cfg: Config) -> dict[str, loaders.DataInput]:
    """The data this stage reads, and how (none when base.model names a pretrained model)."""
    corpus = None if cfg.base.model else "pretrain.jsonl"  # a fixed name under base.data_dir
    return loaders.declare(cfg, {"pretrain.corpus": corpus}, loaders.read_corpus)


def token_stream(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """All documents joined by EOS, cut into rows of seq_len tokens: (N, seq_len)."""
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend([*enc, tok.eos_token_id])
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def pretrain(cfg: Config, out_dir: Path, sink: MetricsSink = null_sink) -> StageResult:
    """Pretrain the tiny default model on the demo corpus (or record base.model's name and train nothing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.base.model:
        write_metrics(out_dir / "metrics.json", {"pretrained": cfg.base.model})
        return StageResult({"metrics": out_dir / "metrics.json"}, {})
    p = cfg.pretrain
    device, bf16 = setup_stage(cfg, out_dir)

    # 1. tokenizer and packed data (2% held out)
    corpus = inputs(cfg)["pretrain.corpus"]
    texts = corpus.load()
    tok = train_tokenizer(texts, p.vocab_size)
    rows = token_stream(tok, texts, p.seq_len)
    n_eval = max(1, len(rows) // 50)
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]

    # 2. model and optimizer; resume when a checkpoint made with the same settings exists
    model = tiny_gpt2(p, tok).to(device)
    opt = make_optimizer(model, p.lr, p.weight_decay)
    sched = make_scheduler(opt, p.steps, p.warmup_steps)
    ckpt = out_dir / "checkpoint"
    made_with = fingerprint(cfg, "pretrain", {"corpus": corpus.source}, bf16)
    state = load_checkpoint(ckpt, model, opt, sched, made_with) or {"step": 0, "history": []}
    replay(sink, state["history"])
    sink = recording(sink, state["history"])
    g = torch.Generator().manual_seed(cfg.base.seed)

    # 3. train on random windows of the packed stream
    bar = progress(p.steps, "pretrain", initial=state["step"], sink=sink)
    for step in range(state["step"], p.steps):
        g.manual_seed(cfg.base.seed * 7919 + step)  # batch = f(step): resume-exact without saving generator state
        idx = torch.randint(len(train_rows), (p.batch_size,), generator=g)
        batch = train_rows[idx].to(device)
        with runtime.autocast(device, bf16):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = lm_loss(logits, batch, torch.ones_like(batch))[0]
        loss.backward()
        optimizer_step(model.parameters(), opt, sched, p.max_grad_norm, loss.item(), f"pretrain step {step + 1}")
        sink({"train/loss": loss.item(), "train/lr": sched.get_last_lr()[0]}, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        state["step"] = step + 1
        if state["step"] % p.checkpoint_every == 0 or state["step"] == p.steps:
            save_checkpoint(ckpt, model, opt, sched, {**state, "fingerprint": made_with})
    bar.close()

    # 4. held-out loss, save
    model.eval()
    with torch.no_grad(), runtime.autocast(device, bf16):
        eval_loss = sum(lm_loss(model(input_ids=r.unsqueeze(0).to(device), use_cache=False).logits, r.unsqueeze(0).to(device),
                                torch.ones_like(r.unsqueeze(0)))[0].item() for r in eval_rows[:64]) / min(64, len(eval_rows))
    check_finite(model, "pretrained model")
    train_loss = next(row["train/loss"] for row in reversed(state["history"]))
    metrics = {"train/loss": train_loss, "eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss),
               "params": num_params(model), "tokens_seen": p.steps * p.batch_size * p.seq_len, "bf16": float(bf16)}
    with io.atomic_path(out_dir / "model") as tmp:
        save_pretrained(model, tok, tmp)
    write_metrics(out_dir / "metrics.json", metrics)
    shutil.rmtree(ckpt, ignore_errors=True)
    return StageResult({"model": out_dir / "model", "metrics": out_dir / "metrics.json"}, metrics)
