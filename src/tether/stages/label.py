"""`tether label`: sample K responses per prompt, score them with the task's gold scorer, and have a
simulated annotator panel label every pair. Writes preference data a reward model trains on.

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
from tether.engine import Engine
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
            g = task.gold(p, o.text, o.finished)
            rows.append({"prompt_id": p.id, "prompt": p.text, "response": o.text, "finished": o.finished,
                         "n_tokens": o.n_tokens, "gold": g.score, "breakdown": g.breakdown, "penalties": g.penalties})
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        done += rows
        log.info("label %s: sampled %d/%d prompts", split, min(b + per_batch, len(prompts)), len(prompts))
    return done


def label_pairs(samples: list[dict], panel: Panel, rng: random.Random) -> list[dict]:
    """All C(K, 2) pairs of distinct responses per prompt, labelled by the panel's majority."""
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    pairs = []
    for pid, group in by_prompt.items():
        distinct = list({s["response"]: s for s in group if s["response"].strip()}.values())
        for a, b in itertools.combinations(distinct, 2):
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


def run_label(cfg: LabelConfig) -> dict:
    seed_everything(cfg.seed)
    task = load_task(cfg.task.name)
    device = default_device()
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    model = load_causal_lm(cfg.model.name, cfg.model.trust_remote_code).to(device)
    engine = Engine(model, tok, resolve_dtype(cfg.model.dtype, device))  # a bf16 copy on CPUs with native bf16
    del model  # the engine holds its own copy of the weights
    panel = Panel(**dataclasses.asdict(cfg.panel), seed=cfg.seed)
    summary: dict = {"stage": "label", "status": "done", "task": cfg.task.name, "k": cfg.sample.k}
    all_votes = []
    with Run(cfg.out, cfg, continues=True, report_to="none") as run:  # continues its samples
        for split, n in (("train", cfg.task.num_prompts), ("eval", cfg.task.num_eval_prompts)):
            prompts = task.prompts(split)
            prompts = subset(prompts, n, f"{cfg.seed}-{split}-prompts")  # across categories, not the file's first n
            if not prompts:
                continue
            samples = sample_split(engine, tok, task, prompts, cfg, run.out / f"samples-{split}.jsonl", split)
            pairs = label_pairs(samples, panel, random.Random(f"{cfg.seed}-{split}"))
            all_votes += [p.pop("_votes_ab") for p in pairs]
            (run.out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            golds = [s["gold"] for s in samples]
            summary[split] = {
                "prompts": len(prompts), "responses": len(samples), "pairs": len(pairs),
                "gold_mean": sum(golds) / len(golds), "eos_rate": sum(s["finished"] for s in samples) / len(samples),
                "bayes_ceiling": agreement.bayes_ceiling([p["p_label"] for p in pairs]),
                "label_matches_gold": _label_gold_agreement(pairs),
                "path": str(run.out / f"{split}.jsonl"),
            }
        summary["agreement"] = agreement.report(all_votes)
        (run.out / "agreement.json").write_text(json.dumps(summary["agreement"], indent=2))
        return run.finish(summary)


def _label_gold_agreement(pairs: list[dict]) -> float:
    differ = [p for p in pairs if p["chosen_gold"] != p["rejected_gold"]]
    return sum(p["chosen_gold"] > p["rejected_gold"] for p in differ) / len(differ) if differ else float("nan")


def format_report(s: dict) -> str:
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
