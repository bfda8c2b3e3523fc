"""`tether label`: sample K responses per prompt, score them with the task's gold scorer, and have a
simulated annotator panel label every pair. Writes preference data a reward model trains on.

With `labeller: ai` the AI labeller of RL-CAI (tether.labeller: the constitution's multiple-choice
questions, answered by `feedback`, a local model or an OpenAI-compatible server) labels the pairs
instead; it needs no gold score, so the prompts may be your own (`data.path`, `data.eval_path`).

OUT/samples-{train,eval}.jsonl   every response with its gold score and per-check breakdown
OUT/train.jsonl, OUT/eval.jsonl  pairs: prompt, chosen, rejected, chosen_gold, rejected_gold,
                                 votes {annotator: 1 if they voted for chosen}, p_chosen (vote
                                 share), p_label (the annotator model's probability that the
                                 label process picks this chosen: the Bayes ceiling's input)
OUT/agreement.json               raw agreement, pairwise Cohen's kappa, Krippendorff's alpha,
                                 and the Bayes ceiling of each split

Sampling is the slow part, so samples are appended batch by batch and a re-run continues after the
last complete batch; each batch is seeded by its index, so a resumed run samples what a straight
run would have.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random

import torch

from tether import agreement
from tether.config import LabelConfig
from tether.constitution import load_constitution
from tether.data import normalise_prompts, read_rows
from tether.engine import Engine
from tether.errors import TetherError
from tether.feedback import make_feedback
from tether.labeller import ai_label_pairs, check_ai, format_stats
from tether.models import default_device, load_causal_lm, load_tokenizer, resolve_dtype
from tether.rollout import generate
from tether.runloop import Run, seed_everything
from tether.tasks import Prompt, load_task, subset
from tether.tasks.annotators import Panel

log = logging.getLogger("tether")


def sample_split(engine: Engine, tok, task, prompts: list[Prompt], cfg: LabelConfig, path, split: str) -> list[dict]:
    """K responses per prompt with gold scores, resumable: appends to `path` batch by batch."""
    s = cfg.sample
    per_batch = max(1, s.batch_size // s.k)  # prompts per generate() call
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    n_done = len(done) // s.k
    if n_done:
        log.info("label %s: %d prompts already sampled, continuing", split, n_done)
    batch_starts = range((n_done // per_batch) * per_batch, len(prompts), per_batch)
    done = done[: (n_done // per_batch) * per_batch * s.k]  # drop a partially written batch
    path.write_text("".join(json.dumps(r) + "\n" for r in done))
    for b in batch_starts:
        chunk = prompts[b : b + per_batch]
        torch.manual_seed(cfg.seed * 1_000_003 + b + (0 if split == "train" else 500_000))
        outs = generate(None, tok, [p.messages for p in chunk for _ in range(s.k)], s.max_new_tokens,
                        s.temperature, s.top_p, batch_size=s.batch_size, engine=engine)
        rows = []
        for j, o in enumerate(outs):
            p = chunk[j // s.k]
            g = task.gold(p, o.text, o.finished) if task is not None else None  # your own prompts: no gold
            rows.append({"prompt_id": p.id, "prompt": p.text, "messages": p.messages, "response": o.text, "finished": o.finished,
                         "n_tokens": o.n_tokens, "gold": g.score if g else None, "breakdown": g.breakdown if g else {},
                         "penalties": g.penalties if g else {}})
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        done += rows
        log.info("label %s: sampled %d/%d prompts", split, min(b + per_batch, len(prompts)), len(prompts))
    return done


def distinct_pairs(samples: list[dict]) -> list[tuple[dict, dict]]:
    """All C(K, 2) pairs of distinct, non-empty responses of each prompt."""
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    out = []
    for group in by_prompt.values():
        distinct = list({s["response"]: s for s in group if s["response"].strip()}.values())
        out += list(itertools.combinations(distinct, 2))
    return out


def label_pairs(samples: list[dict], panel: Panel, rng: random.Random) -> list[dict]:
    """All C(K, 2) pairs of distinct responses per prompt, labelled by the panel's majority."""
    pairs = []
    for a, b in distinct_pairs(samples):
        pid = a["prompt_id"]
        votes, p_a = panel.label(a["gold"], b["gold"], len(a["response"]), len(b["response"]), rng)
        share_a = sum(votes.values()) / len(votes)
        a_wins = share_a > 0.5 or (share_a == 0.5 and rng.random() < 0.5)
        c, r = (a, b) if a_wins else (b, a)
        pairs.append({
            "prompt": a["prompt"], "chosen": c["response"], "rejected": r["response"],
            "chosen_gold": c["gold"], "rejected_gold": r["gold"],
            "votes": {k: (v if a_wins else 1 - v) for k, v in votes.items()},
            "p_chosen": share_a if a_wins else 1 - share_a,
            "p_label": p_a if a_wins else 1 - p_a,
            "prompt_id": pid,
            # A/B orientation (sampling order, independent of the votes): what agreement statistics
            # need; votes oriented by their own majority would bias kappa and alpha downwards
            "_votes_ab": votes,
        })
    return pairs


def ai_pairs(samples: list[dict], fb, constitution, cfg: LabelConfig, split: str) -> tuple[list[dict], dict]:
    """Every pair of distinct responses labelled by the AI labeller (tether.labeller)."""
    items = [{"prompt": a.get("messages") or [{"role": "user", "content": a["prompt"]}],
              "a": [{"role": "assistant", "content": a["response"]}], "b": [{"role": "assistant", "content": b["response"]}],
              "gold_a": a["gold"], "gold_b": b["gold"], "extra": {"prompt_id": a["prompt_id"]}}
             for a, b in distinct_pairs(samples)]
    return ai_label_pairs(fb, constitution, items, cfg.ai, cfg.seed, split)


def _own_prompts(path: str) -> list[Prompt]:
    return [Prompt(f"row-{r['row']}", r["messages"], r["meta"]) for r in normalise_prompts(read_rows(path))]


def run_label(cfg: LabelConfig) -> dict:
    seed_everything(cfg.seed)
    own = bool(cfg.data.path)
    if own and cfg.labeller == "panel":
        raise TetherError("the simulated panel votes by the task's gold score, which your own prompts (data.path) do not "
                          "have: label them with the AI labeller (--set labeller=ai)")
    if cfg.data.eval_path and not own:
        raise TetherError("data.eval_path is held out from data.path (your own prompts); set data.path too")
    task = None if own else load_task(cfg.task.name)
    device = default_device()
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    model = load_causal_lm(cfg.model.name, cfg.model.trust_remote_code).to(device)
    engine = Engine(model, tok, resolve_dtype(cfg.model.dtype, device))  # a bf16 copy on CPUs with native bf16
    del model  # the engine holds its own copy of the weights
    panel = Panel(**dataclasses.asdict(cfg.panel), seed=cfg.seed)
    summary: dict = {"stage": "label", "status": "done", "task": "your prompts" if own else cfg.task.name, "k": cfg.sample.k,
                     "labeller": cfg.labeller}
    all_votes = []
    with Run(cfg.out, cfg, continues=True, report_to="none") as run:  # continues its samples (and the AI's answer cache)
        fb = constitution = None
        if cfg.labeller == "ai":
            check_ai(cfg.ai)
            constitution = load_constitution(cfg.constitution)
            fb = make_feedback(cfg.feedback, run.out / "feedback-cache.jsonl")
        try:
            for split, n in (("train", cfg.task.num_prompts), ("eval", cfg.task.num_eval_prompts)):
                if own:
                    path = cfg.data.path if split == "train" else cfg.data.eval_path
                    prompts = _own_prompts(path) if path else []
                else:
                    prompts = task.prompts(split)
                prompts = subset(prompts, n, f"{cfg.seed}-{split}-prompts")  # across categories, not the file's first n
                if not prompts:
                    continue
                samples = sample_split(engine, tok, task, prompts, cfg, run.out / f"samples-{split}.jsonl", split)
                x = {"prompts": len(prompts), "responses": len(samples),
                     "eos_rate": sum(s["finished"] for s in samples) / len(samples)}
                if task is not None:
                    x["gold_mean"] = sum(s["gold"] for s in samples) / len(samples)
                if fb is not None:
                    pairs, stats = ai_pairs(samples, fb, constitution, cfg, split)
                    x.update(stats, label_matches_gold=stats["gold_agreement"]["accuracy"] if "gold_agreement" in stats else float("nan"))
                else:
                    pairs = label_pairs(samples, panel, random.Random(f"{cfg.seed}-{split}"))
                    all_votes += [p.pop("_votes_ab") for p in pairs]
                    x.update(bayes_ceiling=agreement.bayes_ceiling([p["p_label"] for p in pairs]),
                             label_matches_gold=_label_gold_agreement(pairs))
                (run.out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
                summary[split] = {**x, "pairs": len(pairs), "path": str(run.out / f"{split}.jsonl")}
        finally:
            if fb is not None:
                fb.close()
        if fb is not None:
            summary["feedback_failures"] = len(fb.failures)
            summary["failure_examples"] = [f["error"] for f in fb.failures[:5]]
        else:
            summary["agreement"] = agreement.report(all_votes)
            (run.out / "agreement.json").write_text(json.dumps(summary["agreement"], indent=2))
        return run.finish(summary)


def _label_gold_agreement(pairs: list[dict]) -> float:
    differ = [p for p in pairs if p["chosen_gold"] != p["rejected_gold"]]
    return sum(p["chosen_gold"] > p["rejected_gold"] for p in differ) / len(differ) if differ else float("nan")


def format_report(s: dict) -> str:
    if s.get("labeller") == "ai":
        lines = [f"labelled by the AI labeller; feedback failures {s['feedback_failures']}"]
        return "\n".join(lines + [format_stats(split, s[split]) for split in ("train", "eval") if split in s])
    a = s["agreement"]
    lines = [f"labelled with the simulated panel: agreement {a['raw_agreement']:.1%}, Cohen's kappa "
             f"{a['cohen_kappa_pairwise']:.3f}, Krippendorff's alpha {a['krippendorff_alpha']:.3f}"]
    for split in ("train", "eval"):
        if split in s:
            x = s[split]
            lines.append(f"  {split:<5} {x['prompts']:>4} prompts  {x['pairs']:>5} pairs  gold mean {x['gold_mean']:.3f}  "
                         f"EOS rate {x['eos_rate']:.2f}  labels agree with gold {x['label_matches_gold']:.1%}  "
                         f"Bayes ceiling {x['bayes_ceiling']:.1%}  -> {x['path']}")
    return "\n".join(lines)
