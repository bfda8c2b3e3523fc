"""From answers to training data and agreement statistics.

Preference rows (for `tether rm` and the direct methods): per pair, the a-votes and b-votes of its
annotators; 'both_bad' says nothing about which is better and is not counted; a 'tie' counts half to
each side when ties are kept, else not at all. p(a) = (a + t/2) / (a + b + t) with ties kept, a / (a + b)
without. The majority side is `chosen` with p_chosen = max(p, 1 - p); a pair at exactly 0.5 is kept at
0.5 with `keep_ties`, else dropped. Gold items are not exported (they measure annotators).
"""

from __future__ import annotations

import json

from tether import agreement


def _counts(votes: dict[str, str]) -> tuple[int, int, int]:
    vs = list(votes.values())
    return vs.count("a"), vs.count("b"), vs.count("tie")


def preference_rows(store, keep_ties: bool = False) -> list[dict]:
    votes = store.votes()
    rows = []
    for p in store.all_pairs():
        if p["gold"] is not None or p["id"] not in votes:
            continue
        v = votes[p["id"]]
        a, b, t = _counts(v)
        if not keep_ties:
            t = 0
        if a + b + t == 0:
            continue  # only 'both_bad' (or, without keep_ties, only ties)
        p_a = (a + 0.5 * t) / (a + b + t)
        if p_a == 0.5 and not keep_ties:
            continue
        a_wins = p_a >= 0.5
        chosen, rejected = (p["response_a"], p["response_b"]) if a_wins else (p["response_b"], p["response_a"])
        mine = {"a": 1.0, "b": 0.0, "tie": 0.5}
        row = {"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "p_chosen": p_a if a_wins else 1 - p_a,
               "votes": {name: (mine[c] if a_wins else 1 - mine[c]) for name, c in v.items() if c in mine
                         and (keep_ties or c != "tie")},
               "n_votes": len(v), "pair_id": p["id"]}
        meta = p["meta"]
        if "chosen_gold" in meta and "rejected_gold" in meta:  # the source's gold, carried over (a = the source's chosen)
            ga, gb = meta["chosen_gold"], meta["rejected_gold"]
            row["chosen_gold"], row["rejected_gold"] = (ga, gb) if a_wins else (gb, ga)
        rows.append(row)
    return rows


def unpaired_rows(pref_rows: list[dict]) -> list[dict]:
    """KTO's format: the majority's chosen response is desirable, the rejected one undesirable."""
    out = []
    for r in pref_rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, "pair_id": r["pair_id"]})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, "pair_id": r["pair_id"]})
    return out


def agreement_report(store) -> dict:
    """Raw agreement, pairwise Cohen's kappa and Krippendorff's alpha over the a/b votes of non-gold pairs; per
    annotator: answers, agreement with the majority of the others, accuracy on gold items, how often they
    picked the response shown on the left (position bias; 0.5 = none)."""
    votes, pairs = store.votes(), {p["id"]: p for p in store.all_pairs()}
    binary = [{n: 1 if c == "a" else 0 for n, c in v.items() if c in ("a", "b")} for pid, v in votes.items()
              if pairs[pid]["gold"] is None]
    binary = [v for v in binary if v]
    out = agreement.report(binary) if binary else {"items": 0, "votes": 0}
    out["kappa_by_pair"] = [{"annotators": [x, y], "kappa": k, "items": n} for (x, y), (k, n) in agreement.kappa_by_pair(binary).items()]
    per: dict[str, dict] = {}
    for pid, v in votes.items():
        gold = pairs[pid]["gold"]
        for name, c in v.items():
            s = per.setdefault(name, {"answers": 0, "with_majority": [0, 0], "gold": [0, 0], "left": [0, 0]})
            s["answers"] += 1
            if c not in ("a", "b"):
                continue
            if gold is not None:
                s["gold"][0] += c == gold
                s["gold"][1] += 1
                continue
            others = [x for m, x in v.items() if m != name and x in ("a", "b")]
            if others and others.count("a") != others.count("b"):
                majority = "a" if others.count("a") > others.count("b") else "b"
                s["with_majority"][0] += c == majority
                s["with_majority"][1] += 1
    for name, left, c in store.sides_shown():
        if c in ("a", "b"):
            per[name]["left"][0] += c == left
            per[name]["left"][1] += 1
    out["annotators"] = {name: {"answers": s["answers"],
                                "agreement_with_majority": s["with_majority"][0] / s["with_majority"][1] if s["with_majority"][1] else None,
                                "gold_accuracy": s["gold"][0] / s["gold"][1] if s["gold"][1] else None,
                                "gold_items": s["gold"][1],
                                "picked_left": s["left"][0] / s["left"][1] if s["left"][1] else None}
                         for name, s in sorted(per.items())}
    return out


def save_datasets_folder(rows: list[dict], folder: str) -> str:
    """The rows as a Hugging Face `datasets` folder (`datasets.Dataset.save_to_disk`), which tether's readers and
    `datasets.load_from_disk` both open. Nested columns (prompt messages, votes) are stored as JSON-compatible
    structures; votes become a JSON string, since annotator names differ from row to row."""
    import datasets

    flat = [{**r, "votes": json.dumps(r["votes"])} if "votes" in r else r for r in rows]
    datasets.Dataset.from_list(flat).save_to_disk(folder)
    return folder
