"""Over-optimisation monitor: catch reward hacking while it happens.

Optimising a learned proxy reward eventually pulls the true (gold) score down while the proxy keeps
rising: gold first rises then falls as a function of sqrt(KL) to the reference, and the proxy
overshoots it (Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization").
tether can see this because its tasks carry a gold scorer nobody trains on. The monitor compares
the last `window` iterations with the `window` before them and raises a flag when

  gold_falls_while_proxy_rises  proxy up by more than `proxy_rise` while gold is down by more than
                                `gold_drop` (needs a task with a gold scorer);
  length_correlation            |corr(score, response length)| over the window passes `length_corr`:
                                the reward is paying for length (a classic RM bias), or for brevity.
                                Only responses that ended with EOS count: a truncated one's score is
                                the fixed truncation penalty, not the reward's judgement;
  repetition                    the mean repeated-trigram share of responses passes `repetition`;
  ensemble_disagreement         with a reward-model ensemble: the members' disagreement on the policy's
                                samples (mean std across members, normalised units) averaged over the
                                last `window` iterations exceeds its baseline, the mean over the first
                                `window` iterations, by more than the factor `disagreement_rise`
                                (0.5: +50%), from iteration 2 * window on. The policy is moving where the
                                members, which agree on their training distribution, part ways: Coste et
                                al. (2023) penalise exactly this spread against over-optimisation. It
                                needs no gold scorer. Absent, not zero, without an ensemble.

It is pure bookkeeping: the trainer feeds it one iteration at a time and decides what to do with a
flag (warn, log, stop), and which checkpoint to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tether.config import MonitorConfig
from tether.tasks.instruct import repetition


@dataclass
class Flag:
    step: int
    flag: str
    message: str


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (no evidence either way)."""
    n = len(x)
    if n < 3:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _mean(xs: list[float | None]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass
class Monitor:
    cfg: MonitorConfig
    history: list[dict] = field(default_factory=list)  # one row per iteration: step, proxy, gold, kl
    samples: list[list[tuple[float, int]]] = field(default_factory=list)  # per iteration: (score, length) pairs
    flags: list[Flag] = field(default_factory=list)

    def update(self, step: int, proxy: float, gold: float | None, kl: float, scores: list[float], lengths: list[int],
               texts: list[str], disagreement: float | None = None) -> tuple[dict, list[Flag]]:
        """Record one iteration; returns (metrics to log, new flags). gold is None without a gold scorer:
        the gold delta and the gold-vs-proxy flag are then absent from the metrics, not zero. Likewise
        `disagreement` (a reward-model ensemble's mean std across members on this iteration's samples)
        is None without an ensemble, and its metrics and flag are then absent."""
        w = self.cfg.window
        rep = _mean([repetition(t) for t in texts]) if texts else 0.0
        self.history.append({"step": step, "proxy": proxy, "gold": gold, "kl": kl, "repetition": rep}
                            | ({"disagreement": disagreement} if disagreement is not None else {}))
        self.samples = (self.samples + [list(zip(scores, lengths))])[-w:]
        pooled = [s for it in self.samples for s in it]
        corr = pearson([s for s, _ in pooled], [float(n) for _, n in pooled])
        metrics = {"monitor/length_corr": corr, "monitor/repetition": rep, "monitor/sqrt_kl": math.sqrt(max(kl, 0.0))}
        new: list[Flag] = []
        if len(self.history) >= 2 * w:
            last, before = self.history[-w:], self.history[-2 * w : -w]
            d_proxy = _mean([h["proxy"] for h in last]) - _mean([h["proxy"] for h in before])
            d_gold = _mean([h["gold"] for h in last]) - _mean([h["gold"] for h in before])
            metrics["monitor/proxy_delta"] = d_proxy
            if not math.isnan(d_gold):
                metrics["monitor/gold_delta"] = d_gold
            if d_proxy > self.cfg.proxy_rise and d_gold < -self.cfg.gold_drop:  # NaN gold never flags
                new.append(Flag(step, "gold_falls_while_proxy_rises",
                                f"proxy reward +{d_proxy:.3f} but gold {d_gold:+.3f} over the last {w} iterations "
                                f"(sqrt KL {metrics['monitor/sqrt_kl']:.2f}): over-optimisation"))
        if len(pooled) >= 8 and abs(corr) > self.cfg.length_corr:
            what = "pays for length" if corr > 0 else "pays for brevity"
            new.append(Flag(step, "length_correlation", f"reward correlates with response length (r = {corr:+.2f}): the reward {what}"))
        if len(self.history) >= w and _mean([h["repetition"] for h in self.history[-w:]]) > self.cfg.repetition:
            new.append(Flag(step, "repetition", f"responses repeat themselves (repeated-trigram share {rep:.2f})"))
        spread = [h["disagreement"] for h in self.history if h.get("disagreement") is not None]
        if disagreement is not None:
            metrics["monitor/disagreement"] = disagreement
        if disagreement is not None and len(spread) >= 2 * w:
            base, last = _mean(spread[:w]), _mean(spread[-w:])
            if base > 0:
                metrics["monitor/disagreement_rise"] = last / base - 1
            if last > (1 + self.cfg.disagreement_rise) * base:
                rise = f"+{100 * (last / base - 1):.0f}%" if base > 0 else "from 0"
                new.append(Flag(step, "ensemble_disagreement",
                                f"the reward models disagree more on the policy's samples: std {last:.3f} over the last {w} "
                                f"iterations vs {base:.3f} over the first {w} ({rise}; sqrt KL {metrics['monitor/sqrt_kl']:.2f}): "
                                "the policy is leaving the reward models' training distribution"))
        has_gold = any(h["gold"] is not None and not math.isnan(h["gold"]) for h in self.history)
        for f in ("gold_falls_while_proxy_rises", "length_correlation", "repetition")[0 if has_gold else 1:] + (
                ("ensemble_disagreement",) if disagreement is not None else ()):
            metrics[f"monitor/flag_{f}"] = float(any(x.flag == f for x in new))
        # a condition that persists is reported once per window, not at every iteration
        new = [f for f in new if not any(o.flag == f.flag and step - o.step < w for o in self.flags)]
        self.flags += new
        return metrics, new

    def state(self) -> dict:
        return {"history": self.history, "samples": self.samples, "flags": [f.__dict__ for f in self.flags]}

    def load_state(self, state: dict) -> None:
        self.history = state["history"]
        self.samples = [[tuple(x) for x in it] for it in state["samples"]]
        self.flags = [Flag(**f) for f in state["flags"]]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.flags:
            out[f.flag] = out.get(f.flag, 0) + 1
        return out
