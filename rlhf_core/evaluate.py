"""Evaluation on held-out prompts, and reward over-optimization curves (Gao, Schulman & Hilton 2022).

    python -m rlhf_core evaluate

For the SFT model and each policy: mean proxy (reward-model) and gold reward with standard errors, KL(pi || pi_SFT)
estimated from samples (± SE), win rate against SFT under gold on the same prompts (ties count half), response length,
distinct-1/2 and repetition, and a side-by-side table of completions. Every model samples from the same seeded random
stream (common random numbers), so differences of means between models are less noisy than the models' own spreads;
win rates are taken against a second, independent SFT sample (sft/win_rate, ~0.5, shows their noise).

When PPO snapshots exist (ppo.snapshot_every > 0), each is evaluated too, giving points (d = sqrt(KL), proxy, gold) along
the run; best-of-n from SFT gives a second curve with d = sqrt(log n - (n-1)/n). Gold and proxy in the curves are
relative to SFT (R(0) = 0); Gao et al.'s forms are fitted to the gold (rlhf_core/overopt.py) and a reward-hacking alarm
watches the snapshots. Writes <out>/metrics.json, report.md, completions.csv and plots/{overopt_rl,overopt_bon}.csv
(for `dvc plots`: x = d, y = gold / proxy), plots/overopt.png.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from rlhf_core import io, loaders, overopt
from rlhf_core.config import Config
from rlhf_core.labeler import SimulatedLabeler, words
from rlhf_core.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf_core.scoring import Samples, curve_point, sample_and_score
from rlhf_core.scoring import mean_se as _mean_se
from rlhf_core.training import MetricsSink, StageResult, null_sink, progress, setup_stage, write_metrics


def inputs(cfg: Config) -> dict[str, loaders.DataInput]:
    """The data this stage reads, and how: the data stage, lineage and the stage itself use this one definition."""
    e = cfg.evaluate
    return loaders.declare(cfg, {"evaluate.prompts": e.prompts}, loaders.load_prompts, columns=e.columns or None)


def text_stats(texts: list[str]) -> dict[str, float]:
    """distinct-n (unique word n-grams / all n-grams over all responses; Li et al. 2016) and repetition (mean share of
    a response's word bigrams that repeat an earlier one in the same response)."""
    toks = [words(t) for t in texts]
    out = {}
    for n in (1, 2):
        grams = [tuple(w[i:i + n]) for w in toks for i in range(len(w) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    bigrams = [list(itertools.pairwise(w)) for w in toks]
    out["repetition"] = float(np.mean([1 - len(set(b)) / len(b) if b else 0.0 for b in bigrams]))
    return out


def summarize(name: str, s: Samples, base: Samples, rival: Samples) -> dict[str, float]:
    """Flat metrics of one model against SFT on the same prompts: `base` drawn from the model's own random stream (for
    differences of means), `rival` drawn independently (for the win rate, which coupled samples would change)."""
    tie = np.isclose(s.gold, rival.gold, rtol=0, atol=1e-9)                                 # (N,)
    win = ((s.gold > rival.gold) & ~tie) + 0.5 * tie                                        # (N,) ties count half
    m: dict[str, float] = {}
    m[f"{name}/proxy_mean"], m[f"{name}/proxy_se"] = _mean_se(s.proxy)
    m[f"{name}/gold_mean"], m[f"{name}/gold_se"] = _mean_se(s.gold)
    m[f"{name}/gold_delta"], m[f"{name}/gold_delta_se"] = _mean_se(s.gold - base.gold)
    m[f"{name}/win_rate"], m[f"{name}/win_rate_se"] = _mean_se(win)
    m[f"{name}/kl"], m[f"{name}/kl_se"] = overopt.sampled_kl(s.logprobs, s.ref_logprobs)
    m[f"{name}/length"], m[f"{name}/eos_rate"] = float(s.lengths.mean()), float(s.has_eos.mean())
    m.update({f"{name}/{k}": v for k, v in text_stats(s.texts).items()})
    return m


def best_of_n_curve(ref, rm, tok, prompts: list[str], cfg: Config, gold, seed: int,
                    bf16: bool = False) -> list[dict[str, float]]:
    """Best-of-n from SFT for n = 1..bon_n: bon_n samples per prompt drawn once, the proxy-best of n picked by the
    unbiased all-subsets estimator; d = sqrt(KL_bon(n)), proxy and gold relative to n = 1 (the SFT mean)."""
    big_n, prompts = cfg.evaluate.bon_n, prompts[:cfg.evaluate.bon_prompts]
    s = sample_and_score(ref, ref, rm, tok, [p for p in prompts for _ in range(big_n)], cfg, gold, seed, bf16)
    proxy, golds = s.proxy.reshape(len(prompts), big_n), s.gold.reshape(len(prompts), big_n)  # (P, N)
    rows = []
    for n in range(1, big_n + 1):
        p_best, g_best = overopt.best_of_n(proxy, golds, n)                                   # (P,), (P,)
        gold_rel, gold_se = _mean_se(g_best - golds.mean(1))
        kl = float(overopt.kl_bon(n))
        rows.append({"n": n, "d": math.sqrt(kl), "kl_bon": kl, "proxy": float((p_best - proxy.mean(1)).mean()),
                     "gold": gold_rel, "gold_se": gold_se})
    return rows


def fit_curve(rows: list[dict], form: str) -> overopt.Fit | None:
    """Gao et al.'s form fitted to the gold of the points with d > 0, weighted by their standard errors; None with
    fewer than 3 such points (two parameters through two points always give R^2 = 1)."""
    pts = [r for r in rows if r["d"] > 0]
    if len(pts) < 3:
        return None
    fit = overopt.fit_rl if form == "rl" else overopt.fit_bon
    return fit([r["d"] for r in pts], [r["gold"] for r in pts], [r["gold_se"] for r in pts])


def proxy_spearman(rows: list[dict]) -> dict[str, float]:
    """Spearman rank correlation of the proxy with d over curve points: does optimisation keep paying on the proxy?"""
    from scipy.stats import spearmanr

    if len(rows) < 3:
        return {}
    return {"proxy_spearman": float(spearmanr([r["d"] for r in rows], [r["proxy"] for r in rows]).statistic)}


def fit_metrics(prefix: str, fit: overopt.Fit | None) -> dict[str, float]:
    if fit is None:
        return {}
    out = {f"{prefix}_alpha": fit.alpha, f"{prefix}_beta": fit.beta, f"{prefix}_r2": fit.r2}
    if math.isfinite(fit.d_star):
        out.update({f"{prefix}_d_star": fit.d_star, f"{prefix}_gold_star": fit.r_star})
    return out


def evaluate(cfg: Config, sft_model: str, reward_model: str, policies: dict[str, str | Path], out_dir: Path,
             sink: MetricsSink = null_sink, gold=None, snapshots: Path | None = None) -> StageResult:
    """Evaluate SFT and `policies` ({name: model dir}) on cfg.evaluate.prompts, plus over-optimization curves from the
    PPO snapshots under `snapshots` (update_XXXX dirs) and best-of-n. `gold` scores responses (default: the labeler)."""
    e, out_dir, gold = cfg.evaluate, Path(out_dir), gold or SimulatedLabeler()
    if "sft" in policies:
        raise ValueError('"sft" names the reference model; give the policy another name')
    device, bf16 = setup_stage(cfg, out_dir)

    # 1. models and prompts
    tok = load_tokenizer(sft_model)
    ref = load_causal_lm(sft_model, tok).to(device).eval().requires_grad_(False)
    rm = load_reward_model(reward_model).to(device).eval().requires_grad_(False)
    prompts = evaluation_prompts(cfg)
    snaps = sorted(Path(snapshots).glob("update_*")) if snapshots else []
    models = {"sft": sft_model, **{str(k): str(v) for k, v in policies.items()},
              **{f"snapshot_{p.name}": str(p) for p in snaps}}

    # 2. sample and score every model on the same prompts from the same random stream
    bar = progress(len(models) + 1 + (e.bon_n > 0), "evaluate")
    results: dict[str, Samples] = {}
    for name, path in models.items():
        model = ref if name == "sft" else load_causal_lm(path, tok).to(device).requires_grad_(False)
        # snapshots on a prefix of the prompts: the curve needs many points, each less precisely than the policy
        some = prompts[:e.snapshot_prompts] if name.startswith("snapshot_") else prompts
        results[name] = sample_and_score(model, ref, rm, tok, some, cfg, gold, cfg.base.seed, bf16)
        bar.update(1)
    base = results["sft"]
    # an independent SFT sample to win against: common random numbers would make a policy near SFT tie with it
    rival = sample_and_score(ref, ref, rm, tok, prompts, cfg, gold, cfg.base.seed + 1, bf16)
    bar.update(1)
    metrics = {k: v for name in (*policies, "sft")
               for k, v in summarize(str(name), results[str(name)], base, rival).items()}

    # 3. over-optimization: RL curve over snapshots (update 0 = SFT), best-of-n from SFT, fits, reward-hacking alarm
    snap_base = base.head(e.snapshot_prompts)
    rl_rows = [{"update": 0, **curve_point(snap_base, snap_base)}]
    for p in snaps:
        rl_rows.append({"update": int(p.name.split("_")[1]), **curve_point(results[f"snapshot_{p.name}"], snap_base)})
        sink({f"overopt/{k}": v for k, v in rl_rows[-1].items() if k != "update"}, rl_rows[-1]["update"])
    bon_rows = best_of_n_curve(ref, rm, tok, prompts, cfg, gold, cfg.base.seed, bf16) if e.bon_n > 0 else []
    bar.update(e.bon_n > 0)
    bar.close()
    if not snaps:
        rl_rows = []
    fits, alarm, overopt_metrics = overoptimization(rl_rows, bon_rows, e)
    metrics.update(overopt_metrics)

    # 4. outputs (curves of an earlier run with snapshots must not outlive it)
    outputs = write_curves(out_dir / "plots", rl_rows, bon_rows, fits,
                           f"snapshots on {min(e.snapshot_prompts, len(prompts))} prompts, best-of-n on "
                           f"{min(e.bon_prompts, len(prompts))}")
    write_csv(out_dir / "completions.csv", [
        {"model": name, "prompt_index": i, "prompt": prompts[i], "completion": s.texts[i],
         "proxy": s.proxy[i], "gold": s.gold[i], "kl": s.logprobs[i] - s.ref_logprobs[i], "length": int(s.lengths[i])}
        for name, s in results.items() for i in range(len(s.texts))])
    watch = online_watch(Path(snapshots)) if snapshots else None
    metrics.update({f"watch/{k}": float(watch[k]) for k in ("best_update", "alarm_update")} if watch else {})
    io.write_text(out_dir / "report.md", report(cfg, prompts, results, [str(k) for k in policies], metrics, fits,
                                                alarm, rl_rows, gold, watch))
    metrics = {**{k: v for k, v in metrics.items() if math.isfinite(v)}, "bf16": float(bf16)}
    sink(metrics, 0)
    write_metrics(out_dir / "metrics.json", metrics)
    return StageResult({"metrics": out_dir / "metrics.json", "report": out_dir / "report.md",
                        "completions": out_dir / "completions.csv", **outputs}, metrics)


def evaluation_prompts(cfg: Config) -> list[str]:
    """The first evaluate.n_prompts prompts (all of them, said on stderr, when the file holds fewer)."""
    e = cfg.evaluate
    prompts = inputs(cfg)["evaluate.prompts"].load()
    if len(prompts) < e.n_prompts:
        print(f"evaluate: {e.prompts} holds {len(prompts)} prompts, fewer than evaluate.n_prompts = {e.n_prompts}; "
              f"evaluating on all {len(prompts)}", file=sys.stderr)
    return prompts[:e.n_prompts]


def online_watch(snapshots: Path) -> dict | None:
    """What PPO's online watch (ppo.stop_on_alarm) decided, from <ppo>/snapshots/watch.json; None when it was off."""
    path = snapshots / "watch.json"
    return json.loads(path.read_text()) if path.is_file() else None


def overoptimization(rl_rows: list[dict], bon_rows: list[dict], e) -> tuple[dict, dict | None, dict[str, float]]:
    """Gao et al.'s fits of the RL curve (snapshots; empty = none) and of best-of-n, the proxy's rank correlation
    with d, and the reward-hacking alarm: (fits, alarm or None, metrics)."""
    fits = {"rl": fit_curve(rl_rows, "rl") if rl_rows else None, "bon": fit_curve(bon_rows, "bon")}
    metrics: dict[str, float] = {}
    for form, fit in fits.items():
        metrics.update(fit_metrics(f"overopt/{form}", fit))
    if not rl_rows:
        return fits, None, metrics
    metrics.update({f"overopt/rl_{k}": v for k, v in proxy_spearman(rl_rows).items()})
    alarm = overopt.hacking_alarm([r["proxy"] for r in rl_rows], [r["gold"] for r in rl_rows], e.alarm_window,
                                  e.alarm_tolerance, [r["gold_se"] for r in rl_rows], e.alarm_z)
    metrics["hacking_alarm"] = int(alarm["alarm"])
    metrics["hacking_alarm_update"] = rl_rows[alarm["first"]]["update"] if alarm["alarm"] else -1
    return fits, alarm, metrics


def write_curves(plots: Path, rl_rows: list[dict], bon_rows: list[dict], fits: dict, prompts: str) -> dict[str, Path]:
    """plots/overopt_{rl,bon}.csv (for `dvc plots`) and plots/overopt.png; an earlier run's curves are removed first."""
    shutil.rmtree(plots, ignore_errors=True)
    if rl_rows:
        write_csv(plots / "overopt_rl.csv", rl_rows)
    if bon_rows:
        write_csv(plots / "overopt_bon.csv", bon_rows)
    if not (rl_rows or bon_rows):
        return {}
    plot_overopt([("RL (PPO snapshots)", rl_rows, fits["rl"]), ("best-of-n", bon_rows, fits["bon"])],
                 plots / "overopt.png", f"Reward over-optimization (gold relative to SFT; {prompts})")
    return {"plots": plots}


# ----------------------------------------------------------------------------------------------------------------------
# outputs


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows of one shape as CSV with a header (what `dvc plots` reads), atomically; floats rounded to 6 digits."""
    with io.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: round(float(v), 6) if isinstance(v, (float, np.floating)) else v for k, v in r.items()}
                    for r in rows)
    return Path(path)


def read_csv(path: Path) -> list[dict[str, float]]:
    """A numeric CSV written by write_csv: integers come back as int, the rest as float."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_overopt(series: list[tuple[str, list[dict], overopt.Fit | None]], path: Path, title: str) -> Path:
    """Gold (left) and proxy (right) against d = sqrt(KL) for each (label, rows, fit); fitted curves dashed. A series
    with no rows draws only its fit, in black (e.g. one fit pooled over several runs)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_gold, ax_proxy = fig.subplots(1, 2)
    colors = itertools.cycle(f"C{i}" for i in range(10))
    d_max = max((r["d"] for _, rows, _ in series for r in rows), default=1.0)
    for label, rows, fit in series:
        color = next(colors) if rows else "black"
        if rows:
            d = [r["d"] for r in rows]
            ax_gold.plot(d, [r["gold"] for r in rows], "o-", color=color, label=label, alpha=0.8)
            ax_proxy.plot(d, [r["proxy"] for r in rows], "o-", color=color, label=label, alpha=0.8)
        if fit is not None:
            grid = np.linspace(0, (max(d) if rows else d_max) * 1.15, 200)
            ax_gold.plot(grid, fit.predict(grid), "--", color=color,
                         label=f"{'' if rows else label + ' '}fit: α={fit.alpha:.3g} β={fit.beta:.3g} R²={fit.r2:.2f}")
    for ax, what in ((ax_gold, "gold"), (ax_proxy, "proxy (reward model)")):
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="d = √KL(π‖π_SFT)  [√nats]", ylabel=f"{what} reward − SFT's")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def watch_lines(watch: dict | None) -> list[str]:
    """The report's sentence on PPO's online watch: where the alarm stopped the run, which snapshot is the policy."""
    if watch is None:
        return ["", "Online watch off (ppo.stop_on_alarm = false): the policy is PPO's last update."]
    stop = (f"the alarm fired at update {watch['alarm_update']} and stopped the run" if watch["alarm_update"] >= 0
            else "the alarm did not fire during training")
    return ["", (f"Online watch (ppo.stop_on_alarm, {watch['prompts']} prompts at each snapshot): {stop}; the policy "
                 f"evaluated here, and registered as the candidate, is the snapshot of update {watch['best_update']}, "
                 "the best under gold.")]


def report(cfg: Config, prompts: list[str], results: dict[str, Samples], policies: list[str], m: dict, fits: dict,
           alarm: dict | None, rl_rows: list[dict], gold, watch: dict | None = None) -> str:
    """The evaluation report in markdown: summary table, over-optimization fits and alarm, side-by-side completions."""
    e, p = cfg.evaluate, cfg.ppo
    lines = ["# Evaluation", "",
             (f"{len(prompts)} held-out prompts (`{e.prompts}`), one sample each at temperature {p.temperature}, at "
             f"most {p.response_length} tokens. Proxy: the reward model's score with PPO's no-EOS rule. Gold: `{type(gold).__name__}`. KL(π‖π_SFT) from the samples (k1 per "
             "response, nats). ± is one standard error. gold − SFT: paired by prompt, every model sampled from the "
             "same random stream. Win rate: under gold against an independent SFT response to the same prompt, ties "
             "half (SFT's own row shows its noise)."), "",
             ("| model | proxy | gold | gold − SFT | win rate vs SFT | KL | length | EOS | distinct-1 | distinct-2 "
             "| repetition |"), "|" + "---|" * 11]
    for name in ("sft", *policies):
        g = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{name}/")}
        lines.append(f"| {name} | {g['proxy_mean']:.3f} ± {g['proxy_se']:.3f} | {g['gold_mean']:.3f} ± "
                     f"{g['gold_se']:.3f} | {g['gold_delta']:+.3f} ± {g['gold_delta_se']:.3f} | {g['win_rate']:.3f} ± "
                     f"{g['win_rate_se']:.3f} | {g['kl']:.2f} ± {g['kl_se']:.2f} | {g['length']:.1f} | "
                     f"{g['eos_rate']:.2f} | {g['distinct_1']:.3f} | {g['distinct_2']:.3f} | {g['repetition']:.3f} |")
    if any(fits.values()) or alarm is not None:
        lines += ["", "## Reward over-optimization", "",
                  ("Gold reward relative to SFT against d = √KL; Gao et al. 2022's forms R_RL = d(α − β log d), "
                  "R_bon = d(α − β d)."), ""]
        for form, fit in fits.items():
            if fit is not None:
                peak = f"d* = {fit.d_star:.3g} (gold {fit.r_star:+.3f})" if math.isfinite(fit.d_star) else "no peak"
                lines.append(f"- {form}: α = {fit.alpha:.4g}, β = {fit.beta:.4g}, R² = {fit.r2:.3f}, {peak}")
        if alarm is not None:
            state = (f"**fired** at update {m['hacking_alarm_update']}: the proxy kept rising while the gold fell"
                     if alarm["alarm"] else "did not fire")
            lines += ["", (f"Reward-hacking alarm (window {e.alarm_window}, tolerance {e.alarm_tolerance}, "
                      f"{e.alarm_z} standard errors): {state}."),
                      *watch_lines(watch),
                      "", f"PPO snapshots, each on the first {min(e.snapshot_prompts, len(prompts))} prompts:",
                      "", "| update | d | proxy − SFT | gold − SFT |", "|---|---|---|---|"]
            lines += [f"| {r['update']} | {r['d']:.3f} | {r['proxy']:+.3f} | {r['gold']:+.3f} ± {r['gold_se']:.3f} |"
                      for r in rl_rows]
        lines += ["", "![over-optimization](plots/overopt.png)"]
    names = ["sft", *policies]
    lines += ["", "## Completions side by side", "", "Gold / proxy in brackets.", "",
              "| prompt | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i in range(min(e.n_side_by_side, len(prompts))):
        cells = [f"{_cell(results[n].texts[i])} [{results[n].gold[i]:.2f} / {results[n].proxy[i]:.2f}]" for n in names]
        lines.append(f"| {_cell(prompts[i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
