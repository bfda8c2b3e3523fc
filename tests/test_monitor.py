"""The over-optimisation monitor (tether.monitor.Monitor): pure bookkeeping, checked against numbers
computed by hand. Steps are 1, 2, 3, ... so `step` is also the number of iterations seen."""

import json
import math

import pytest

from tether.config import MonitorConfig
from tether.monitor import Monitor
from tether.tasks.instruct import repetition

LOOP = "a b c a b c a b c"  # 7 word trigrams, 3 distinct: repeated share 1 - 3/7 = 4/7
PLAIN = "one two three four five six"  # no trigram repeats: 0


def cfg(**kw):
    base = {"window": 2, "gold_drop": 0.02, "proxy_rise": 0.02, "length_corr": 0.5, "repetition": 0.2}
    return MonitorConfig(**{**base, **kw})


def feed(mon, step, proxy=0.0, gold=0.0, kl=0.0, scores=(), lengths=(), texts=()):
    return mon.update(step, proxy, gold, kl, list(scores), list(lengths), list(texts))


def names(flags):
    return [f.flag for f in flags]


# ----------------------------------------------------------------------------- gold vs proxy

def test_no_gold_flag_before_two_windows_then_deltas_are_window_means():
    mon = Monitor(cfg(window=3))
    proxy = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7]  # means 0.2 then 0.6: +0.4
    gold = [0.5, 0.5, 0.5, 0.4, 0.3, 0.2]   # means 0.5 then 0.3: -0.2
    for step in range(1, 6):
        m, new = feed(mon, step, proxy[step - 1], gold[step - 1], kl=0.25)
        assert new == [] and "monitor/proxy_delta" not in m and m["monitor/flag_gold_falls_while_proxy_rises"] == 0.0
    m, new = feed(mon, 6, proxy[5], gold[5], kl=0.25)
    assert m["monitor/proxy_delta"] == pytest.approx(0.4, abs=1e-12)
    assert m["monitor/gold_delta"] == pytest.approx(-0.2, abs=1e-12)
    assert m["monitor/sqrt_kl"] == 0.5 and m["monitor/flag_gold_falls_while_proxy_rises"] == 1.0
    assert names(new) == ["gold_falls_while_proxy_rises"] and new[0].step == 6
    assert new[0].message == ("proxy reward +0.400 but gold -0.200 over the last 3 iterations (sqrt KL 0.50): "
                              "over-optimisation")
    # at step 7 the windows are [0.2, 0.3, 0.5] and [0.6, 0.7, 0.8]: +0.3667 and gold 0.4667 -> 0.2: -0.2667
    m, _ = feed(mon, 7, 0.8, 0.1)
    assert m["monitor/proxy_delta"] == pytest.approx((0.6 + 0.7 + 0.8) / 3 - (0.2 + 0.3 + 0.5) / 3, abs=1e-12)
    assert m["monitor/gold_delta"] == pytest.approx((0.3 + 0.2 + 0.1) / 3 - (0.5 + 0.5 + 0.4) / 3, abs=1e-12)


@pytest.mark.parametrize("proxy_last,gold_last,flags", [
    (0.5, -0.5, True),     # +0.5 and -0.5: both past the thresholds of 0.25
    (0.25, -0.5, False),   # the proxy rose by exactly 0.25: not more than proxy_rise
    (0.5, -0.25, False),   # gold fell by exactly 0.25: not more than gold_drop
    (0.5, 0.0, False),     # the proxy rises, gold holds
    (0.0, -0.5, False),    # gold falls, the proxy holds: a bad run, not over-optimisation
    (-0.5, -0.5, False),   # both fall
])
def test_gold_flag_needs_proxy_up_and_gold_down_by_more_than_the_thresholds(proxy_last, gold_last, flags):
    mon = Monitor(cfg(window=2, proxy_rise=0.25, gold_drop=0.25))
    feed(mon, 1, 0.0, 0.0)
    feed(mon, 2, 0.0, 0.0)
    feed(mon, 3, proxy_last, gold_last)
    m, new = feed(mon, 4, proxy_last, gold_last)
    assert m["monitor/proxy_delta"] == proxy_last and m["monitor/gold_delta"] == gold_last  # exact in binary
    assert names(new) == (["gold_falls_while_proxy_rises"] if flags else [])


def test_nan_gold_never_flags_and_nan_entries_are_left_out_of_the_means():
    nan = float("nan")
    mon = Monitor(cfg(window=2))
    for step, proxy in enumerate([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], 1):
        m, new = feed(mon, step, proxy, nan)
        assert new == []
    # no gold at all: its delta is NaN or left out, and so is the flag's metric (never a 1)
    assert m["monitor/proxy_delta"] == 1.0 and math.isnan(m.get("monitor/gold_delta", nan))
    assert m.get("monitor/flag_gold_falls_while_proxy_rises", 0.0) == 0.0 and mon.flags == []
    # some gold missing: the means skip it, [nan, 0.5] -> 0.5 and [0.2, nan] -> 0.2, so gold -0.3
    mon = Monitor(cfg(window=2))
    for step, (proxy, gold) in enumerate([(0.0, nan), (0.0, 0.5), (1.0, 0.2), (1.0, nan)], 1):
        m, new = feed(mon, step, proxy, gold)
    assert m["monitor/gold_delta"] == pytest.approx(-0.3, abs=1e-12) and names(new) == ["gold_falls_while_proxy_rises"]


# ----------------------------------------------------------------------------- length correlation

def test_length_flag_needs_eight_pooled_samples_and_names_the_sign():
    mon = Monitor(cfg(window=2))
    m, new = feed(mon, 1, scores=[1, 2, 3, 4], lengths=[10, 20, 30, 40])
    assert m["monitor/length_corr"] == pytest.approx(1.0) and new == []  # perfect, but only 4 samples
    m, new = feed(mon, 2, scores=[5, 6, 7], lengths=[50, 60, 70])
    assert m["monitor/length_corr"] == pytest.approx(1.0) and new == []  # 7 samples: still not enough
    m, new = feed(mon, 3, scores=[8], lengths=[80])
    # the pool is the last 2 iterations only: 3 + 1 = 4 samples
    assert new == [] and m["monitor/flag_length_correlation"] == 0.0
    m, new = feed(mon, 4, scores=[1, 2, 3, 4, 5], lengths=[10, 20, 30, 40, 50])  # 1 + 5 = 6
    assert new == []
    m, new = feed(mon, 5, scores=[9, 8, 7], lengths=[10, 20, 30])  # 5 + 3 = 8 samples, corr computed by hand below
    x = [10, 20, 30, 40, 50, 10, 20, 30]
    y = [1, 2, 3, 4, 5, 9, 8, 7]
    mx, my = sum(x) / 8, sum(y) / 8  # 26.25, 4.875
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    r = sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    # by hand: sxy = -13.75, sxx = 1387.5, syy = 58.875, so r = -13.75 / sqrt(1387.5 * 58.875) = -0.0481
    assert (sxy, sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)) == (-13.75, 1387.5, 58.875)
    assert r == pytest.approx(-13.75 / math.sqrt(1387.5 * 58.875), abs=1e-12) and r == pytest.approx(-0.0481, abs=1e-4)
    assert m["monitor/length_corr"] == pytest.approx(r, abs=1e-12) and new == []  # |r| < 0.5: no flag

    mon = Monitor(cfg(window=2))
    feed(mon, 1, scores=[1, 2, 3, 4], lengths=[10, 20, 30, 40])
    m, new = feed(mon, 2, scores=[5, 6, 7, 8], lengths=[50, 60, 70, 80])
    assert names(new) == ["length_correlation"] and m["monitor/flag_length_correlation"] == 1.0
    assert new[0].message == "reward correlates with response length (r = +1.00): the reward pays for length"

    mon = Monitor(cfg(window=2))
    feed(mon, 1, scores=[8, 7, 6, 5], lengths=[10, 20, 30, 40])
    _, new = feed(mon, 2, scores=[4, 3, 2, 1], lengths=[50, 60, 70, 80])
    assert new[0].message == "reward correlates with response length (r = -1.00): the reward pays for brevity"


def test_constant_scores_give_zero_correlation_and_no_flag():
    mon = Monitor(cfg(window=2))
    feed(mon, 1, scores=[1.0] * 4, lengths=[10, 20, 30, 40])
    m, new = feed(mon, 2, scores=[1.0] * 4, lengths=[50, 60, 70, 80])
    assert m["monitor/length_corr"] == 0.0 and new == []


# ----------------------------------------------------------------------------- repetition

def test_repetition_flag_over_the_window():
    assert repetition(LOOP) == pytest.approx(4 / 7) and repetition(PLAIN) == 0.0
    mon = Monitor(cfg(window=2, repetition=0.3))
    m, new = feed(mon, 1, texts=[LOOP, LOOP])
    assert m["monitor/repetition"] == pytest.approx(4 / 7) and new == []  # one iteration: less than a window
    m, new = feed(mon, 2, texts=[LOOP, PLAIN])  # this iteration 2/7; the window mean (4/7 + 2/7) / 2 = 3/7 > 0.3
    assert m["monitor/repetition"] == pytest.approx(2 / 7)
    assert names(new) == ["repetition"] and new[0].message == "responses repeat themselves (repeated-trigram share 0.29)"
    mon = Monitor(cfg(window=2, repetition=0.3))
    feed(mon, 1, texts=[LOOP, PLAIN])
    _, new = feed(mon, 2, texts=[PLAIN, PLAIN])  # window mean (2/7 + 0) / 2 = 1/7 < 0.3
    assert new == []


# ----------------------------------------------------------------------------- persistence and state

def test_a_persisting_condition_is_reported_once_per_window():
    mon = Monitor(cfg(window=3))
    reported, raised = [], []
    for step in range(1, 11):
        m, new = feed(mon, step, texts=[LOOP])
        raised.append(m["monitor/flag_repetition"])
        reported += [f.step for f in new]
    # the condition holds from step 3 (a full window) on: the metric says so every step,
    # a flag is reported at 3, then again only once `window` steps have passed
    assert raised == [0.0, 0.0] + [1.0] * 8
    assert reported == [3, 6, 9]
    assert mon.counts() == {"repetition": 3} and [f.step for f in mon.flags] == [3, 6, 9]


def sequence(step):
    """A run with every kind of flag: repetition from step 2, length-paying scores, gold falling
    from step 5 while the proxy keeps rising."""
    proxy = 0.1 * step
    gold = 0.5 if step < 5 else 0.5 - 0.1 * (step - 4)
    return {"proxy": proxy, "gold": gold, "kl": 0.1 * step, "scores": [step, step + 1, step + 2, step + 3],
            "lengths": [10, 20, 30, 40], "texts": [LOOP if step >= 2 else PLAIN]}


def test_state_round_trip_gives_identical_later_flags():
    c = cfg(window=3)
    straight = Monitor(c)
    before = Monitor(c)
    for step in range(1, 8):
        feed(straight, step, **sequence(step))
        feed(before, step, **sequence(step))
    state = json.loads(json.dumps(before.state()))  # what a checkpoint stores
    assert [f["step"] for f in state["flags"]] != []
    resumed, fresh = Monitor(c), Monitor(c)
    resumed.load_state(state)
    assert resumed.state() == straight.state()
    later = {"straight": [], "resumed": [], "fresh": []}
    for step in range(8, 16):
        for name, mon in (("straight", straight), ("resumed", resumed), ("fresh", fresh)):
            m, new = feed(mon, step, **sequence(step))
            later[name].append((m, [(f.step, f.flag, f.message) for f in new]))
    assert later["resumed"] == later["straight"]
    assert any(new for _, new in later["straight"])  # flags after the resume point, so the comparison means something
    assert resumed.state() == straight.state() and resumed.counts() == straight.counts()
    # without the state the monitor sees other windows and reports other flags
    assert later["fresh"] != later["straight"]


# ----------------------------------------------------------------------------- reward-model ensemble disagreement

def test_disagreement_flags_when_the_last_window_passes_the_first_by_the_factor():
    mon = Monitor(cfg(window=2, disagreement_rise=0.5))
    spread = [1.0] * 6 + [2.0] * 4  # constant, then doubled from iteration 7
    got = {}
    for step, d in enumerate(spread, 1):
        m, new = mon.update(step, 0.0, None, 0.0, [], [], [], disagreement=d)
        got[step] = (m.get("monitor/disagreement_rise"), m["monitor/flag_ensemble_disagreement"], [f.step for f in new])
        assert m["monitor/disagreement"] == d
    assert all(got[s][0] is None for s in (1, 2, 3))  # the first 2 * window iterations: no comparison yet
    assert [got[s][0] for s in range(4, 11)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]  # last window mean / baseline 1.0 - 1
    # iteration 7: the last window is [1, 2], mean 1.5 = exactly +50%: not more than disagreement_rise; iteration 8: +100%
    assert [got[s][1] for s in range(1, 11)] == [0.0] * 7 + [1.0] * 3
    assert [f.step for f in mon.flags] == [8, 10]  # a persisting condition is reported once per window
    assert mon.flags[0].flag == "ensemble_disagreement" and mon.flags[0].message == (
        "the reward models disagree more on the policy's samples: std 2.000 over the last 2 iterations vs 1.000 over the "
        "first 2 (+100%; sqrt KL 0.00): the policy is leaving the reward models' training distribution")


def test_constant_or_falling_disagreement_never_flags():
    for spread in ([0.3] * 30, [1.0 - 0.02 * i for i in range(30)]):
        mon = Monitor(cfg(window=3, disagreement_rise=0.1))
        for step, d in enumerate(spread, 1):
            m, new = mon.update(step, 0.0, None, 0.0, [], [], [], disagreement=d)
            assert new == [] and m["monitor/flag_ensemble_disagreement"] == 0.0
        assert m["monitor/disagreement_rise"] <= 1e-12 and mon.flags == []


def test_disagreement_from_a_zero_baseline_and_its_absence_without_an_ensemble():
    mon = Monitor(cfg(window=1))
    mon.update(1, 0.0, None, 0.0, [], [], [], disagreement=0.0)
    m, new = mon.update(2, 0.0, None, 0.0, [], [], [], disagreement=0.2)
    assert "monitor/disagreement_rise" not in m and [f.flag for f in new] == ["ensemble_disagreement"]
    assert "(from 0;" in new[0].message
    mon = Monitor(cfg(window=1))  # no ensemble: no metric, no flag metric, nothing in the history
    for step in range(1, 5):
        m, _ = feed(mon, step)
        assert not any("disagreement" in k for k in m)
    assert all("disagreement" not in h for h in mon.history)


def test_state_round_trip_keeps_the_disagreement_baseline():
    c = cfg(window=2, disagreement_rise=0.5)
    spread = [1.0, 1.0, 1.0, 1.0, 1.4, 1.8, 2.2, 2.6]
    straight, before = Monitor(c), Monitor(c)
    for step, d in enumerate(spread[:4], 1):
        for mon in (straight, before):
            mon.update(step, 0.0, None, 0.0, [], [], [], disagreement=d)
    resumed = Monitor(c)
    resumed.load_state(json.loads(json.dumps(before.state())))
    for step, d in enumerate(spread[4:], 5):
        a = straight.update(step, 0.0, None, 0.0, [], [], [], disagreement=d)
        b = resumed.update(step, 0.0, None, 0.0, [], [], [], disagreement=d)
        assert a[0] == b[0] and [f.__dict__ for f in a[1]] == [f.__dict__ for f in b[1]]
    # iteration 6: [1.4, 1.8], mean 1.6 > 1.5 x baseline 1.0; reported again at 8, once the window has passed
    assert resumed.counts() == straight.counts() == {"ensemble_disagreement": 2}
    assert [f.step for f in resumed.flags] == [6, 8]
