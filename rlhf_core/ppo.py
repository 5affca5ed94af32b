"""PPO against the reward model with a per-token KL penalty to the SFT policy, and optional PPO-ptx.

    python -m rlhf_core ppo

InstructGPT's objective  E[r(x, y) - beta log(pi(y|x) / pi_SFT(y|x))] + gamma_ptx E_pretrain[log pi(x)], optimised the
way the N+ implementation details prescribe: sampling with top_k=0/top_p=1, log-probs recomputed at the sampling
temperature, responses cut after the first EOS, a penalty for responses without one, GAE (gamma=1, lambda=0.95) with
whitened advantages, clipped policy and value losses against the policy that sampled the batch, several epochs of
reshuffled minibatches, a value model initialised from the reward model.

A checkpoint after every update holds everything (weights, optimizer, scheduler, RNG states, data position, KL
controller, metric history), so a run killed at any point and restarted ends where an uninterrupted run ends.
Writes <out>/model (the policy), <out>/metrics.json, <out>/history.jsonl, <out>/samples/update_XXXX.jsonl and, with
snapshot_every > 0, <out>/snapshots/update_XXXX (policies along the run, for over-optimization curves). With
stop_on_alarm, PPO watches gold and proxy at each snapshot (rlhf_core/watch.py), stops when the reward-hacking alarm
fires, and <out>/model is the snapshot best under gold; <out>/snapshots/watch.json says what the watch saw and chose.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from rlhf_core import io, loaders, runtime, watch
from rlhf_core.batching import collate, tokenize_example
from rlhf_core.config import Config
from rlhf_core.forwards import (
    Completions,
    decode_responses,
    lm_forward,
    ppo_proxy,
    response_logprobs,
    sample_as_ppo,
    scalar_outputs,
)
from rlhf_core.losses import (
    adaptive_kl_coef,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    lm_loss,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
)
from rlhf_core.models import load_causal_lm, load_reward_model, load_tokenizer, save_pretrained, score_head
from rlhf_core.training import (
    MetricsSink,
    StageResult,
    check_finite,
    epoch_order,
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


@dataclass
class Rollout(Completions):
    """One batch of episodes: the sampled completions (queries, query_mask, responses, response_mask, has_eos; no
    logits) and what PPO computed on them. B = responses, Q = prompt tokens (left-padded), R = response tokens."""

    logprobs: torch.Tensor = None      # (B, R) log pi_old(a_t | s_t) of the policy that sampled, at the temperature
    ref_logprobs: torch.Tensor = None  # (B, R) log pi_SFT(a_t | s_t), same temperature
    values: torch.Tensor = None        # (B, R) V_old(s_t)
    scores: torch.Tensor = None        # (B,) reward-model score after the no-EOS rule
    rewards: torch.Tensor = None       # (B, R) -beta KL per token, plus the score on the last kept token
    advantages: torch.Tensor = None    # (B, R) GAE advantages, whitened over the batch
    returns: torch.Tensor = None       # (B, R) GAE returns (advantages before whitening + values)

    def select(self, idx: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: None if v is None else v[idx] for f in fields(self) for v in [getattr(self, f.name)]})

    def trimmed(self) -> Rollout:
        """The same episodes without the columns that are padding in every row: prompt columns left of the longest
        prompt, response columns after the longest kept response. A minibatch's longest prompt and response are
        usually shorter than the whole batch's, and every loss is masked, so losses and gradients are unchanged."""
        prompt_cols, response_cols = self.query_mask.any(0).nonzero(), self.response_mask.any(0).nonzero()
        lo = int(prompt_cols[0]) if len(prompt_cols) else 0
        hi = int(response_cols[-1]) + 1 if len(response_cols) else self.responses.shape[1]
        return Rollout(**{f.name: (v[:, lo:] if f.name in ("queries", "query_mask") else
                                   v[:, :hi] if v is not None and v.dim() == 2 else v)
                          for f in fields(self) for v in [getattr(self, f.name)]})


class PolicyAndValue(nn.Module):
    """Everything PPO trains: the policy and its critic, either a separate value model (N+) or a head on the policy's
    own trunk ("shared", one forward for both). One optimizer steps both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, context: int, temperature: float):
        """Logits (B, R, V) and values (B, R) for the R tokens after the first `context` positions."""
        out = lm_forward(self.policy, ids, mask, context, output_hidden_states=self.value_head is not None)
        logits = out.logits[:, -(ids.shape[1] - context) - 1:-1].float() / temperature  # (B, R, V) t predicts t+1
        return logits, self.values(ids, mask, context, out)

    def values(self, ids: torch.Tensor, mask: torch.Tensor, context: int, policy_out=None) -> torch.Tensor:
        """V(s_t) for the R response positions, (B, R): the value model's own forward, or the shared head on the
        policy's last hidden state (from `policy_out` when the policy forward already ran)."""
        if self.value_head is None:
            return scalar_outputs(self.value_model, ids, mask)[:, context - 1:-1]
        if policy_out is None:
            policy_out = lm_forward(self.policy, ids, mask, context, output_hidden_states=True)
        return self.value_head(policy_out.hidden_states[-1][:, context - 1:-1]).squeeze(-1).float()


@torch.no_grad()
def rollout(pv: PolicyAndValue, ref: nn.Module, rm: nn.Module, tok, prompts: list[str], cfg: Config,
            kl_coef: float, device, bf16: bool = False) -> tuple[Rollout, dict[str, float]]:
    """1. sample responses, 2. score them, 3. per-token rewards and GAE advantages."""
    p = cfg.ppo
    pv.eval()
    t0 = time.perf_counter()
    with runtime.autocast(device, bf16):
        c = sample_as_ppo(pv.policy, tok, prompts, p, keep_logits=True)
    t1 = time.perf_counter()
    queries, qmask, responses, rmask, has_eos = c.queries, c.query_mask, c.responses, c.response_mask, c.has_eos
    ids, mask, q = c.input_ids, c.attention_mask, queries.shape[1]

    # log pi_old from the sampler's own logits (the same weights, KV-cached: equal to a fresh forward to ~1e-6)
    logits = c.logits / p.temperature                                         # (B, R, V)
    logprobs = token_logprobs(logits, responses)                              # (B, R)
    entropy = entropy_from_logits(logits)                                     # (B, R)
    c.logits = logits = None
    with runtime.autocast(device, bf16):
        values = pv.values(ids, mask, q)                                      # (B, R)
        ref_logprobs = response_logprobs(ref, ids, mask, q, responses, p.temperature)  # (B, R)
        scores = ppo_proxy(rm, c, p)                                             # (B,)

    kl = kl_penalty(logprobs, ref_logprobs, p.kl_estimator) * rmask           # (B, R)
    rewards = token_rewards(kl, scores, rmask, kl_coef)                       # (B, R)
    if p.whiten_rewards:
        rewards = masked_whiten(rewards, rmask, shift_mean=False) * rmask
    advantages, returns = compute_gae(rewards, values, rmask, p.gamma, p.lam)
    advantages = masked_whiten(advantages, rmask) * rmask
    batch = Rollout(queries, qmask, responses, rmask, has_eos, None, logprobs=logprobs * rmask,
                    ref_logprobs=ref_logprobs * rmask, values=values * rmask, scores=scores, rewards=rewards,
                    advantages=advantages, returns=returns)
    kl_sum = kl.sum(1)                                                        # (B,)
    non_score = (-kl_coef * kl).sum(1)                                        # (B,)
    stats = {"objective/kl": kl_sum.mean().item(),
             "objective/kl_k3": (kl_penalty(logprobs, ref_logprobs, "k3") * rmask).sum(1).mean().item(),
             "objective/entropy": (entropy * rmask).sum(1).mean().item(),
             "objective/non_score_reward": non_score.mean().item(),
             "objective/rlhf_reward": (scores + non_score).mean().item(),
             "objective/scores": scores.mean().item(),
             "val/num_eos_tokens": has_eos.sum().item(),
             "val/response_length": rmask.sum(1).float().mean().item(),
             "time/generate": t1 - t0, "time/score": time.perf_counter() - t1}
    return batch, stats


def ppo_step(pv: PolicyAndValue, batch: Rollout, opt, sched, cfg: Config, ptx_rows, ptx_cursor: int,
             pad_id: int, bf16: bool = False, where: str = "ppo") -> dict[str, float]:
    """4. several epochs of clipped PPO updates over reshuffled minibatches of one rollout batch."""
    p = cfg.ppo
    pv.train()
    device = batch.queries.device
    acc: dict[str, list[float]] = {}
    for _ in range(p.ppo_epochs):
        for mb in torch.randperm(len(batch.queries)).split(p.mini_batch_size):
            mb_loss = 0.0
            for micro in mb.split(p.micro_batch_size):
                b = batch.select(micro).trimmed()                                # (b, Q'), (b, R')
                with runtime.autocast(device, bf16):
                    logits, vpred = pv(b.input_ids, b.attention_mask, b.queries.shape[1], p.temperature)
                new_logprobs = token_logprobs(logits, b.responses)            # (b, R')
                pg_loss, pg = policy_loss(new_logprobs, b.logprobs, b.advantages, b.response_mask, p.cliprange)
                vf_loss, vf_clipfrac = value_loss(vpred, b.values, b.returns, b.response_mask, p.cliprange_value)
                loss = pg_loss + p.vf_coef * vf_loss
                if p.ptx_coef > 0:
                    rows = [ptx_rows[(ptx_cursor + i) % len(ptx_rows)] for i in range(p.ptx_batch_size)]
                    ptx_cursor += p.ptx_batch_size
                    x = collate(rows, pad_id, device)
                    with runtime.autocast(device, bf16):
                        ptx_logits = pv.policy(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                                               use_cache=False).logits
                    ptx_logits = ptx_logits.float()
                    ptx_loss = lm_loss(ptx_logits, x["input_ids"], x["loss_mask"])[0]
                    loss = loss + p.ptx_coef * ptx_loss
                    acc.setdefault("loss/ptx_avg", []).append(ptx_loss.item())
                (loss * len(micro) / len(mb)).backward()
                mb_loss += loss.item() * len(micro) / len(mb)
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits), b.response_mask)
                for k, v in (("policy/approxkl_avg", pg["approxkl"]), ("policy/clipfrac_avg", pg["clipfrac"]),
                             ("loss/policy_avg", pg_loss), ("loss/value_avg", vf_loss),
                             ("val/clipfrac_avg", vf_clipfrac), ("policy/entropy_avg", entropy),
                             ("val/ratio", pg["ratio"])):
                    acc.setdefault(k, []).append(v.item())
            optimizer_step(pv.parameters(), opt, sched, p.max_grad_norm, mb_loss, where)
    out = {k: sum(v) / len(v) for k, v in acc.items()}
    ratios = torch.tensor(acc["val/ratio"])
    out["val/ratio_var"] = ratios.var().item() if len(ratios) > 1 else 0.0
    return out


def inputs(cfg: Config) -> dict[str, loaders.DataInput]:
    """The data this stage reads, and how: the data stage, lineage and the stage itself use this one definition.
    PPO-ptx data is demonstrations (prompt/completion or messages) or a {"text"} corpus, told apart by its columns."""
    p, cols = cfg.ppo, cfg.ppo.columns or None
    data = loaders.declare(cfg, {"ppo.prompts": p.prompts, "ppo.sample_prompts": p.sample_prompts},
                           loaders.load_prompts, columns=cols)
    if p.ptx_coef > 0:
        source = cfg.data_path(p.ptx_data)
        load = loaders.read_corpus if loaders.is_corpus(source) else loaders.load_sft
        data.update(loaders.declare(cfg, {"ppo.ptx_data": p.ptx_data}, load))
    return data


def ptx_rows(data: list, tok, width: int) -> list:
    """Token rows for the PPO-ptx term: demonstrations (loss on completions) or corpus texts (loss on all)."""
    return [tokenize_example(tok, "", x, width) if isinstance(x, str) else
            tokenize_example(tok, x.prompt, x.completion, width) for x in data]


def build(cfg: Config, sft_model: str, reward_model: str, device):
    """Policy (trained), reference (frozen SFT), reward model (frozen) and the critic."""
    tok = load_tokenizer(sft_model)
    policy = load_causal_lm(sft_model, tok).to(device)
    ref = load_causal_lm(sft_model, tok).to(device).eval().requires_grad_(False)
    rm = load_reward_model(reward_model).to(device).eval().requires_grad_(False)
    if rm.get_input_embeddings().num_embeddings != policy.get_input_embeddings().num_embeddings:
        raise ValueError(f"reward model {reward_model} and policy {sft_model} have different vocabularies; "
                         "PPO needs one tokenizer for both")
    if cfg.ppo.value_model == "separate":  # initialised from the reward model (N+ detail 7)
        pv = PolicyAndValue(policy, value_model=load_reward_model(reward_model).to(device))
    else:
        rm_head = score_head(rm)
        head = nn.Linear(rm_head.in_features, 1).to(device)
        with torch.no_grad():
            head.weight.copy_(rm_head.weight), head.bias.zero_()
        pv = PolicyAndValue(policy, value_head=head)
    return tok, pv, ref, rm


def prompt_batch(prompts: list[str], update: int, p, seed: int) -> list[str]:
    """The prompts of one update: a seeded order per pass over the prompt set, so a resumed run sees the same ones."""
    start = update * p.rollout_batch_size
    return [prompts[epoch_order(len(prompts), seed, (start + i) // len(prompts))[(start + i) % len(prompts)]]
            for i in range(p.rollout_batch_size)]


def train_ppo(cfg: Config, sft_model: str, reward_model: str, out_dir: Path, sink: MetricsSink = null_sink,
              gold=None) -> StageResult:
    """PPO from `sft_model` against `reward_model`; `gold` (e.g. the simulated labeler) adds objective/gold."""
    p, out_dir = cfg.ppo, Path(out_dir)
    device, bf16 = setup_stage(cfg, out_dir)

    tok, pv, ref, rm = build(cfg, sft_model, reward_model, device)
    data = inputs(cfg)
    prompts, sample_prompts = data["ppo.prompts"].load(), data["ppo.sample_prompts"].load()[:p.n_samples]
    ptx = ptx_rows(data["ppo.ptx_data"].load(), tok, p.max_prompt_tokens + p.response_length) if p.ptx_coef > 0 else []
    if p.stop_on_alarm:  # the online watch: SFT's samples of the watch prompts are the curve's origin
        if gold is None:
            raise ValueError("ppo.stop_on_alarm watches the gold reward: train_ppo needs a gold scorer")
        watch_prompts = data["ppo.sample_prompts"].load()[:p.watch_prompts]
        watch_base = watch.baseline(ref, rm, tok, watch_prompts, cfg, gold, bf16)
    opt = make_optimizer(pv, p.lr, p.weight_decay)
    sched = make_scheduler(opt, p.updates * p.ppo_epochs * p.n_minibatches, 0, shape=p.lr_schedule)
    # work/ holds the checkpoint and the samples and snapshots made so far: DVC deletes a stage's declared outputs
    # before it reruns the stage, so they live here until the run ends, and a resumed run keeps the earlier ones
    work = out_dir / "checkpoint"
    made_with = fingerprint(cfg, "ppo", {"sft_model": sft_model, "reward_model": reward_model,
                                         **{k: d.source for k, d in data.items()}}, bf16)
    state = load_checkpoint(work / "trainer", pv, opt, sched, made_with)
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        state = {"update": 0, "kl_coef": p.kl_coef, "history": []}
        if p.stop_on_alarm:
            state.update(watch=[watch.origin()], watch_prompts=len(watch_prompts))
    replay(sink, state["history"])
    sink = recording(sink, state["history"])

    bar = progress(p.updates, "ppo", initial=state["update"], sink=sink)
    for u in range(state["update"], state.get("stopped") or p.updates):  # a run the alarm stopped stays stopped
        t0 = time.perf_counter()
        # 1-3. rollouts: sample, score, rewards and advantages
        batch_prompts = prompt_batch(prompts, u, p, cfg.base.seed)
        batch, stats = rollout(pv, ref, rm, tok, batch_prompts, cfg, state["kl_coef"], device, bf16)
        if gold is not None:
            stats["objective/gold"] = sum(gold.score_batch(batch_prompts, decode_responses(tok, batch.responses))) / len(
                batch_prompts)
        t1 = time.perf_counter()
        # 4. PPO epochs
        ptx_per_update = p.ppo_epochs * (p.rollout_batch_size // p.micro_batch_size) * p.ptx_batch_size
        stats.update(ppo_step(pv, batch, opt, sched, cfg, ptx, u * ptx_per_update, tok.pad_token_id, bf16,
                              f"ppo update {u + 1}"))
        # 5. KL controller, metrics, samples, snapshots, checkpoint
        stats.update({"objective/kl_coef": state["kl_coef"], "lr": sched.get_last_lr()[0],
                      "episode": (u + 1) * p.rollout_batch_size, "time/rollout": t1 - t0,
                      "time/update": time.perf_counter() - t1})
        if p.stop_on_alarm and (u + 1) % p.snapshot_every == 0:  # 6. the online watch: gold and proxy now
            state["watch"].append(watch.point(pv.policy, ref, rm, tok, watch_prompts, cfg, gold, watch_base, u + 1,
                                              bf16))
            stats.update({f"watch/{k}": v for k, v in state["watch"][-1].items() if k != "update"})
            if watch.alarm_now(state["watch"], cfg):
                state["stopped"] = u + 1
                print(f"ppo: reward-hacking alarm at update {u + 1} (proxy rising, gold falling): stopping",
                      file=sys.stderr)
        if p.adaptive_kl:
            state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], stats["objective/kl"], p.kl_target, p.kl_horizon,
                                                p.rollout_batch_size)
        state["update"] = u + 1
        sink(stats, u + 1)
        if (u + 1) % p.sample_every == 0 or u + 1 == p.updates:
            write_samples(pv.policy, tok, sample_prompts, cfg, work / "samples" / f"update_{u + 1:04d}.jsonl", rm, gold)
        if p.snapshot_every and (u + 1) % p.snapshot_every == 0:
            check_finite(pv.policy, f"ppo snapshot {u + 1}")
            with io.atomic_path(work / "snapshots" / f"update_{u + 1:04d}") as tmp:
                save_pretrained(pv.policy, tok, tmp)
        if (u + 1) % p.checkpoint_every == 0 or u + 1 == p.updates or state.get("stopped"):
            save_checkpoint(work / "trainer", pv, opt, sched, {**state, "fingerprint": made_with})
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/scores']:.2f}", kl=f"{stats['objective/kl']:.2f}", refresh=False)
        if state.get("stopped"):
            break
    bar.close()
    return finish(pv.policy, tok, state, out_dir, work, bf16)


def finish(policy: nn.Module, tok, state: dict, out_dir: Path, work: Path, bf16: bool) -> StageResult:
    """Every declared output, from the final state (also when a resumed run had no update left): the policy (with the
    online watch: the snapshot best under gold), the history, the last update's metrics, and the samples and
    snapshots (hard links, so a kill before the checkpoint is dropped loses nothing), then the checkpoint goes."""
    check_finite(policy, "ppo policy")
    chosen = watch.best(state["watch"]) if len(state.get("watch", [])) > 1 else None
    with io.atomic_path(out_dir / "model") as tmp:
        if chosen:
            shutil.copytree(work / "snapshots" / f"update_{chosen['update']:04d}", tmp)
        else:
            save_pretrained(policy, tok, tmp)
    io.write_jsonl(out_dir / "history.jsonl", state["history"])
    final = {k: v for k, v in state["history"][-1].items() if not k.startswith("time/") and k != "step"}
    final.update(kl_coef_final=state["kl_coef"], bf16=float(bf16))
    if chosen:
        final.update({"watch/best_update": chosen["update"], "watch/alarm_update": state.get("stopped", -1)})
    write_metrics(out_dir / "metrics.json", final)
    for name in ("samples", "snapshots"):
        with io.atomic_path(out_dir / name) as tmp:
            if (work / name).exists():
                # dot-names are atomic writes a kill interrupted (io.atomic_path's temporaries): not outputs
                shutil.copytree(work / name, tmp, copy_function=os.link, ignore=shutil.ignore_patterns(".*"))
            else:
                tmp.mkdir()
            if name == "snapshots" and chosen:
                io.write_json(tmp / "watch.json", {"best_update": chosen["update"], "prompts": state["watch_prompts"],
                                                 "alarm_update": state.get("stopped", -1), "points": state["watch"]})
    shutil.rmtree(work, ignore_errors=True)
    return StageResult({"model": out_dir / "model", "metrics": out_dir / "metrics.json",
                        "history": out_dir / "history.jsonl", "samples": out_dir / "samples",
                        "snapshots": out_dir / "snapshots"}, final)


@torch.no_grad()
def write_samples(policy, tok, prompts: list[str], cfg: Config, path: Path, rm, gold) -> None:
    """A table of sample completions with their proxy (the score PPO optimises) and gold rewards, sampled as PPO
    samples from a private random stream (seeded by base.seed), so training's stream is untouched."""
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.base.seed)
    c = sample_as_ppo(policy, tok, prompts, cfg.ppo)
    torch.set_rng_state(rng)
    texts, proxy = decode_responses(tok, c.responses), ppo_proxy(rm, c, cfg.ppo).tolist()
    golds = gold.score_batch(prompts, texts) if gold is not None else [None] * len(texts)
    io.write_jsonl(path, [{"prompt": pr, "completion": t, "proxy": round(s, 4), "gold": g if g is None else round(g, 4)}
                          for pr, t, s, g in zip(prompts, texts, proxy, golds)])
