"""PPO and reward-model throughput: rlhf-pipeline against TRL 1.12.0 on the same work, in the same run.

    pip install -e '.[bench]'            # TRL 1.12.0: benchmark-only, never needed by the product
    python benchmarks/vs_trl.py ppo      # PPO updates: rollouts/s, tokens/s, phase split, peak RSS, matmul-peak fraction
    python benchmarks/vs_trl.py rm       # reward model: pairs/s, peak RSS
    python benchmarks/vs_trl.py all

The work is fixed (issue 7): a GPT-2-style model, 4 layers, width 256, 4 heads, vocab 4096, random init (the same
weights for both). PPO: 64 prompts of 16 tokens, exactly 32 new tokens (no stop token), 4 epochs x 4 minibatches of
16, a separate value model, a frozen reference and reward model. RM: 2,048 pairs of 48-token sequences, 32 pairs a
batch, one epoch.

Every measurement runs in a fresh subprocess (so peak RSS is that implementation's own) and the implementations
alternate (ours, TRL, ours, TRL, ...); the figures are medians over rounds. Rates exclude start-up: they are taken
between the end of the first update (or optimizer step) and the end of the last, so model loading, dataset
preparation, the first step's one-off costs and the final save are outside them. The matmul peak is measured in the
same run: the best of large square matmuls per dtype on this machine's threads.

Variants:
  PPO  ours (project defaults: base.dtype auto, per-update checkpoint)  vs  TRL at its defaults (bf16=True,
       gradient_checkpointing=True), and both in fp32 (TRL bf16=False, gradient_checkpointing=False: its fastest).
  RM   ours (defaults)  vs  TRL RewardTrainer at its defaults (bf16=True, gradient_checkpointing=True, lr 1e-4), and
       TRL in fp32 without checkpointing for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, WIDTH, HEADS, VOCAB = 4, 256, 4, 4096
PPO = dict(prompts=64, prompt_tokens=16, new_tokens=32, epochs=4, minibatches=4, minibatch=16, temperature=0.7,
           kl_coef=0.05)
RM = dict(pairs=2048, tokens=48, batch=32, prompt_tokens=16)


# ----------------------------------------------------------------------------------------------------------------------
# shared set-up: one tokenizer, one set of weights, one dataset, written once and loaded by every child process


def word(i: int) -> str:
    return f"w{i}"


def make_workdir(work: Path, seed: int = 0) -> None:
    """A word-level tokenizer (so a prompt of n words is exactly n tokens), the models and the data."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    from rlhf_core.models import EOS, PAD

    vocab = {EOS: 0, PAD: 1, "<unk>": 2, **{word(i): i for i in range(3, VOCAB)}}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token="<unk>",
                                  padding_side="left", model_max_length=1_000_000)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    lm = GPT2LMHeadModel(config)
    lm.save_pretrained(work / "policy"), tok.save_pretrained(work / "policy")
    torch.manual_seed(seed + 1)
    rm = GPT2ForSequenceClassification.from_pretrained(work / "policy", num_labels=1)
    rm.save_pretrained(work / "reward"), tok.save_pretrained(work / "reward")

    rng = random.Random(seed)
    words = lambda n: " ".join(word(rng.randrange(3, VOCAB)) for _ in range(n))  # noqa: E731
    with open(work / "prompts.jsonl", "w") as f:
        for _ in range(PPO["prompts"] * 8):
            f.write(json.dumps({"prompt": words(PPO["prompt_tokens"])}) + "\n")
    # a pair: a 16-token prompt and two 31-token responses; the EOS both implementations append makes 48 tokens
    n_resp = RM["tokens"] - RM["prompt_tokens"] - 1
    with open(work / "pairs.jsonl", "w") as f:
        for _ in range(RM["pairs"]):
            f.write(json.dumps({"prompt": words(RM["prompt_tokens"]), "chosen": " " + words(n_resp),
                                "rejected": " " + words(n_resp)}) + "\n")
    with open(work / "pairs_test.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": words(RM["prompt_tokens"]), "chosen": " " + words(n_resp),
                                "rejected": " " + words(n_resp)}) + "\n")


def matmul_peak() -> dict[str, float]:
    """GFLOP/s of the best large square matmul per dtype on this machine (bf16 probed small first: emulated bf16 on
    AVX2-only CPUs runs ~100x slower and would take minutes at full size)."""
    import torch

    def rate(n: int, dtype, reps: int) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best / 1e9

    out = {"fp32": max(rate(n, torch.float32, 5) for n in (512, 1024, 2048))}
    bf16_small = rate(256, torch.bfloat16, 3)
    out["bf16"] = max(bf16_small, *(rate(n, torch.bfloat16, 3) for n in (1024, 2048))) if bf16_small > 50 else bf16_small
    out["threads"] = torch.get_num_threads()
    return out


def ppo_train_flops() -> float:
    """Matmul FLOPs the train phase of one update needs (forward + backward = 3x forward) over policy and value
    model: 4 epochs x 64 sequences of 48 tokens; attention over the full 48 x 48 (as SDPA runs it masked); the LM
    head only where a log-prob is needed (the 32 response positions). Work an implementation does beyond this
    (e.g. the LM head on prompt positions) counts as its overhead, not as useful FLOPs."""
    t, r = PPO["prompt_tokens"] + PPO["new_tokens"], PPO["new_tokens"]
    trunk = LAYERS * (24 * WIDTH**2 + 4 * t * WIDTH) * t      # per sequence: qkv, proj, mlp + QK^T and AV
    per_seq = (trunk + 2 * WIDTH * VOCAB * r) + (trunk + 2 * WIDTH * t)  # policy + LM head, value model + head
    return 3 * per_seq * PPO["prompts"] * PPO["epochs"]


def rm_step_flops() -> float:
    """Matmul FLOPs of one reward-model step: 2 x batch sequences of 48 tokens through the trunk, forward + backward."""
    t = RM["tokens"]
    return 3 * LAYERS * (24 * WIDTH**2 + 4 * t * WIDTH) * t * 2 * RM["batch"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------------
# children: one implementation, one measurement, JSON on the last line of stdout


def child_ours_ppo(work: Path, updates: int, dtype: str) -> dict:
    from rlhf_core.config import load_config
    from rlhf_core.ppo import train_ppo

    over = {"base.dtype": dtype, "base.data_dir": str(work), "ppo.prompts": "prompts.jsonl",
            "ppo.sample_prompts": "prompts.jsonl", "ppo.updates": updates, "ppo.rollout_batch_size": PPO["prompts"],
            "ppo.mini_batch_size": PPO["minibatch"], "ppo.micro_batch_size": PPO["minibatch"],
            "ppo.ppo_epochs": PPO["epochs"], "ppo.max_prompt_tokens": PPO["prompt_tokens"],
            "ppo.response_length": PPO["new_tokens"], "ppo.stop_at_eos": False, "ppo.value_model": "separate",
            "ppo.temperature": PPO["temperature"], "ppo.kl_coef": PPO["kl_coef"], "ppo.sample_every": 10**6}
    cfg = load_config(ROOT / "params.yaml", overrides=[f"{k}={v}" for k, v in over.items()])
    ends, phases = [], []

    def sink(stats, step):
        ends.append(time.perf_counter())
        phases.append((stats["time/generate"], stats["time/score"], stats["time/update"]))

    with tempfile.TemporaryDirectory() as out:
        train_ppo(cfg, str(work / "policy"), str(work / "reward"), Path(out), sink=sink)
    from rlhf_core import runtime
    return _ppo_result(ends, phases, bf16=runtime.use_bf16(cfg.base, runtime.resolve_device(cfg.base)))


def child_trl_ppo(work: Path, updates: int, bf16: bool, gc: bool) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl.experimental.ppo.ppo_trainer as T
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # phase clocks: generation, and the no-grad forwards of the rollout (reference, value, reward); the rest is train
    clock = {"generate": 0.0, "score": 0.0}
    train_autocast = []  # whether TRL's train-phase forwards actually run under bf16 autocast

    def timed(fn, key, only_no_grad=False):
        def wrapper(*a, **kw):
            if only_no_grad and torch.is_grad_enabled():
                train_autocast.append(torch.is_autocast_enabled("cpu"))
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[key] += time.perf_counter() - t
        return wrapper

    T.batch_generation = timed(T.batch_generation, "generate")
    T.forward = timed(T.forward, "score", only_no_grad=True)
    T.get_reward = timed(T.get_reward, "score", only_no_grad=True)

    ends, marks = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            marks.append((clock["generate"], clock["score"]))

    tok = AutoTokenizer.from_pretrained(work / "policy")
    with open(work / "prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    ds = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]})
    assert all(len(r) == PPO["prompt_tokens"] for r in ds["input_ids"])
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, use_cpu=True, report_to="none", bf16=bf16, gradient_checkpointing=gc,
                         per_device_train_batch_size=PPO["prompts"], gradient_accumulation_steps=1,
                         num_mini_batches=PPO["minibatches"], num_ppo_epochs=PPO["epochs"],
                         response_length=PPO["new_tokens"], stop_token=None, temperature=PPO["temperature"],
                         kl_coef=PPO["kl_coef"], total_episodes=PPO["prompts"] * updates,
                         local_rollout_forward_batch_size=PPO["prompts"], num_sample_generations=0,
                         save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
        trainer = PPOTrainer(args=args, processing_class=tok,
                             model=AutoModelForCausalLM.from_pretrained(work / "policy"),
                             ref_model=AutoModelForCausalLM.from_pretrained(work / "policy"),
                             reward_model=AutoModelForSequenceClassification.from_pretrained(work / "reward"),
                             value_model=AutoModelForSequenceClassification.from_pretrained(work / "reward"),
                             train_dataset=ds, eval_dataset=ds, callbacks=[Clock()])
        trainer.train()
    # per-update phase times from the cumulative clocks; train = the rest of the update
    phases, prev, prev_end = [], (0.0, 0.0), None
    for end, m in zip(ends, marks):
        g, s = m[0] - prev[0], m[1] - prev[1]
        phases.append((g, s, None if prev_end is None else (end - prev_end) - g - s))
        prev, prev_end = m, end
    # bf16=True is accepted but the PPO trainer's forwards run in fp32 (no autocast): report what actually ran
    return _ppo_result(ends, phases, bf16=any(train_autocast)) | {"bf16_requested": bf16, "gc_requested": gc}


def _ppo_result(ends: list[float], phases: list[tuple], bf16: bool) -> dict:
    """Rates between the end of update 1 and the end of the last; phases averaged over the same updates."""
    n = len(ends) - 1
    seconds = ends[-1] - ends[0]
    gen = statistics.mean(p[0] for p in phases[1:])
    score = statistics.mean(p[1] for p in phases[1:])
    train = statistics.mean(p[2] for p in phases[1:])
    return {"rollouts_per_s": n * PPO["prompts"] / seconds, "tokens_per_s": n * PPO["prompts"] * PPO["new_tokens"] / seconds,
            "s_per_update": seconds / n, "generate_s": gen, "score_s": score, "train_s": train,
            "other_s": seconds / n - gen - score - train, "train_gflops": ppo_train_flops() / train / 1e9,
            "peak_rss_mb": peak_rss_mb(), "bf16": bf16, "updates_timed": n}


def child_ours_rm(work: Path) -> dict:
    from rlhf_core.config import load_config
    from rlhf_core.reward import train_reward

    over = {"base.data_dir": str(work), "reward.train_data": "pairs.jsonl", "reward.eval_data": "pairs_test.jsonl",
            "reward.ranking_mode": "pairs", "reward.batch_size": RM["batch"], "reward.micro_batch_size": RM["batch"],
            "reward.epochs": 1, "reward.max_length": RM["tokens"], "reward.eval_every": 10**6,
            "reward.normalize_samples": 0, "reward.gold_eval": False}
    cfg = load_config(ROOT / "params.yaml", overrides=[f"{k}={v}" for k, v in over.items()])
    ends = []
    with tempfile.TemporaryDirectory() as out:
        train_reward(cfg, str(work / "policy"), None, Path(out),
                     sink=lambda m, s: ends.append(time.perf_counter()) if "train/loss" in m else None)
    return _rm_result(ends)


def child_trl_rm(work: Path, defaults: bool, max_steps: int = -1, gc: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with open(work / "pairs.jsonl") as f:
        rows = [json.loads(line) for line in f]
    ds = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(work / "policy")
    model = AutoModelForSequenceClassification.from_pretrained(work / "policy", num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    extra = {} if defaults else {"bf16": False, "gradient_checkpointing": gc}
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=RM["batch"],
                            num_train_epochs=1, max_steps=max_steps, save_strategy="no", disable_tqdm=True, seed=0,
                            **extra)
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        lengths = {len(x) for x in trainer.train_dataset["chosen_ids"]} | {len(x) for x in trainer.train_dataset["rejected_ids"]}
        assert lengths == {RM["tokens"]}, lengths
        trainer.train()
    return _rm_result(ends) | {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


def _rm_result(ends: list[float]) -> dict:
    n = len(ends) - 1
    return {"pairs_per_s": n * RM["batch"] / (ends[-1] - ends[0]), "steps_timed": n, "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"ours_ppo": child_ours_ppo, "trl_ppo": child_trl_ppo, "ours_rm": child_ours_rm, "trl_rm": child_trl_rm}


# ----------------------------------------------------------------------------------------------------------------------
# parent: set up once, alternate implementations in fresh processes, print medians and ratios


def run_child(name: str, work: Path, **kw) -> dict:
    spec = json.dumps({"name": name, "work": str(work), "kw": kw})
    proc = subprocess.run([sys.executable, __file__, "_child", spec], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {kw} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(variants: dict[str, tuple[str, dict]], work: Path, rounds: int) -> dict[str, dict]:
    """Each variant `rounds` times, interleaved; the median of every figure."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for label, (child, kw) in variants.items():
            res = run_child(child, work, **kw)
            runs[label].append(res)
            print(f"  round {r + 1}: {label:<28} " + "  ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    return {label: {k: statistics.median(x[k] for x in rs) if isinstance(rs[0][k], float) else rs[0][k]
                    for k in rs[0]} for label, rs in runs.items()}


def bench_ppo(work: Path, rounds: int, updates: int, peak: dict) -> None:
    variants = {
        "ours (defaults)": ("ours_ppo", {"updates": updates, "dtype": "auto"}),
        "TRL (defaults: bf16, gc)": ("trl_ppo", {"updates": updates, "bf16": True, "gc": True}),
        "ours (fp32)": ("ours_ppo", {"updates": updates, "dtype": "fp32"}),
        "TRL (fp32, no gc)": ("trl_ppo", {"updates": updates, "bf16": False, "gc": False}),
    }
    res = measure(variants, work, rounds)
    print(f"\nPPO: {PPO['prompts']} prompts x {PPO['prompt_tokens']} tokens, {PPO['new_tokens']} new tokens, "
          f"{PPO['epochs']} epochs x {PPO['minibatches']} minibatches of {PPO['minibatch']}; model {LAYERS}x{WIDTH}, "
          f"vocab {VOCAB}; {updates - 1} timed updates, median of {rounds} rounds; train phase "
          f"{ppo_train_flops() / 1e9:.0f} GFLOP/update")
    print(f"matmul peak ({peak['threads']} threads): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    head = (f"{'variant':<26}{'rollouts/s':>11}{'tokens/s':>10}{'s/update':>10}{'generate':>10}{'score':>8}"
            f"{'train':>8}{'other':>8}{'train % peak':>13}{'peak RSS MB':>12}")
    print(head)
    for label, r in res.items():
        frac = r["train_gflops"] / peak["bf16" if r["bf16"] else "fp32"]
        print(f"{label:<26}{r['rollouts_per_s']:>11.2f}{r['tokens_per_s']:>10.0f}{r['s_per_update']:>10.2f}"
              f"{r['generate_s']:>10.2f}{r['score_s']:>8.2f}{r['train_s']:>8.2f}{r['other_s']:>8.2f}"
              f"{100 * frac:>12.0f}%{r['peak_rss_mb']:>12.0f}")
    for ours, trl in (("ours (defaults)", "TRL (defaults: bf16, gc)"), ("ours (fp32)", "TRL (fp32, no gc)")):
        o, t = res[ours], res[trl]
        print(f"ratio {ours} / {trl}: rollouts/s {o['rollouts_per_s'] / t['rollouts_per_s']:.2f}x, "
              f"peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


def bench_rm(work: Path, rounds: int, peak: dict) -> None:
    # TRL's defaults ask for bf16 autocast: on a CPU without native bf16 that runs ~60 s a step, so that variant is
    # timed over its first steps only (rates are per step either way)
    variants = {"ours (defaults)": ("ours_rm", {}),
                "TRL (defaults: bf16, gc)": ("trl_rm", {"defaults": True, "max_steps": 3}),
                "TRL (fp32, gc)": ("trl_rm", {"defaults": False, "gc": True}),
                "TRL (fp32, no gc)": ("trl_rm", {"defaults": False})}
    res = measure(variants, work, rounds)
    print(f"\nRM: {RM['pairs']} pairs of {RM['tokens']} tokens, {RM['batch']} pairs a batch, 1 epoch; "
          f"median of {rounds} rounds")
    print(f"{'variant':<26}{'pairs/s':>10}{'steps timed':>12}{'train % peak':>13}{'peak RSS MB':>12}")
    for label, r in res.items():
        frac = r["pairs_per_s"] / RM["batch"] * rm_step_flops() / 1e9 / peak["bf16" if r.get("bf16") else "fp32"]
        print(f"{label:<26}{r['pairs_per_s']:>10.1f}{r['steps_timed']:>12}{100 * frac:>12.0f}%{r['peak_rss_mb']:>12.0f}")
    for trl in [v for v in res if v.startswith("TRL")]:
        o, t = res["ours (defaults)"], res[trl]
        print(f"ratio ours / {trl}: pairs/s {o['pairs_per_s'] / t['pairs_per_s']:.2f}x, "
              f"peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        spec = json.loads(sys.argv[2])
        print(json.dumps(CHILDREN[spec["name"]](Path(spec["work"]), **spec["kw"])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("ppo", "rm", "all"))
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant (median reported)")
    ap.add_argument("--updates", type=int, default=4, help="PPO updates per run; the first is not timed")
    args = ap.parse_args()
    peak = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_workdir(work)
        if args.what in ("ppo", "all"):
            bench_ppo(work, args.rounds, args.updates, peak)
        if args.what in ("rm", "all"):
            bench_rm(work, args.rounds, peak)


if __name__ == "__main__":
    main()
