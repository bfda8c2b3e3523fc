"""The AI labeller of RL-CAI (Bai et al. 2022, "Constitutional AI", Sec. 4.1), shared by `tether cai label`
(pairs from a file) and `tether label` with `labeller: ai` (pairs of fresh samples, your own prompts).

For each pair and a principle drawn at random, the feedback model is asked the principle's
multiple-choice question, "(A) ... (B) ...". The soft label is its probability of the option tokens
right where the answer starts, renormalised over the two options
(tether.losses.preference.option_probability), averaged over both orders (A/B swapped, `swap_average`)
to cancel position bias. With `cot` the labeller reasons first (greedy) and the probability is
clamped to [cot_low, cot_high]. A server that returns no log-probs gives the parsed answer, a hard
label (label_kind "hard"). A failed request never becomes a label: the pair is dropped and counted.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from tether.constitution import Constitution, Principle
from tether.feedback import ChatRequest, ChoiceRequest, Feedback
from tether.losses.preference import clamp_cot_probability, option_probability, swap_average


def text_of(messages: list[dict]) -> str:
    """A response side (assistant messages) as one string."""
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant").strip()


def _conversation(prompt: list[dict]) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in prompt)


def comparison_question(prompt: list[dict], first: str, second: str, p: Principle, cot: bool = False) -> str:
    """The multiple-choice question of RL-CAI (Bai et al. 2022, Sec. 4.1), in tether's words."""
    tail = ("Think it through step by step, then say which response is better." if cot
            else "Answer with the letter of the better response, A or B.")
    return (f"Here is a conversation between a human and an AI assistant.\n\n{_conversation(prompt)}\n\n"
            f"{p.compare}\n\n(A) {first}\n\n(B) {second}\n\n{tail}")


def check_ai(ai) -> None:
    from tether.errors import TetherError

    if ai.cot and not 0 <= ai.cot_low <= 0.5 <= ai.cot_high <= 1:
        raise TetherError(f"ai.cot_low/ai.cot_high must satisfy 0 <= low <= 0.5 <= high <= 1, got {ai.cot_low}, {ai.cot_high}")


def ai_label_pairs(fb: Feedback, constitution: Constitution, pairs: list[dict], ai, seed, split: str) -> tuple[list[dict], dict]:
    """Label `pairs` ({'prompt': messages, 'a', 'b': message lists, optional 'gold_a', 'gold_b', 'extra': dict
    copied into the row}) with the AI labeller `ai` (tether.config.AILabellerConfig). Returns (preference
    rows, statistics); a row: prompt, chosen, rejected, p_chosen, principle, label_kind, p_orders (the
    probability that a is better, from each order asked), a_chosen, and chosen_gold / rejected_gold
    when the pair has gold."""
    sampler = constitution.sampler(f"{seed}-{split}", need_compare=True)
    rng = random.Random(f"{seed}-{split}-orders")
    principles = [sampler() for _ in pairs]
    # orders[i]: the orders asked, each True when response a is shown as (A)
    orders = [[True, False] if ai.swap else [rng.random() < 0.5] for _ in pairs]
    asks = [(i, a_first) for i, o in enumerate(orders) for a_first in o]

    def shown(i, a_first):
        a, b = text_of(pairs[i]["a"]), text_of(pairs[i]["b"])
        return (a, b) if a_first else (b, a)

    reasoning: dict = {}
    if ai.cot:  # the chain of thought first (greedy), then the choice right after it
        qs = [ChatRequest([{"role": "user", "content": comparison_question(pairs[i]["prompt"], *shown(i, af), principles[i], cot=True)}],
                          ai.cot_max_new_tokens, 0.0, 1.0, 0) for i, af in asks]
        reasoning = dict(zip(asks, fb.chat(qs, desc=f"ai labeller {split}: reasoning")))
    requests = []
    for i, af in asks:
        q = comparison_question(pairs[i]["prompt"], *shown(i, af), principles[i], cot=ai.cot)
        start = (reasoning[(i, af)].text + "\n" if ai.cot else "") + ai.answer_prefix
        msgs = [{"role": "user", "content": q}] + ([{"role": "assistant", "content": start}] if start.strip() else [])
        requests.append(ChoiceRequest(msgs, ("A", "B")))
    replies = dict(zip(asks, fb.choose(requests, desc=f"ai labeller {split}: choices")))

    rows, kinds, failed, p_first = [], Counter(), 0, []
    for i, pair in enumerate(pairs):
        got = [(af, replies[(i, af)]) for af in orders[i]]
        if any(r.error for _, r in got) or (ai.cot and any(reasoning[(i, af)].error for af, _ in got)):
            failed += 1
            continue
        p_a_shown = [float(option_probability(torch.tensor(r.logprobs["A"]), torch.tensor(r.logprobs["B"])))
                     if r.kind == "soft" else float(r.answer == "A") for _, r in got]  # p(the response shown as A)
        p_first += p_a_shown
        p_a = [p if af else 1 - p for (af, _), p in zip(got, p_a_shown)]  # p(a is better), from each order
        p = float(swap_average(torch.tensor(p_a_shown[0]), torch.tensor(p_a_shown[1]))) if ai.swap else p_a[0]
        kind = "hard" if any(r.kind == "hard" for _, r in got) else "cot" if ai.cot else "soft"
        if ai.cot:
            p = float(clamp_cot_probability(torch.tensor(p), ai.cot_low, ai.cot_high))
        kinds[kind] += 1
        a_wins = p > 0.5 or (p == 0.5 and random.Random(f"{seed}-{split}-tie-{i}").random() < 0.5)
        chosen, rejected = (pair["a"], pair["b"]) if a_wins else (pair["b"], pair["a"])
        row = {"prompt": pair["prompt"], "chosen": text_of(chosen), "rejected": text_of(rejected),
               "p_chosen": p if a_wins else 1 - p, "principle": principles[i].name, "label_kind": kind,
               "p_orders": p_a, "a_chosen": a_wins, **pair.get("extra", {})}
        if pair.get("gold_a") is not None and pair.get("gold_b") is not None:
            ga, gb = pair["gold_a"], pair["gold_b"]
            row["chosen_gold"], row["rejected_gold"] = (ga, gb) if a_wins else (gb, ga)
        rows.append(row)
    stats = {"pairs": len(pairs), "labelled": len(rows), "failed": failed, "label_kinds": dict(kinds),
             "p_first_shown": sum(p_first) / len(p_first) if p_first else float("nan"),
             "mean_confidence": sum(r["p_chosen"] for r in rows) / len(rows) if rows else float("nan"),
             "chosen_longer": sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows) if rows else float("nan")}
    differ = [r for r in rows if "chosen_gold" in r and r["chosen_gold"] != r["rejected_gold"]]
    if differ:
        acc = sum(r["chosen_gold"] > r["rejected_gold"] for r in differ) / len(differ)
        stats["gold_agreement"] = {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / len(differ)), "pairs": len(differ)}
    return rows, stats


def format_stats(split: str, x: dict) -> str:
    gold = (f"  agrees with gold {x['gold_agreement']['accuracy']:.1%} +- {x['gold_agreement']['se']:.1%} on "
            f"{x['gold_agreement']['pairs']} gold-differing pairs" if "gold_agreement" in x else "")
    return (f"  {split:<5} {x['labelled']}/{x['pairs']} pairs labelled ({x['failed']} failed)  kinds {x['label_kinds']}  "
            f"p(A shown first) {x['p_first_shown']:.3f}  chosen longer {x['chosen_longer']:.2f}{gold}  -> {x.get('path', '')}")
