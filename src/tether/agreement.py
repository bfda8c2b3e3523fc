"""Agreement between annotators, and the best accuracy any model can reach against noisy labels.

Labels are binary votes: 1 = "the first response of the pair (as stored) is better", 0 = the other.
A vote table maps item -> {annotator: vote}; items may be labelled by any subset of annotators.
"""

from __future__ import annotations

import itertools
import math


def raw_agreement(votes: list[dict]) -> float:
    """Share of annotator pairs that agree, over every item labelled by at least two annotators."""
    agree = total = 0
    for item in votes:
        for a, b in itertools.combinations(sorted(item), 2):
            agree += item[a] == item[b]
            total += 1
    return agree / total if total else float("nan")


def cohen_kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa (Cohen 1960) for two raters on the same items:

        kappa = (p_o - p_e) / (1 - p_e),  p_e = sum_k p_a(k) * p_b(k)
    """
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    cats = set(a) | set(b)
    p_e = sum((a.count(k) / n) * (b.count(k) / n) for k in cats)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def kappa_by_pair(votes: list[dict]) -> dict[tuple[str, str], tuple[float, int]]:
    """Cohen's kappa of every annotator pair on the items both labelled (at least two): {(x, y): (kappa, items)}."""
    annotators = sorted({k for item in votes for k in item})
    out = {}
    for x, y in itertools.combinations(annotators, 2):
        shared = [item for item in votes if x in item and y in item]
        if len(shared) >= 2:
            out[(x, y)] = (cohen_kappa([i[x] for i in shared], [i[y] for i in shared]), len(shared))
    return out


def pairwise_kappa(votes: list[dict]) -> float:
    """Mean Cohen's kappa over all annotator pairs, each on the items both of them labelled."""
    kappas = [k for k, _ in kappa_by_pair(votes).values() if not math.isnan(k)]
    return sum(kappas) / len(kappas) if kappas else float("nan")


def krippendorff_alpha_nominal(votes: list[dict]) -> float:
    """Krippendorff's alpha for nominal data with missing labels (Krippendorff 2011):

        alpha = 1 - D_o / D_e
        D_o = (1/n) sum_{c != k} o_ck,   D_e = (1/(n(n-1))) sum_{c != k} n_c n_k

    where o_ck is the coincidence matrix (each item with m_u >= 2 labels adds, for every ordered
    pair of its labels, 1/(m_u - 1)), n_c its marginals and n the number of pairable labels.
    """
    o: dict[tuple, float] = {}
    for item in votes:
        vals = list(item.values())
        m = len(vals)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            key = (vals[i], vals[j])
            o[key] = o.get(key, 0.0) + 1.0 / (m - 1)
    n_c: dict = {}
    for (c, _), v in o.items():
        n_c[c] = n_c.get(c, 0.0) + v
    n = sum(n_c.values())
    if n <= 1:
        return float("nan")
    d_o = sum(v for (c, k), v in o.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    return 1.0 if d_e == 0 else 1.0 - d_o / d_e


def majority_probability(p_votes: list[float]) -> float:
    """P(a strict majority of independent voters says 1), vote i being 1 with probability p_votes[i];
    a tie (even panels) is broken by a fair coin. Exact, via the Poisson-binomial distribution."""
    dist = [1.0]  # dist[k] = P(k ones so far)
    for p in p_votes:
        new = [0.0] * (len(dist) + 1)
        for k, q in enumerate(dist):
            new[k] += q * (1 - p)
            new[k + 1] += q * p
        dist = new
    m = len(p_votes)
    win = sum(q for k, q in enumerate(dist) if 2 * k > m)
    tie = sum(q for k, q in enumerate(dist) if 2 * k == m)
    return win + 0.5 * tie


def bayes_ceiling(p_label: list[float]) -> float:
    """The best expected accuracy any predictor can reach against labels drawn with probabilities
    p_label (P(label says 'first is better') per item, known exactly from the annotator model):

        ceiling = mean_i max(p_i, 1 - p_i)

    A model that predicted perfectly the true preference still loses the labels' own noise.
    """
    return sum(max(p, 1 - p) for p in p_label) / len(p_label) if p_label else float("nan")


def report(votes: list[dict]) -> dict:
    return {
        "raw_agreement": raw_agreement(votes),
        "cohen_kappa_pairwise": pairwise_kappa(votes),
        "krippendorff_alpha": krippendorff_alpha_nominal(votes),
        "items": len(votes),
        "votes": sum(len(v) for v in votes),
    }
