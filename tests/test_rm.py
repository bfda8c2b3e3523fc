import json
import math
import random

import pytest
import torch

from conftest import write_jsonl
from tether import data as D
from tether.cli import main
from tether.config import RMConfig, load_config
from tether.losses.preference import bradley_terry_loss, pairwise_from_groups
from tether.models import load_reward_model, sequence_scores
from tether.stages import eval_rm, rm

WORDS = "apple river stone cloud maple tiger piano lemon ocean amber".split()


def synthetic_pairs(n, flip, seed):
    """Each prompt has a 'good' and a 'bad' response; the true preference is 'good' (a learnable
    token feature), and each label is flipped with probability `flip`. Returns rows and, per row,
    whether the label is the true preference (what the Bayes-optimal predictor gets right)."""
    rng = random.Random(seed)
    rows, truthful = [], []
    for i in range(n):
        filler = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))  # noqa: E731
        good, bad = f"{filler()} good {filler()}", f"{filler()} bad {filler()}"
        flipped = rng.random() < flip
        rows.append({"prompt": f"Prompt {i}: pick one.", "chosen": bad if flipped else good, "rejected": good if flipped else bad,
                     "p_label": flip if flipped else 1 - flip})
        truthful.append(not flipped)
    return rows, truthful


def rm_cfg(tmp_path, train, name="rm", **flags):
    base = {"model.name": "builtin:tiny", "data.path": str(train), "train.out": str(tmp_path / name), "train.lr": 3e-3,
            "train.batch_size": 16, "train.report_to": "none", "model.dtype": "fp32", "train.save_every": 0}
    base.update(flags)
    return load_config(RMConfig, None, base)


def test_noisy_labels_accuracy_reaches_bayes_ceiling(tmp_path):
    flip = 0.2
    train_rows, _ = synthetic_pairs(400, flip, seed=1)
    eval_rows, truthful = synthetic_pairs(300, flip, seed=2)
    train, ev = write_jsonl(tmp_path / "train.jsonl", train_rows), write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    s = rm.train(rm_cfg(tmp_path, train, **{"data.eval_path": str(ev), "train.epochs": 2}))
    # the Bayes-optimal predictor (always 'good') scores exactly the unflipped share of these labels
    realised_ceiling = sum(truthful) / len(truthful)
    assert abs(s["eval/accuracy"] - realised_ceiling) <= 0.03, (s["eval/accuracy"], realised_ceiling)
    report = eval_rm.evaluate_rm(load_config(__import__("tether.config", fromlist=["EvalRMConfig"]).EvalRMConfig, None,
                                             {"model": s["model"], "data": str(ev), "out": str(tmp_path / "ev")}))
    assert report["bayes_ceiling"] == pytest.approx(1 - flip)          # expected ceiling from the label model
    assert report["accuracy_vs_labels"] == pytest.approx(s["eval/accuracy"], abs=1e-6)
    # the reported ECE is that of the written scores, recomputed here with 10 bins of confidence on [0.5, 1]
    scores = [json.loads(line) for line in (tmp_path / "ev" / "scores.jsonl").read_text().splitlines()]
    q = [1 / (1 + math.exp(-(x["r_chosen"] - x["r_rejected"]))) for x in scores]
    conf = [max(p, 1 - p) for p in q]
    ece = 0.0
    for b in range(10):
        lo, hi = 0.5 + b / 20, 0.5 + (b + 1) / 20
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == 9 and c == 1.0)]
        if idx:
            acc = sum(q[i] > 0.5 for i in idx) / len(idx)
            ece += len(idx) / len(q) * abs(acc - sum(conf[i] for i in idx) / len(idx))
    assert len(scores) == 300 and report["ece"] == pytest.approx(ece, abs=1e-9)
    assert report["length_mean"] > 0 and (report["length_slope"] > 0) == (report["length_correlation"] > 0)


def test_expected_calibration_error_by_hand():
    # 2 bins of confidence c = max(q, 1 - q): [0.5, 0.75) and [0.75, 1]; a prediction is right when q > 0.5
    q = [0.6, 0.7, 0.4, 0.9, 0.8, 0.1]
    # c = 0.6, 0.7, 0.6 | 0.9, 0.8, 0.9; right = 1, 1, 0 | 1, 1, 0
    # low bin:  accuracy 2/3, mean confidence 1.9/3 -> |2 - 1.9| / 3 = 1/30, weight 3/6
    # high bin: accuracy 2/3, mean confidence 2.6/3 -> |2 - 2.6| / 3 = 1/5,  weight 3/6
    assert eval_rm.expected_calibration_error(q, bins=2) == pytest.approx(0.5 / 30 + 0.5 / 5, abs=1e-12)  # 7/60
    # 3 bins [0.5, 2/3), [2/3, 5/6), [5/6, 1]: c = 1 falls in the top bin; q = 0.5 would count as wrong
    q = [0.55, 0.45, 0.7, 0.75, 1.0, 0.0]
    # c = 0.55, 0.55 | 0.7, 0.75 | 1, 1; right = 1, 0 | 1, 1 | 1, 0
    # gaps |0.5 - 0.55| = 0.05, |1 - 0.725| = 0.275, |0.5 - 1| = 0.5, each bin weight 1/3
    assert eval_rm.expected_calibration_error(q, bins=3) == pytest.approx((0.05 + 0.275 + 0.5) / 3, abs=1e-12)  # 0.275
    assert eval_rm.expected_calibration_error([0.5, 0.5], bins=2) == pytest.approx(0.5)  # ties: confidence 1/2, wrong
    # calibrated: 3 of 4 right at confidence 3/4, all right at confidence 1
    assert eval_rm.expected_calibration_error([0.75, 0.75, 0.75, 0.25, 1.0, 1.0], bins=2) == 0.0
    assert math.isnan(eval_rm.expected_calibration_error([]))


def test_least_squares_by_hand():
    assert eval_rm.least_squares([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0]) == pytest.approx((2.0, 1.0))
    assert eval_rm.least_squares([1.0, 2.0, 3.0], [2.0, 0.0, 4.0]) == pytest.approx((1.0, 0.0))  # sxy = 2, sxx = 2
    assert eval_rm.least_squares([5.0, 5.0], [1.0, 3.0]) == (0.0, 2.0)  # no spread in x: flat line


def test_k_wise_batch_equals_pairwise_loop(tok):
    model, rtok = load_reward_model("builtin:tiny")
    prompt = [{"role": "user", "content": "Say something."}]
    answers = ["one", "two words", "three little words", "and four words here"]
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[i]}],
              "rejected": [{"role": "assistant", "content": answers[j]}], "p_chosen": None, "margin": None, "row": 0}
             for i in range(4) for j in range(i + 1, 4)]
    groups = D.group_preferences(pairs, rtok, 64)
    assert len(groups) == 1 and len(groups[0]["responses"]) == 4 and len(groups[0]["pairs"]) == 6
    b = D.collate_groups(groups, rtok.pad_token_id)
    r = sequence_scores(model, b["input_ids"], b["lengths"])
    loss_k = bradley_terry_loss(*pairwise_from_groups(r, b["chosen_idx"], b["rejected_idx"])).mean()
    grads_k = torch.autograd.grad(loss_k, list(model.parameters()), allow_unused=True)

    losses = []
    for p in pairs:  # the naive way: two forwards per pair
        ids = [D.tokenize_scored(rtok, p["prompt"] + p[s], 64) for s in ("chosen", "rejected")]
        n = max(map(len, ids))
        x = torch.full((2, n), rtok.pad_token_id)
        for i, s in enumerate(ids):
            x[i, : len(s)] = torch.tensor(s)
        sc = sequence_scores(model, x, torch.tensor([len(s) for s in ids]))
        losses.append(bradley_terry_loss(sc[:1], sc[1:]))
    loss_p = torch.cat(losses).mean()
    grads_p = torch.autograd.grad(loss_p, list(model.parameters()), allow_unused=True)
    assert loss_k.item() == pytest.approx(loss_p.item(), abs=1e-6)
    for gk, gp in zip(grads_k, grads_p):
        if gk is None:
            assert gp is None
        else:
            assert torch.allclose(gk, gp, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_round_trip_with_auto_model_for_sequence_classification(tmp_path, lora):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows, _ = synthetic_pairs(60, 0.0, seed=3)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    flags = {"train.max_steps": 4, "model.lora_r": 4 if lora else 0}
    s = rm.train(rm_cfg(tmp_path, train, **flags))
    out = tmp_path / "rm" / "model"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    assert cfg["tether_reward_std"] == pytest.approx(s["reward_std"]) and "tether_reward_mean" in cfg
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.pad_token_id != hf_tok.eos_token_id  # so HF pooling lands on the EOS, like tether
    ours, ours_tok = load_reward_model(str(out))
    ours.eval()
    convs = [[{"role": "user", "content": "Pick."}, {"role": "assistant", "content": t}]
             for t in ("good apple", "bad river stone", "a much longer answer that is good")]
    texts = [D.render(hf_tok, c)[: D.render(hf_tok, c).rfind(hf_tok.eos_token) + len(hf_tok.eos_token)] for c in convs]
    enc = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        theirs = hf(**enc).logits.squeeze(-1)
        ids = [D.tokenize_scored(ours_tok, c, 512) for c in convs]
        x = torch.full((3, max(map(len, ids))), ours_tok.pad_token_id)
        for i, s_ in enumerate(ids):
            x[i, : len(s_)] = torch.tensor(s_)
        mine = sequence_scores(ours, x, torch.tensor([len(s_) for s_ in ids]))
    assert torch.allclose(theirs, mine, atol=1e-5), (theirs, mine)
    assert (theirs.max() - theirs.min()) > 1e-3  # the texts really score differently
    if lora:
        assert (tmp_path / "rm" / "adapter" / "adapter_config.json").exists()


def test_soft_labels_are_used_by_the_trainer(tmp_path):
    """With p_chosen = 0.5 on every pair the soft-label optimum is Delta = 0: the soft-label model
    must stay indifferent, while the hard-label model learns the 'good' feature."""
    rows, _ = synthetic_pairs(200, 0.0, seed=4)
    for r in rows:
        r["p_chosen"] = 0.5
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    flags = {"train.max_steps": 20, "loss.center_coef": 0.0}
    hard = rm.train(rm_cfg(tmp_path, train, "hard", **flags))
    soft = rm.train(rm_cfg(tmp_path, train, "soft", **flags, **{"loss.soft_labels": True}))
    assert hard["eval/accuracy"] > 0.9 and hard["eval/margin"] > 0.5
    assert abs(soft["eval/margin"]) < 0.2 * hard["eval/margin"]


def test_min_agreement_trains_on_the_agreed_pairs_only(tmp_path, tok):
    """The flipped labels carry a 3-2 vote (p_chosen 0.6), the true ones a unanimous one: at
    min_agreement 1.0 no flipped pair is trained on, while the held-out split keeps every pair."""
    rows, truthful = synthetic_pairs(40, 0.3, seed=5)
    for r, t in zip(rows, truthful):
        r["p_chosen"] = 1.0 if t else 0.6
    data = write_jsonl(tmp_path / "votes.jsonl", rows)
    cfg = rm_cfg(tmp_path, data, **{"data.eval_fraction": 0.25, "data.min_agreement": 1.0})
    train, held = rm.load_groups(cfg, tok)
    everything, held_all = rm.load_groups(rm_cfg(tmp_path, data, **{"data.eval_fraction": 0.25}), tok)
    assert held == held_all and sum(len(g["pairs"]) for g in held) == 10
    assert all(p["p"] == 1.0 for g in train for p in g["pairs"])
    assert sum(len(g["pairs"]) for g in train) == sum(p["p"] == 1.0 for g in everything for p in g["pairs"]) < 30


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "rejected": "b"}, "row 1, field 'chosen': missing column (preference data needs 'chosen' and 'rejected')"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 1, field 'chosen': chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "row 1, field 'chosen': empty chosen"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": "high"}, "row 1, field 'p_chosen': must be a number, got 'high'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": 1.5}, "row 1, field 'p_chosen': must be in [0, 1], got 1.5"),
    ({"chosen": "a", "rejected": "b"}, "row 1, field 'prompt': missing column (without 'prompt', chosen and rejected must be message lists)"),
])
def test_bad_preference_rows_exit_2(tmp_path, capsys, row, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [row])
    code = main(["rm", "--model", "builtin:tiny", "--data", str(bad), "--out", str(tmp_path / "o"), "--report-to", "none"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"tether: error: {bad}, {message}"


def test_implicit_prompt_is_the_shared_prefix():
    rows = D.Rows("x", [{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}], [1])
    p = D.normalise_preferences(rows)[0]
    assert p["prompt"] == [{"role": "user", "content": "Q"}]
    assert p["chosen"] == [{"role": "assistant", "content": "good"}] and p["rejected"] == [{"role": "assistant", "content": "bad"}]


def test_reward_model_as_gold_scorer(tmp_path):
    import math

    from tether.tasks import load_task

    rows, _ = synthetic_pairs(40, 0.0, seed=5)
    s = rm.train(rm_cfg(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows), **{"train.max_steps": 3}))
    task = load_task(f"rm:{s['model']}@test_tasks:EchoTask")
    prompt = task.prompts()[0]
    assert prompt.text == "Say yes."
    g = task.gold(prompt, "apple good river")
    assert g.score == pytest.approx(1 / (1 + math.exp(-(g.breakdown["reward"] - s["reward_mean"]) / s["reward_std"])))
    assert 0 < g.score < 1 and task.gold(prompt, "bad stone").score != g.score
