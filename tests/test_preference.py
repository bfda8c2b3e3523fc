import math

import pytest
import torch

from tether import agreement
from tether.losses.preference import bradley_terry_loss, pairwise_from_groups, reward_centering_loss
from tether.tasks.annotators import Annotator, Panel

LOG_SIG_1 = math.log(1 + math.exp(-1))   # -log sigmoid(1)  = 0.3132617
LOG_SIG_M1 = math.log(1 + math.exp(1))   # -log sigmoid(-1) = 1.3132617


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_bradley_terry_by_hand():
    assert bradley_terry_loss(t(1.0), t(0.0)).item() == pytest.approx(LOG_SIG_1, abs=1e-9)
    # margin: -log sigmoid(1 - 0.5)
    assert bradley_terry_loss(t(1.0), t(0.0), margin=t(0.5)).item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-9)
    # soft label p = 0.7
    assert bradley_terry_loss(t(1.0), t(0.0), p_chosen=t(0.7)).item() == pytest.approx(0.7 * LOG_SIG_1 + 0.3 * LOG_SIG_M1, abs=1e-9)
    # label smoothing 0.1 on a hard label = soft label 0.9
    assert bradley_terry_loss(t(1.0), t(0.0), label_smoothing=0.1).item() == pytest.approx(0.9 * LOG_SIG_1 + 0.1 * LOG_SIG_M1, abs=1e-9)
    # smoothing applies to soft labels too: p' = 0.9 * 0.7 + 0.1 * 0.3 = 0.66
    got = bradley_terry_loss(t(1.0), t(0.0), p_chosen=t(0.7), label_smoothing=0.1).item()
    assert got == pytest.approx(0.66 * LOG_SIG_1 + 0.34 * LOG_SIG_M1, abs=1e-9)
    # p = 0.5 is indifferent to the sign of Delta
    assert bradley_terry_loss(t(2.0), t(0.0), p_chosen=t(0.5)).item() == pytest.approx(bradley_terry_loss(t(0.0), t(2.0), p_chosen=t(0.5)).item())
    # stable for huge margins
    assert torch.isfinite(bradley_terry_loss(t(-1e4), t(1e4))).all()


def test_centering_by_hand():
    assert reward_centering_loss(t(1.0, 2.0), t(0.0, -1.0), 0.01).item() == pytest.approx(0.01 * (1 + 1) / 2)
    assert reward_centering_loss(t(3.0), t(1.0), 0.5).item() == pytest.approx(0.5 * 16)


def test_pairwise_from_groups_reads_indices():
    r = t(0.1, 0.2, 0.3)
    c, rr = pairwise_from_groups(r, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]))
    assert c.tolist() == [0.1, 0.1, 0.2] and rr.tolist() == [0.2, 0.3, 0.3]


def test_cohen_kappa_and_krippendorff_by_hand():
    votes = [{"a": 1, "b": 1}, {"a": 0, "b": 0}, {"a": 1, "b": 0}]
    assert agreement.raw_agreement(votes) == pytest.approx(2 / 3)
    assert agreement.cohen_kappa([1, 0, 1], [1, 0, 0]) == pytest.approx(0.4)   # (2/3 - 4/9) / (1 - 4/9)
    assert agreement.pairwise_kappa(votes) == pytest.approx(0.4)
    assert agreement.krippendorff_alpha_nominal(votes) == pytest.approx(1 - (2 / 6) / (18 / 30))  # 0.444...
    # missing labels: an item seen by one coder adds nothing; perfect agreement -> alpha 1
    assert agreement.krippendorff_alpha_nominal([{"a": 1, "b": 1, "c": 1}, {"a": 0, "c": 0}, {"b": 1}]) == pytest.approx(1.0)


def test_majority_probability_and_ceiling():
    assert agreement.majority_probability([0.8]) == pytest.approx(0.8)
    # 3 voters at 0.8: P(>= 2 of 3) = 3 * 0.8^2 * 0.2 + 0.8^3
    assert agreement.majority_probability([0.8] * 3) == pytest.approx(3 * 0.64 * 0.2 + 0.512)
    # 2 voters: ties broken by a coin
    assert agreement.majority_probability([0.8, 0.6]) == pytest.approx(0.48 + 0.5 * (0.8 * 0.4 + 0.2 * 0.6))
    assert agreement.bayes_ceiling([0.9, 0.2, 0.5]) == pytest.approx((0.9 + 0.8 + 0.5) / 3)


def test_annotator_probability_matches_its_votes():
    import random

    a = Annotator("x", temperature=0.2, length_bias=0.3, position_bias=0.5, flip_rate=0.1)
    p = a.p_prefers_first(0.7, 0.5, 120, 60)
    rng = random.Random(0)
    n = 40_000
    freq = sum(a.vote(0.7, 0.5, 120, 60, rng) for _ in range(n)) / n
    assert freq == pytest.approx(p, abs=0.01)  # 4 standard errors
    # by hand: x = 0.2/0.2 + 0.3 * 0.6 = 1.18; order-averaged, then flipped
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    q = 0.5 * (s(1.68) + s(0.68))
    assert p == pytest.approx(0.9 * q + 0.1 * (1 - q))


def test_panel_defaults_give_human_like_agreement():
    """On gold differences like the built-in task's (0 to 1 in steps of checks), the default panel
    agrees ~60-75% of the time, as human raters do (the seed figure)."""
    import random

    rng = random.Random(0)
    panel = Panel(seed=0)
    votes = []
    for _ in range(3000):
        ga, gb = rng.choice([0, 0.2, 0.25, 0.5, 0.75, 0.8, 1.0]), rng.choice([0, 0.2, 0.25, 0.5, 0.75, 0.8, 1.0])
        v, _ = panel.label(ga, gb, rng.randint(20, 400), rng.randint(20, 400), rng)
        votes.append(v)
    assert 0.6 <= agreement.raw_agreement(votes) <= 0.8
