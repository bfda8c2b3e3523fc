"""`tether eval-rm`: how good is a reward model, and how close to the best possible?

On held-out pairs: accuracy against the annotators' labels, against the gold ordering (pairs whose
gold scores differ), the Bayes ceiling of the labels beside them (when the data carries the
annotator model's label probability `p_label`), calibration of sigmoid(r_c - r_r) (expected
calibration error), and the correlation of reward with response length: a reward model that pays
for length is the first step of length hacking.

On a reward-model ensemble folder (`tether rm` with ensemble > 1) the same metrics for every member
(`members`, each on its raw reward, as a single reward model's) and, at the top level, for the
ensemble: its reward is the mean of the members' normalised rewards (r_m - mean_m) / std_m (their stored
statistics; tether.losses.rl.ensemble_reward, mode mean), so its reward_mean, length_slope etc. are in
those units, the units in which PPO's reward.length_slope acts on an ensemble. `ensemble_std` is the
members' mean disagreement (std across members) over the held-out responses.
"""

from __future__ import annotations

import json
import math

import torch

from tether import data as D
from tether.agreement import bayes_ceiling
from tether.config import EvalRMConfig
from tether.errors import TetherError
from tether.losses.rl import ensemble_reward, ensemble_std
from tether.models import (autocast, default_device, is_reward_ensemble, load_reward_model, resolve_dtype, reward_member_paths,
                           reward_normaliser, sequence_scores)
from tether.runloop import Run


def expected_calibration_error(prob_chosen: list[float], bins: int = 10) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017) of pairwise predictions whose label is 'chosen':

        predicted winner = chosen if q > 1/2, confidence c = max(q, 1 - q), correct = (q > 1/2)
        ECE = sum_b (n_b / N) * | mean_b(correct) - mean_b(c) |     over equal-width bins of c in [1/2, 1]
    """
    if not prob_chosen:
        return float("nan")
    sums = [[0, 0.0, 0.0] for _ in range(bins)]
    for q in prob_chosen:
        c = max(q, 1 - q)
        b = min(bins - 1, int((c - 0.5) * 2 * bins))
        sums[b][0] += 1
        sums[b][1] += float(q > 0.5)
        sums[b][2] += c
    n = len(prob_chosen)
    return sum(k / n * abs(acc / k - conf / k) for k, acc, conf in sums if k)


def least_squares(x: list[float], y: list[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line y = a x + b."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx and sy else float("nan")


@torch.no_grad()
def score_pairs(model, tok, pairs: list[dict], batch_size: int, max_length: int, device, dtype) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and rejected side of each pair, each distinct response scored once."""
    cache: dict[str, float] = {}
    texts = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            key = json.dumps(p["prompt"] + p[side])
            if key not in cache:
                cache[key] = float("nan")
                texts.append((key, D.tokenize_scored(tok, p["prompt"] + p[side], max_length)))
    texts.sort(key=lambda kv: len(kv[1]))  # length-sorted batches waste little padding
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        n = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), n), tok.pad_token_id, dtype=torch.long)
        for j, (_, ids) in enumerate(chunk):
            input_ids[j, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for _, ids in chunk])
        with autocast(device, dtype):
            scores = sequence_scores(model, input_ids.to(device), lengths)
        for (key, _), s in zip(chunk, scores.tolist()):
            cache[key] = s
    rc = [cache[json.dumps(p["prompt"] + p["chosen"])] for p in pairs]
    rr = [cache[json.dumps(p["prompt"] + p["rejected"])] for p in pairs]
    return rc, rr


def evaluate_rm(cfg: EvalRMConfig) -> dict:
    if not cfg.model or not cfg.data:
        raise TetherError("eval-rm needs --model RM_FOLDER and --data PAIRS.jsonl")
    rows = D.read_rows(cfg.data)  # the data first: a bad file fails before a model is loaded or a folder written
    pairs = D.normalise_preferences(rows)
    extra = {n: r for n, r in zip(rows.numbers, rows.rows)}
    device = default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    if is_reward_ensemble(cfg.model):
        return _evaluate_ensemble(cfg, pairs, extra, device, dtype)
    model, tok = load_reward_model(cfg.model)
    model.to(device).eval()
    with Run(cfg.out, cfg, report_to="none") as run:  # refuses a finished run's folder before any scoring
        rc, rr = score_pairs(model, tok, pairs, cfg.batch_size, cfg.max_length, device, dtype)
        out = _metrics(cfg, pairs, extra, rc, rr)
        with open(run.out / "scores.jsonl", "w") as f:
            for p, c, r in zip(pairs, rc, rr):
                f.write(json.dumps({"row": p["row"], "r_chosen": c, "r_rejected": r}) + "\n")
        return run.finish({"stage": "eval-rm", "status": "done", "model": cfg.model, "data": cfg.data, **out})


def _evaluate_ensemble(cfg: EvalRMConfig, pairs: list[dict], extra: dict, device, dtype) -> dict:
    """Every member's metrics, then the ensemble's (the mean of the normalised members); members are
    loaded one at a time. scores.jsonl holds the ensemble's rewards and each member's raw ones."""
    paths = reward_member_paths(cfg.model)
    with Run(cfg.out, cfg, report_to="none") as run:
        members, zc, zr = [], [], []
        for path in paths:
            model, tok = load_reward_model(path)
            model.to(device).eval()
            rc, rr = score_pairs(model, tok, pairs, cfg.batch_size, cfg.max_length, device, dtype)
            mean, std = reward_normaliser(model)
            members.append({"model": path, "tether_reward_mean": mean, "tether_reward_std": std, "scores": (rc, rr),
                            **_metrics(cfg, pairs, extra, rc, rr)})
            zc.append([(x - mean) / std for x in rc])
            zr.append([(x - mean) / std for x in rr])
            del model
        zc, zr = torch.tensor(zc, dtype=torch.float64), torch.tensor(zr, dtype=torch.float64)  # (members, pairs)
        ec, er = ensemble_reward(zc, "mean").tolist(), ensemble_reward(zr, "mean").tolist()
        out = _metrics(cfg, pairs, extra, ec, er)
        # the members' disagreement over distinct responses (a response shared by pairs counts once)
        seen, spread = set(), []
        for i, p in enumerate(pairs):
            for side, z in (("chosen", zc), ("rejected", zr)):
                key = json.dumps(p["prompt"] + p[side])
                if key not in seen:
                    seen.add(key)
                    spread.append(ensemble_std(z[:, i : i + 1]).item())
        out["ensemble_std"] = sum(spread) / len(spread)
        with open(run.out / "scores.jsonl", "w") as f:
            for i, (p, c, r) in enumerate(zip(pairs, ec, er)):
                f.write(json.dumps({"row": p["row"], "r_chosen": c, "r_rejected": r,
                                    "members_chosen": [m["scores"][0][i] for m in members],
                                    "members_rejected": [m["scores"][1][i] for m in members]}) + "\n")
        for m in members:
            del m["scores"]
        return run.finish({"stage": "eval-rm", "status": "done", "model": cfg.model, "data": cfg.data, **out,
                           "ensemble": {"members": len(paths), "reward": "mean of the members' normalised rewards"},
                           "members": members})


def _metrics(cfg: EvalRMConfig, pairs: list[dict], extra: dict, rc: list[float], rr: list[float]) -> dict:
    """Accuracy (labels, gold), Bayes ceiling, ECE and the reward's length dependence from the pairs' rewards."""
    delta = [c - r for c, r in zip(rc, rr)]
    q = [1 / (1 + math.exp(-d)) if d > -50 else 0.0 for d in delta]

    out: dict = {"pairs": len(pairs), "accuracy_vs_labels": sum(d > 0 for d in delta) / len(delta),
                 "ece": expected_calibration_error(q, cfg.bins)}
    gold = [(d, extra[p["row"]]["chosen_gold"], extra[p["row"]]["rejected_gold"]) for d, p in zip(delta, pairs)
            if "chosen_gold" in extra[p["row"]] and "rejected_gold" in extra[p["row"]]]
    differ = [(d, cg, rg) for d, cg, rg in gold if cg != rg]
    if differ:
        out["accuracy_vs_gold"] = sum((d > 0) == (cg > rg) for d, cg, rg in differ) / len(differ)
        out["gold_pairs"] = len(differ)
    p_label = [extra[p["row"]]["p_label"] for p in pairs if isinstance(extra[p["row"]].get("p_label"), (int, float))]
    if len(p_label) == len(pairs):
        out["bayes_ceiling"] = bayes_ceiling(p_label)
    # reward vs length over distinct responses
    seen, rewards, lengths = set(), [], []
    for p, c, r in zip(pairs, rc, rr):
        for side, s in (("chosen", c), ("rejected", r)):
            text = p[side][-1]["content"]
            if (json.dumps(p["prompt"]), text) not in seen:
                seen.add((json.dumps(p["prompt"]), text))
                rewards.append(s)
                lengths.append(len(text))
    out["length_correlation"] = pearson(rewards, lengths)
    # the linear length component of the reward, for a length-debiased reward in PPO:
    # r'(y) = r(y) - length_slope * (chars(y) - length_mean)   (reward.length_slope / length_center)
    out["length_slope"], _ = least_squares([float(n) for n in lengths], rewards)
    out["length_mean"] = sum(lengths) / len(lengths)
    out["reward_mean"] = sum(rewards) / len(rewards)
    out["reward_std"] = math.sqrt(sum((x - out["reward_mean"]) ** 2 for x in rewards) / max(1, len(rewards) - 1))
    return out


def format_report(s: dict) -> str:
    ens = s.get("ensemble")
    lines = [f"reward-model ensemble {s['model']} ({ens['members']} members; the ensemble's reward is the mean of their "
             f"normalised rewards) on {s['pairs']} held-out pairs" if ens else f"reward model {s['model']} on {s['pairs']} held-out pairs"]
    for key, label in (("accuracy_vs_labels", "accuracy vs annotator labels"), ("bayes_ceiling", "Bayes ceiling of those labels"),
                       ("accuracy_vs_gold", "accuracy vs gold ordering"), ("ece", "calibration error (ECE)"),
                       ("length_correlation", "corr(reward, length)"), ("length_slope", "reward per 100 characters")):
        if key in s:
            extra = f"  ({s['gold_pairs']} pairs with different gold)" if key == "accuracy_vs_gold" else ""
            value = s[key] * (100 if key == "length_slope" else 1)
            lines.append(f"  {label:<32}{value:>8.3f}{extra}")
    if ens:
        lines.append(f"  {'members disagree (mean std)':<32}{s['ensemble_std']:>8.3f}")
        for key, label in (("accuracy_vs_labels", "accuracy vs labels"), ("accuracy_vs_gold", "accuracy vs gold")):
            if all(key in m for m in s["members"]):
                lines.append(f"  {'members: ' + label:<32}" + " ".join(f"{m[key]:.3f}" for m in s["members"]))
    return "\n".join(lines)
