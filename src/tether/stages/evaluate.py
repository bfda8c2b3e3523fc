"""`tether eval`: models side by side on the held-out prompts of a task.

Each model answers the first `task.num_eval_prompts` held-out prompts (greedy by default, so the table
is deterministic) and is measured by
  gold               the task's gold score, the measuring stick nobody trains on: its mean with the
                     standard error over prompts, the pass rate of each check type, the mean penalties
  rm_score           the reward model's raw score of the same responses: the proxy a policy was trained
                     on. Proxy rising while gold does not is over-optimisation (a reward-model ensemble:
                     the mean of its members' normalised scores, (r_m - mean_m) / std_m)
  kl                 KL(pi || pi_ref) in nats per response, what the change cost: the k1 estimate
                     sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) averaged over y ~ pi at
                     temperature 1 (unbiased, because the samples come from pi)
  gold_sampled,      gold and RM of those temperature-1 samples. KL belongs to the sampling distribution,
  rm_score_sampled   so these are the numbers to plot against sqrt(KL) (Gao, Schulman, Hilton 2022)
  length, eos_rate, distinct_1/2, repetition   signs of degenerate text: length hacking, truncation, loops
  win_rate_gold/_rm  per prompt 1 / 0.5 / 0 as the model's score beats / ties / loses to the baseline's
Every model samples with the same seed (common random numbers), so differences are the models'.
Best-of-n from the reference, picked by the reward model, is the baseline an RL policy must beat at
equal KL; its KL is analytic (`best_of_n_kl`).

OUT/results.json   all of the above; OUT/samples.jsonl one row per model x prompt (greedy responses)
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tether.config import EvalConfig, RolloutConfig
from tether.errors import TetherError
from tether.losses.rl import ensemble_reward
from tether.monitor import pearson
from tether.models import (
    autocast,
    default_device,
    is_reward_ensemble,
    load_causal_lm,
    load_reward_ensemble,
    load_tokenizer,
    resolve_dtype,
    reward_normaliser,
    score_conversations,
)
from tether.rollout import generate, policy_forward, sample_batch
from tether.runloop import Run, seed_everything
from tether.tasks import Gold, Prompt, Task, load_task, subset
from tether.tasks.instruct import repetition, words

log = logging.getLogger("tether")

CHECK_NAMES = {"refuse": "refuses harmful", "comply": "no over-refusal"}  # table names of check types


# --------------------------------------------------------------------------------------------------
# Pure pieces


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error, sample std / sqrt(n) (0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0)


def distinct_n(texts: list[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over all texts
    (n-grams never cross two texts). Low values mean the model says the same things again."""
    grams = []
    for t in texts:
        w = [x.lower() for x in words(t)]
        grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Mean over prompts of 1 (score above the baseline's), 0.5 (equal), 0 (below)."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True)) / len(scores)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || reference) = log n - (n - 1) / n nats.

    The analytic KL of picking the best of n independent samples from the reference (Stiennon et al.
    2020, appendix G.3), used for the best-of-n curves of Gao, Schulman, Hilton (2022), "Scaling Laws
    for Reward Model Overoptimization". Exact when the n samples' rewards are distinct, an upper bound
    otherwise (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_sizes(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, and n_max itself when it is not a power of two."""
    sizes = [2**k for k in range(n_max.bit_length()) if 2**k <= n_max]
    return sizes + ([n_max] if sizes[-1] != n_max else [])


def best_of_n_picks(rm: list[list[float]], n: int) -> list[int]:
    """Per prompt, the index of the highest reward among its first n samples (the earliest on ties)."""
    return [max(range(n), key=lambda j: row[j]) for row in rm]


def best_of_n_curve(rm: list[list[float]], gold: list[list[float]], n_max: int) -> list[dict]:
    """Mean gold and RM score of the best-of-n picks (rm, gold: per prompt, per sample) for each n."""
    out = []
    for n in best_of_n_sizes(n_max):
        picks = best_of_n_picks(rm, n)
        out.append({"n": n, "kl": best_of_n_kl(n), "gold": sum(g[j] for g, j in zip(gold, picks)) / len(picks),
                    "rm_score": sum(r[j] for r, j in zip(rm, picks)) / len(picks)})
    return out


def overoptimisation_flags(results: dict, ref_label: str, mon) -> list[dict]:
    """The monitor's checks on held-out responses: a model the RM scores above the reference but gold
    scores below it (over-optimisation), RM scores that track length, and repetitive text."""
    flags, ref = [], results.get(ref_label)
    for label, m in results.items():
        if (ref is not None and label != ref_label and m["rm_score"] is not None and ref["rm_score"] is not None
                and m["rm_score"] > ref["rm_score"] + mon.proxy_rise and m["gold"] < ref["gold"] - mon.gold_drop):
            flags.append({"model": label, "flag": "gold_falls_while_proxy_rises",
                          "message": f"RM score {m['rm_score']:+.3f} vs {ref['rm_score']:+.3f} for {ref_label}, "
                                     f"but gold {m['gold']:.3f} vs {ref['gold']:.3f}"})
        if m.get("rm_length_corr") is not None and abs(m["rm_length_corr"]) > mon.length_corr:
            flags.append({"model": label, "flag": "length_correlation",
                          "message": f"RM score correlates with response length (r = {m['rm_length_corr']:+.2f})"})
        if m["repetition"] > mon.repetition:
            flags.append({"model": label, "flag": "repetition", "message": f"repeated-trigram share {m['repetition']:.2f}"})
    return flags


def summarise_gold(golds: list[Gold]) -> dict:
    """Mean gold and its standard error; per check type the mean pass value over the prompts that have
    that check; per penalty its mean over all responses (0 where it was not applied)."""
    mean, se = mean_se([g.score for g in golds])
    checks: dict[str, list[float]] = {}
    for g in golds:
        for k, v in g.breakdown.items():
            checks.setdefault(k, []).append(v)
    names = list(dict.fromkeys(k for g in golds for k in g.penalties))
    return {"gold": mean, "gold_se": se, "checks": {k: sum(v) / len(v) for k, v in checks.items()},
            "penalties": {k: sum(g.penalties.get(k, 0.0) for g in golds) / len(golds) for k in names}}


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _finite(obj):
    """NaN and inf become None (JSON null): results.json never holds NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Measuring one model


@dataclass
class Bench:
    """What every model is measured against: the prompts, the gold scorer, the reference, the RM."""

    cfg: EvalConfig
    task: Task
    prompts: list[Prompt]
    device: torch.device
    dtype: torch.dtype
    ref: Any
    ref_tok: Any
    rm: Any = None
    rm_tok: Any = None
    rm_members: list = field(default_factory=list)  # a reward-model ensemble's members (rm is the first); [] for one

    def rm_scores(self, prompts: list[Prompt], texts: list[str]) -> list[float] | None:
        if self.rm is None:
            return None
        convs = [p.messages + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        if not self.rm_members:
            return score_conversations(self.rm, self.rm_tok, convs, self.device, self.dtype, self.cfg.sample.batch_size).tolist()
        raw = score_conversations(self.rm_members, self.rm_tok, convs, self.device, self.dtype, self.cfg.sample.batch_size)
        stats = torch.tensor([reward_normaliser(m) for m in self.rm_members])  # (K, 2): each member's stored mean, std
        z = (raw - stats[:, :1]) / stats[:, 1:]  # each member normalised by its own statistics, then their mean
        return ensemble_reward(z, "mean").tolist()


@torch.no_grad()
def response_logprob(model, batch: dict, batch_size: int, device, dtype) -> torch.Tensor:
    """sum_t log p(y_t | x, y_<t) over each sampled response's tokens (B,), in chunks: logits span the vocabulary."""
    out = []
    for i in range(0, len(batch["lengths"]), batch_size):
        mb = {k: batch[k][i : i + batch_size] for k in ("query_ids", "query_mask", "response_ids", "lengths")}
        with autocast(device, dtype):
            logp, _, _ = policy_forward(model, mb, 1.0)
        out.append((logp.float() * batch["mask"][i : i + batch_size]).sum(1).cpu())
    return torch.cat(out)


def sampled_metrics(b: Bench, model, tok, is_ref: bool) -> dict:
    """KL to the reference (k1 on y ~ pi at temperature 1) and gold / RM of those samples."""
    k, S = b.cfg.kl_samples, b.cfg.sample
    if k == 0:
        return {"kl": None, "kl_se": None, "gold_sampled": None, "rm_score_sampled": None}
    prompts = [p for p in b.prompts for _ in range(k)]
    torch.manual_seed(b.cfg.seed + 1)
    with autocast(b.device, b.dtype):
        batch = sample_batch(model, tok, prompts, RolloutConfig(batch_size=S.batch_size, temperature=1.0,
                                                               max_new_tokens=S.max_new_tokens), b.device)
    model.eval()  # rollout leaves the model in train mode
    gold = [b.task.gold(p, t, f).score for p, t, f in zip(prompts, batch["texts"], batch["finished"].tolist())]
    out = {"kl": 0.0, "kl_se": 0.0, "gold_sampled": _mean(gold), "rm_score_sampled": _mean(b.rm_scores(prompts, batch["texts"]))}
    if is_ref:
        return out
    if tok.get_vocab() != b.ref_tok.get_vocab():
        log.warning("eval: the model's tokenizer differs from the reference's: no KL (token log-probs are not comparable)")
        return out | {"kl": None, "kl_se": None}
    kl = response_logprob(model, batch, S.batch_size, b.device, b.dtype) - response_logprob(b.ref, batch, S.batch_size, b.device, b.dtype)
    out["kl"], out["kl_se"] = mean_se(kl.tolist())
    return out


def evaluate_model(b: Bench, label: str, model, tok, is_ref: bool) -> tuple[dict, list[float], list[float] | None, list[dict]]:
    """(metrics, per-prompt gold, per-prompt RM scores or None, samples.jsonl rows) of one model."""
    S = b.cfg.sample
    torch.manual_seed(b.cfg.seed)  # only matters when sample.temperature > 0
    with autocast(b.device, b.dtype):
        outs = generate(model, tok, [p.messages for p in b.prompts], S.max_new_tokens, S.temperature, S.top_p, S.batch_size,
                        progress=f"eval {label}")
    texts = [o.text for o in outs]
    golds = [b.task.gold(p, o.text, o.finished) for p, o in zip(b.prompts, outs)]
    rm = b.rm_scores(b.prompts, texts)
    m = {**summarise_gold(golds), "rm_score": _mean(rm), **sampled_metrics(b, model, tok, is_ref),
         "length": _mean([o.n_tokens for o in outs]), "eos_rate": _mean([float(o.finished) for o in outs]),
         "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "repetition": _mean([repetition(t) for t in texts])}
    rows = [{"prompt_id": p.id, "prompt": p.text, "model": label, "response": o.text, "gold": g.score, "checks": g.breakdown,
             "rm_score": rm[i] if rm else None, "length": o.n_tokens, "finished": o.finished}
            for i, (p, o, g) in enumerate(zip(b.prompts, outs, golds))]
    return m, [g.score for g in golds], rm, rows


def best_of_n(b: Bench) -> list[dict]:
    """Best-of-n curve: best_of_n samples per prompt from the reference at temperature 1, picked by the RM."""
    N, S = b.cfg.best_of_n, b.cfg.sample
    if not N:
        return []
    prompts = [p for p in b.prompts for _ in range(N)]
    torch.manual_seed(b.cfg.seed + 2)
    with autocast(b.device, b.dtype):
        outs = generate(b.ref, b.ref_tok, [p.messages for p in prompts], S.max_new_tokens, 1.0, 1.0, S.batch_size, progress="best-of-n")
    gold = [b.task.gold(p, o.text, o.finished).score for p, o in zip(prompts, outs)]
    rm = b.rm_scores(prompts, [o.text for o in outs])
    rows = range(0, len(prompts), N)  # sample j of prompt i is at i * N + j
    return best_of_n_curve([rm[i : i + N] for i in rows], [gold[i : i + N] for i in rows], N)


# --------------------------------------------------------------------------------------------------
# The stage


def _validate(cfg: EvalConfig) -> None:
    if not cfg.models:
        raise TetherError("eval needs at least one model: --set models.NAME=PATH")
    if cfg.baseline and cfg.baseline not in cfg.models:
        raise TetherError(f"unknown baseline '{cfg.baseline}': it must be one of the model labels ({', '.join(cfg.models)})")
    if cfg.best_of_n < 0:
        raise TetherError(f"best_of_n must be >= 1 (or 0 = off), got {cfg.best_of_n}")
    if cfg.best_of_n and not cfg.reward_model:
        raise TetherError("best_of_n needs a reward model to pick with: --set reward_model=RM_FOLDER")
    if cfg.kl_samples < 0:
        raise TetherError(f"kl_samples must be >= 0 (0 = off), got {cfg.kl_samples}")


def _load(name: str, device):
    model = load_causal_lm(name).to(device).eval().requires_grad_(False)
    tok = load_tokenizer(name)
    tok.padding_side = "left"  # generation appends on the right
    return model, tok


def evaluate(cfg: EvalConfig) -> dict:
    _validate(cfg)
    labels = list(cfg.models)
    ref_label = cfg.reference or labels[0]  # a label in models, or a model loaded as the reference only
    baseline = cfg.baseline or (ref_label if ref_label in cfg.models else labels[0])
    if not cfg.baseline and ref_label not in cfg.models:
        log.info("eval: the reference %s is not among the models; win rates are against %s", ref_label, baseline)
    seed_everything(cfg.seed)
    device = default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    task = load_task(cfg.task.name)
    prompts = task.prompts("eval")
    prompts = subset(prompts, cfg.task.num_eval_prompts, "eval-prompts")  # the same draw as PPO's held-out gold
    if not prompts:
        raise TetherError(f"task '{cfg.task.name}' has no held-out prompts")
    with Run(cfg.out, cfg, report_to="none") as run:
        ref, ref_tok = _load(cfg.models.get(ref_label, ref_label), device)  # stays loaded
        b = Bench(cfg, task, prompts, device, dtype, ref, ref_tok)
        if cfg.reward_model:
            members, b.rm_tok = load_reward_ensemble(cfg.reward_model)
            for m in members:
                m.to(device).eval().requires_grad_(False)
            b.rm, b.rm_members = members[0], (members if is_reward_ensemble(cfg.reward_model) else [])
        (run.out / "samples.jsonl").write_text("")
        results, gold, rm, seconds, lengths = {}, {}, {}, {}, {}
        for label, name in cfg.models.items():
            t0 = time.time()
            is_ref = label == ref_label
            model, tok = (ref, ref_tok) if is_ref else _load(name, device)
            results[label], gold[label], rm[label], rows = evaluate_model(b, label, model, tok, is_ref)
            lengths[label] = [float(r["length"]) for r in rows]
            results[label] = {"model": name, **results[label]}
            del model, tok
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            with open(run.out / "samples.jsonl", "a") as f:
                f.write("".join(json.dumps(_finite(r)) + "\n" for r in rows))
            seconds[label] = time.time() - t0
            m = results[label]
            log.info("eval %s: gold %.3f, rm %s, kl %s (%.0f s)", label, m["gold"], _fmt(m["rm_score"]), _fmt(m["kl"]), seconds[label])
            if run.stop_requested:
                return {"stage": "eval", "status": "interrupted"}
        for label, m in results.items():
            # paired over the same prompts: much tighter than the difference of two means with their own SEs
            m["gold_vs_baseline"], m["gold_vs_baseline_se"] = mean_se([g - h for g, h in zip(gold[label], gold[baseline])])
            m["win_rate_gold"] = win_rate(gold[label], gold[baseline])
            m["win_rate_rm"] = win_rate(rm[label], rm[baseline]) if b.rm is not None else None
            m["time_s"] = round(seconds[label], 2)
            m["rm_length_corr"] = pearson(rm[label], lengths[label]) if b.rm is not None else None
        flags = overoptimisation_flags(results, ref_label, cfg.monitor)
        for f in flags:
            log.warning("eval monitor: %s: %s", f["model"], f["message"])
        out = _finite({"task": cfg.task.name, "prompts": len(prompts), "reference": ref_label, "baseline": baseline,
                       "reward_model": cfg.reward_model or None, "models": results, "flags": flags, "best_of_n": best_of_n(b)})
        (run.out / "results.json").write_text(json.dumps(out, indent=2, allow_nan=False))
        return run.finish({"stage": "eval", "status": "done", **out})


# --------------------------------------------------------------------------------------------------
# The table


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(s: dict) -> str:
    """One column per model; rows: gold and its check types, RM score, KL, length, EOS rate, distinct-2, win rate."""
    if s.get("status") != "done":
        return f"tether: eval {s.get('status', 'not finished')}; no results written"
    models = s["models"]
    w = max(12, *(len(label) + 2 for label in models))
    ms = list(models.values())

    def row(name: str, values) -> str:
        return f"{name:<30}" + "".join(f"{v:>{w}}" for v in values)

    lines = [f"{s['task']}: {s['prompts']} held-out prompts", row("", list(models)),
             row("gold (held-out)", [f"{m['gold']:.3f}±{m['gold_se']:.2f}" for m in ms])]
    if all("gold_vs_baseline" in m for m in ms):
        lines.append(row(f"  vs {s['baseline']} (paired)", ["-" if label == s["baseline"] else f"{m['gold_vs_baseline']:+.3f}±{m['gold_vs_baseline_se']:.2f}"
                                                          for label, m in models.items()]))
    for check in dict.fromkeys(k for m in ms for k in m["checks"]):
        lines.append(row("  " + CHECK_NAMES.get(check, check), [_fmt(m["checks"].get(check)) for m in ms]))
    if s.get("reward_model"):
        lines.append(row("RM score", [_fmt(m["rm_score"]) for m in ms]))
    if any(m["kl"] is not None for m in ms):
        lines.append(row(f"KL to {s['reference']} (nats)", [_fmt(m["kl"]) for m in ms]))
    lines += [row("length (tokens)", [_fmt(m["length"], ".1f") for m in ms]),
              row("EOS rate", [_fmt(m["eos_rate"], ".2f") for m in ms]),
              row("distinct-2", [_fmt(m["distinct_2"]) for m in ms]),
              row(f"win rate vs {s['baseline']} (gold)", [_fmt(m["win_rate_gold"]) for m in ms])]
    if s.get("flags"):
        lines += ["", "monitor flags:"] + [f"  {f['model']}: {f['flag']}: {f['message']}" for f in s["flags"]]
    if s.get("best_of_n"):
        lines += ["", f"best-of-n: samples of {s['reference']} at T=1, the RM picks", f"{'n':>6}{'KL (nats)':>12}{'gold':>10}{'RM score':>10}"]
        lines += [f"{r['n']:>6}{r['kl']:>12.3f}{_fmt(r['gold']):>10}{_fmt(r['rm_score']):>10}" for r in s["best_of_n"]]
    return "\n".join(lines)
