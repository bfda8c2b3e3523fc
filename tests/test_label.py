import itertools
import json

import pytest

from tether.config import LabelConfig, load_config
from tether.stages.label import run_label


def label_cfg(tmp_path, name="lab"):
    return load_config(LabelConfig, None, {
        "model.name": "builtin:tiny", "task.name": "test_tasks:EchoTask", "out": str(tmp_path / name),
        "sample.k": 3, "sample.max_new_tokens": 6, "sample.batch_size": 3, "sample.temperature": 1.0, "sample.top_p": 1.0,
    })


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_writes_pairs_votes_and_agreement(tmp_path):
    s = run_label(label_cfg(tmp_path))
    out = tmp_path / "lab"
    samples = read(out / "samples-train.jsonl")
    assert len(samples) == 9  # 3 prompts x K=3
    pairs = read(out / "train.jsonl")
    by_prompt = {}
    for smp in samples:
        by_prompt.setdefault(smp["prompt_id"], set()).add(smp["response"])
    expected = sum(len(list(itertools.combinations([r for r in v if r.strip()], 2))) for v in by_prompt.values())
    assert len(pairs) == expected and s["train"]["pairs"] == expected
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert len(p["votes"]) == 3 and 0.5 <= p["p_chosen"] <= 1.0
        assert p["p_chosen"] == pytest.approx(sum(p["votes"].values()) / 3)  # vote share of the stored chosen
        assert 0.0 <= p["p_label"] <= 1.0 and {"chosen_gold", "rejected_gold", "prompt"} <= p.keys()
    agreement = json.loads((out / "agreement.json").read_text())
    assert {"raw_agreement", "cohen_kappa_pairwise", "krippendorff_alpha"} <= agreement.keys()
    assert (out / "summary.json").exists() and s["eval"]["responses"] == 9


def test_label_resumes_after_a_crash_with_the_same_samples(tmp_path):
    run_label(label_cfg(tmp_path, "a"))
    straight = read(tmp_path / "a" / "samples-train.jsonl")
    # simulate a crash after the first batch: keep its rows plus half a batch, then re-run
    b = tmp_path / "b"
    b.mkdir()
    (b / "samples-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in straight[:4]))
    run_label(label_cfg(tmp_path, "b"))
    assert read(b / "samples-train.jsonl") == straight


def test_agreement_is_measured_in_a_vote_independent_orientation():
    """Pure-noise annotators must show kappa ~ 0. Orienting votes by their own majority (chosen vs
    rejected) would make them look systematically negative."""
    import random

    from tether import agreement
    from tether.stages.label import label_pairs
    from tether.tasks.annotators import Panel

    samples = [{"prompt_id": f"p{i}", "prompt": "q", "response": f"r{i}-{j}", "gold": 0.5} for i in range(600) for j in range(2)]
    pairs = label_pairs(samples, Panel(flip_rate=0.5, seed=0), random.Random(0))
    kappa = agreement.pairwise_kappa([p.pop("_votes_ab") for p in pairs])
    assert abs(kappa) < 0.06
    assert agreement.pairwise_kappa([p["votes"] for p in pairs]) < -0.2  # the biased orientation, for contrast
