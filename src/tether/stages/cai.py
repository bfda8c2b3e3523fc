"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

`tether cai revise` (SL-CAI): per prompt, the feedback model answers; then `rounds` times a principle
is drawn at random, the model critiques its latest answer by that principle and revises it. Every
chain is kept. A revision is dropped, and its chain stops there with the reason recorded, when it is
empty, cut at the token budget (truncated), parroted (the same as the answer it revises, a copy of
the critique, of the critique or revision request, or of a few-shot example), or meta (it comments on
the answer instead of answering): `check_revision`.

  OUT/chains.jsonl   every chain: prompt, original, rounds [{principle, critique, revision, accepted, reason}],
                     final, stop_reason (null when all rounds ran), gold scores when the task has them
  OUT/sft.jsonl      SFT data: messages = prompt + final revision (chains with an accepted revision), then the
                     rows of `helpful_data` if set (helpful answers, so the model does not learn only to refuse)
  OUT/pairs.jsonl    preference data: chosen = final revision, rejected = original

`tether cai label` (RL-CAI): the AI labeller (tether.labeller: the constitution's multiple-choice
questions, soft labels from the option tokens' probabilities, both orders averaged) on the pairs of a
file; `tether label` with `labeller: ai` does the same on fresh samples of your own prompts.

  OUT/train.jsonl, OUT/eval.jsonl   prompt, chosen, rejected, p_chosen, principle, label_kind, p_orders, a_chosen
                                    (and chosen_gold / rejected_gold carried over when the input has them)

Both stages cache every answer (OUT/feedback-cache.jsonl, or feedback.cache): a rerun after a crash
sends only what was not answered.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter


from tether.config import CAILabelConfig, CAIReviseConfig
from tether.constitution import Constitution, Principle, load_constitution
from tether.data import normalise_comparisons, normalise_prompts, read_rows, write_jsonl
from tether.errors import TetherError
from tether.feedback import ChatRequest, make_feedback
from tether.labeller import ai_label_pairs, check_ai, format_stats
from tether.runloop import Run, seed_everything
from tether.tasks import Prompt, load_task, subset

log = logging.getLogger("tether")


def _seed(*parts) -> int:
    """A stable 31-bit seed from any parts (Python's hash() changes between processes)."""
    return int(hashlib.sha256("-".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------------------------------
# SL-CAI: critique and revision


def few_shot_turns(examples) -> list[dict]:
    """The constitution's examples as earlier turns of the conversation: prompt, response, critique request,
    critique, revision request, revision."""
    turns = []
    for ex in examples:
        turns += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]},
                  {"role": "user", "content": ex["critique_request"]}, {"role": "assistant", "content": ex["critique"]},
                  {"role": "user", "content": ex["revision_request"]}, {"role": "assistant", "content": ex["revision"]}]
    return turns


def critique_messages(prompt: list[dict], answer: str, p: Principle, shots: list[dict]) -> list[dict]:
    return shots + prompt + [{"role": "assistant", "content": answer}, {"role": "user", "content": p.critique}]


def revision_messages(prompt: list[dict], answer: str, p: Principle, critique: str, shots: list[dict]) -> list[dict]:
    return critique_messages(prompt, answer, p, shots) + [{"role": "assistant", "content": critique},
                                                          {"role": "user", "content": p.revision}]


_META = re.compile(r"^\W*(the|your|my|this)\s+(assistant['’]s\s+)?(last\s+|previous\s+|original\s+)?(answer|response|revision|request)\b",
                   re.IGNORECASE)


def check_revision(revision: str, finished: bool, previous: str, critique: str, p: Principle, examples=()) -> str:
    """Why a revision is dropped ('' = accepted):
      empty      nothing but whitespace
      truncated  cut at the token budget (no EOS)
      parroted   the answer it revises unchanged, the critique copied, the critique or revision request
                 copied, or a few-shot example's critique or revision copied
      meta       it talks about the answer ("The assistant's last answer ...", "The response is ...")
                 instead of answering the user: a small model's commonest failure, and SFT on it would
                 teach the policy to comment on answers"""
    r = _norm(revision)
    if not r:
        return "empty"
    if not finished:
        return "truncated"
    copied = [previous, critique, p.critique, p.revision] + [ex[k] for ex in examples for k in ("critique", "revision")]
    if r == _norm(previous) or r == _norm(critique) or any(_norm(c) in r for c in copied[2:]):
        return "parroted"
    if _META.match(revision):
        return "meta"
    return ""


def _prompts(cfg: CAIReviseConfig) -> tuple[list[Prompt], object]:
    """(prompts, task or None): your own prompt file, or the task's train split (filtered by categories)."""
    if cfg.data.path:
        rows = normalise_prompts(read_rows(cfg.data.path))
        prompts = [Prompt(f"row-{r['row']}", r["messages"], r["meta"]) for r in rows]
        return subset(prompts, cfg.task.num_prompts, f"{cfg.seed}-cai-prompts"), None
    task = load_task(cfg.task.name)
    prompts = task.prompts("train")
    if cfg.categories:
        want = {c.strip() for c in cfg.categories.split(",") if c.strip()}
        have = {p.meta.get("category") for p in prompts}
        unknown = want - have
        if unknown:
            raise TetherError(f"categories: {', '.join(sorted(unknown))} not in task {cfg.task.name} "
                              f"(it has {', '.join(sorted(str(h) for h in have))})")
        prompts = [p for p in prompts if p.meta.get("category") in want]
    return subset(prompts, cfg.task.num_prompts, f"{cfg.seed}-cai-prompts"), task


def revise(cfg: CAIReviseConfig) -> dict:
    if cfg.rounds < 1:
        raise TetherError(f"rounds must be >= 1, got {cfg.rounds}")
    seed_everything(cfg.seed)
    constitution = load_constitution(cfg.constitution)
    prompts, task = _prompts(cfg)
    if not prompts:
        raise TetherError("cai revise: no prompts")
    with Run(cfg.out, cfg, continues=True, report_to="none") as run:
        fb = make_feedback(cfg.feedback, run.out / "feedback-cache.jsonl")
        try:
            chains = _revise_chains(fb, constitution, prompts, cfg)
        finally:
            fb.close()
        if task is not None:  # gold scores of the original and the final answer, for the summary
            for c, p in zip(chains, prompts):
                c["gold_original"] = task.gold(p, c["original"], c["original_finished"]).score
                c["gold_final"] = task.gold(p, c["final"], c["final_finished"]).score
        revised = [c for c in chains if c["n_accepted"]]
        write_jsonl(run.out / "chains.jsonl", chains)
        sft_rows = [{"messages": c["messages"] + [{"role": "assistant", "content": c["final"]}], "prompt_id": c["prompt_id"]}
                    for c in revised]
        helpful = _helpful_rows(cfg.helpful_data) if cfg.helpful_data else []
        write_jsonl(run.out / "sft.jsonl", sft_rows + helpful)
        write_jsonl(run.out / "pairs.jsonl", [{"prompt": c["messages"], "chosen": c["final"], "rejected": c["original"],
                                          "prompt_id": c["prompt_id"], **_gold_pair(c)} for c in revised])
        rounds = [r for c in chains for r in c["rounds"]]
        summary = {
            "stage": "cai_revise", "status": "done", "constitution": constitution.name, "prompts": len(prompts),
            "rounds": cfg.rounds, "chains": len(chains), "revised": len(revised),
            "revisions_accepted": sum(r["accepted"] for r in rounds),
            "dropped": dict(Counter(r["reason"] for r in rounds if not r["accepted"])),
            "stop_reasons": dict(Counter(c["stop_reason"] or "all_rounds" for c in chains)),
            "principles_used": dict(Counter(r["principle"] for r in rounds)),
            "feedback_failures": len(fb.failures), "failure_examples": [f["error"] for f in fb.failures[:5]],
            "cache": {"hits": fb.cache.hits, "misses": fb.cache.misses},
            "sft": {"path": str(run.out / "sft.jsonl"), "rows": len(revised) + len(helpful), "revisions": len(revised),
                    "helpful_rows": len(helpful)},
            "pairs": {"path": str(run.out / "pairs.jsonl"), "rows": len(revised)},
            "chains_path": str(run.out / "chains.jsonl"),
        }
        if task is not None:
            summary["gold"] = _gold_summary(chains)
        if not revised:
            log.warning("cai revise: no chain has an accepted revision (dropped: %s)", summary["dropped"])
        return run.finish(summary)


def _revise_chains(fb, constitution: Constitution, prompts: list[Prompt], cfg: CAIReviseConfig) -> list[dict]:
    g = cfg.sample
    sampler = constitution.sampler(cfg.seed)
    plan = [[sampler() for _ in range(cfg.rounds)] for _ in prompts]  # drawn up front: the same on a rerun
    answers = fb.chat([ChatRequest(p.messages, g.max_new_tokens, g.temperature, g.top_p, _seed(cfg.seed, p.id, "response"))
                       for p in prompts], desc="cai: responses")
    chains = []
    for p, a in zip(prompts, answers):
        c = {"prompt_id": p.id, "prompt": p.text, "messages": p.messages, "category": p.meta.get("category"),
             "original": a.text, "original_finished": a.finished, "rounds": [], "final": a.text, "final_finished": a.finished,
             "n_accepted": 0, "stop_reason": None}
        if a.error:
            c["stop_reason"] = "feedback_failed"
        elif not a.text.strip():
            c["stop_reason"] = "empty_response"
        chains.append(c)
    for k in range(cfg.rounds):
        live = [i for i, c in enumerate(chains) if c["stop_reason"] is None]
        if not live:
            break
        shots = {i: few_shot_turns(constitution.few_shot(plan[i][k])) if cfg.few_shot else [] for i in live}
        crit = fb.chat([ChatRequest(critique_messages(prompts[i].messages, chains[i]["final"], plan[i][k], shots[i]),
                                    g.critique_max_new_tokens, g.temperature, g.top_p, _seed(cfg.seed, prompts[i].id, k, "critique"))
                        for i in live], desc=f"cai: critiques, round {k + 1}/{cfg.rounds}")
        rev_req, rev_idx = [], []
        for i, cr in zip(live, crit):
            if cr.error or not cr.text.strip():
                reason = "feedback_failed" if cr.error else "empty_critique"
                chains[i]["rounds"].append({"principle": plan[i][k].name, "critique": cr.text, "revision": "",
                                            "accepted": False, "reason": reason})
                chains[i]["stop_reason"] = reason
                continue
            rev_idx.append((i, cr.text))
            rev_req.append(ChatRequest(revision_messages(prompts[i].messages, chains[i]["final"], plan[i][k], cr.text, shots[i]),
                                       g.max_new_tokens, g.temperature, g.top_p, _seed(cfg.seed, prompts[i].id, k, "revision")))
        revs = fb.chat(rev_req, desc=f"cai: revisions, round {k + 1}/{cfg.rounds}") if rev_req else []
        for (i, critique), rv in zip(rev_idx, revs):
            c, p = chains[i], plan[i][k]
            reason = "feedback_failed" if rv.error else check_revision(rv.text, rv.finished, c["final"], critique, p,
                                                                       constitution.few_shot(p) if cfg.few_shot else ())
            c["rounds"].append({"principle": p.name, "critique": critique, "revision": rv.text, "accepted": not reason, "reason": reason})
            if reason:
                c["stop_reason"] = reason
            else:
                c["final"], c["final_finished"] = rv.text, rv.finished
                c["n_accepted"] += 1
    return chains


def _helpful_rows(path: str) -> list[dict]:
    """Every example of an SFT data source, as `messages` rows (a plain-text row has no turns to learn from)."""
    from tether.data import normalise_sft

    rows = normalise_sft(read_rows(path))
    if any("messages" not in r for r in rows):
        raise TetherError(f"helpful_data {path}: needs conversations (messages or prompt/completion rows), not plain text")
    return [{"messages": r["messages"], "source": path} for r in rows]


def _gold_pair(c: dict) -> dict:
    return {"chosen_gold": c["gold_final"], "rejected_gold": c["gold_original"]} if "gold_final" in c else {}


def _gold_summary(chains: list[dict]) -> dict:
    """Mean gold and refusal rate of the original and final answers, overall and per category (for the
    built-in task: harmful compliance = 1 - refusal rate on harmful prompts; over-refusal on look-alikes)."""
    from tether.tasks.instruct import is_refusal

    def stats(cs):
        n = len(cs)
        return {"n": n, "gold_original": sum(c["gold_original"] for c in cs) / n, "gold_final": sum(c["gold_final"] for c in cs) / n,
                "refusal_original": sum(is_refusal(c["original"]) for c in cs) / n,
                "refusal_final": sum(is_refusal(c["final"]) for c in cs) / n}

    out = {"all": stats(chains)}
    for cat in sorted({c["category"] for c in chains if c["category"]}):
        out[cat] = stats([c for c in chains if c["category"] == cat])
    return out


def format_revise_report(s: dict) -> str:
    lines = [f"cai revise: {s['revised']}/{s['chains']} chains revised ({s['revisions_accepted']} revisions accepted over "
             f"{s['rounds']} rounds); dropped {s['dropped'] or 'none'}; feedback failures {s['feedback_failures']}",
             f"  SFT data -> {s['sft']['path']}   pairs -> {s['pairs']['path']}"]
    for cat, g in (s.get("gold") or {}).items():
        lines.append(f"  {cat:<10} n={g['n']:<4} gold {g['gold_original']:.3f} -> {g['gold_final']:.3f}   refusals "
                     f"{g['refusal_original']:.2f} -> {g['refusal_final']:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# RL-CAI: the AI labeller


def label(cfg: CAILabelConfig) -> dict:
    if not cfg.data:
        raise TetherError("cai label needs pairs: --data PAIRS (prompt + chosen/rejected, or response_a/response_b)")
    seed_everything(cfg.seed)
    constitution = load_constitution(cfg.constitution)
    check_ai(cfg.ai)
    summary: dict = {"stage": "cai_label", "status": "done", "constitution": constitution.name, "swap": cfg.ai.swap, "cot": cfg.ai.cot}
    with Run(cfg.out, cfg, continues=True, report_to="none") as run:
        fb = make_feedback(cfg.feedback, run.out / "feedback-cache.jsonl")
        try:
            for split, path in (("train", cfg.data), ("eval", cfg.eval_data)):
                if not path:
                    continue
                pairs = normalise_comparisons(read_rows(path))
                if cfg.max_pairs and cfg.max_pairs < len(pairs):
                    keep = sorted(random.Random(f"{cfg.seed}-{split}-pairs").sample(range(len(pairs)), cfg.max_pairs))
                    pairs = [pairs[i] for i in keep]
                items = [{"prompt": x["prompt"], "a": x["a"], "b": x["b"], "gold_a": x["meta"].get("chosen_gold"),
                          "gold_b": x["meta"].get("rejected_gold"),
                          "extra": {k: x["meta"][k] for k in ("prompt_id",) if k in x["meta"]}} for x in pairs]
                rows, stats = ai_label_pairs(fb, constitution, items, cfg.ai, cfg.seed, split)
                # with chosen/rejected input (a = the input's chosen): how often the AI keeps the input's label
                stats["agrees_with_input"] = sum(r["a_chosen"] for r in rows) / len(rows) if rows else float("nan")
                write_jsonl(run.out / f"{split}.jsonl", rows)
                summary[split] = {**stats, "path": str(run.out / f"{split}.jsonl")}
        finally:
            fb.close()
        summary["feedback_failures"] = len(fb.failures)
        summary["failure_examples"] = [f["error"] for f in fb.failures[:5]]
        summary["cache"] = {"hits": fb.cache.hits, "misses": fb.cache.misses}
        return run.finish(summary)


def format_label_report(s: dict) -> str:
    lines = [f"cai label: constitution {s['constitution']}, swap {s['swap']}, cot {s['cot']}; feedback failures {s['feedback_failures']}"]
    lines += [format_stats(split, s[split]) for split in ("train", "eval") if split in s]
    return "\n".join(lines)
