"""Simulated annotators: a panel whose noise is known exactly, so the best reachable accuracy is too.

Annotator j, shown responses A and B (A first with probability 1/2), prefers A with probability

    P_j(A | order) = sigmoid((gold_A - gold_B) / T + b_len_j * (len_A - len_B) / 100 + b_pos * s)

with s = +1 when A is shown first and -1 otherwise, then flips the vote with probability f.
b_len_j is drawn per annotator around `length_bias` (per 100 characters); b_pos is the position bias.
Marginalising over the order and the flip gives the exact probability of each vote, so the Bayes
ceiling of any model trained on these labels is computable (tether.agreement.bayes_ceiling).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tether.agreement import majority_probability
from tether.errors import TetherError


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@dataclass
class Annotator:
    name: str
    temperature: float
    length_bias: float
    position_bias: float
    flip_rate: float

    def p_prefers_first(self, gold_a: float, gold_b: float, len_a: int, len_b: int) -> float:
        """P(this annotator votes A over B), marginalised over presentation order and flips."""
        x = (gold_a - gold_b) / self.temperature + self.length_bias * (len_a - len_b) / 100
        p = 0.5 * (_sigmoid(x + self.position_bias) + _sigmoid(x - self.position_bias))
        return (1 - self.flip_rate) * p + self.flip_rate * (1 - p)

    def vote(self, gold_a: float, gold_b: float, len_a: int, len_b: int, rng: random.Random) -> int:
        """1 if A is preferred. Samples the presentation order, the judgement and the flip."""
        x = (gold_a - gold_b) / self.temperature + self.length_bias * (len_a - len_b) / 100
        a_first = rng.random() < 0.5
        v = rng.random() < _sigmoid(x + (self.position_bias if a_first else -self.position_bias))
        if rng.random() < self.flip_rate:
            v = not v
        return int(v)


class Panel:
    def __init__(self, size: int = 5, per_pair: int = 3, temperature: float = 0.15, length_bias: float = 0.0,
                 length_bias_spread: float = 0.1, position_bias: float = 0.3, flip_rate: float = 0.05, seed: int = 0):
        if not 1 <= per_pair <= size:
            raise TetherError(f"panel.per_pair must be between 1 and panel.size={size}, got {per_pair}")
        if temperature <= 0 or not 0 <= flip_rate <= 0.5:
            raise TetherError("panel.temperature must be > 0 and panel.flip_rate in [0, 0.5]")
        draw = random.Random(seed)
        self.annotators = [
            Annotator(f"a{j}", temperature, length_bias + length_bias_spread * draw.gauss(0, 1), position_bias, flip_rate)
            for j in range(size)
        ]
        self.per_pair = per_pair

    def label(self, gold_a: float, gold_b: float, len_a: int, len_b: int, rng: random.Random) -> tuple[dict, float]:
        """Votes of `per_pair` random annotators ({name: 1 if A preferred}) and the exact probability
        that their majority prefers A (ties by a fair coin), for the Bayes ceiling."""
        chosen = rng.sample(self.annotators, self.per_pair)
        votes = {a.name: a.vote(gold_a, gold_b, len_a, len_b, rng) for a in chosen}
        p_major = majority_probability([a.p_prefers_first(gold_a, gold_b, len_a, len_b) for a in chosen])
        return votes, p_major
