"""Reward-model ensembles (Coste et al. 2023): the combination rules by hand, members that equal single
reward models, the folder layout, resume, loading, and the ensemble as PPO's, eval-rm's and eval's reward."""

import json
import random

import pytest
import torch

from conftest import write_jsonl
from test_rm import rm_cfg, synthetic_pairs
from tether import data as D
from tether.cli import main
from tether.config import EvalConfig, EvalRMConfig, RMConfig, load_config
from tether.errors import TetherError
from tether.losses import rl
from tether.models import (is_reward_ensemble, load_reward_ensemble, load_reward_model, reward_member_paths, save_pretrained,
                           score_conversations, sequence_scores, write_ensemble_manifest)
from tether.stages import eval_rm, ppo, rm

CONVS = [[{"role": "user", "content": "Pick."}, {"role": "assistant", "content": t}]
         for t in ("good apple", "bad river stone", "a much longer answer that is good", "stone bad")]


# ----------------------------------------------------------------------------- the combination, by hand

def test_ensemble_reward_mean_uwo_wco_by_hand():
    # 3 members x 2 samples
    z = torch.tensor([[1.0, 0.0],
                      [2.0, 0.0],
                      [6.0, 3.0]], dtype=torch.float64)
    # sample 0: mean 3, population variance ((1-3)^2 + (2-3)^2 + (6-3)^2) / 3 = 14/3
    # sample 1: mean 1, population variance (1 + 1 + 4) / 3 = 2
    std = torch.tensor([(14 / 3) ** 0.5, 2 ** 0.5], dtype=torch.float64)
    assert torch.allclose(rl.ensemble_std(z), std, atol=1e-12)
    assert rl.ensemble_reward(z, "mean").tolist() == [3.0, 1.0]
    assert torch.allclose(rl.ensemble_reward(z, "uwo", 1.0), torch.tensor([3 - 2.160246899, 1 - 1.414213562], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(rl.ensemble_reward(z, "uwo", 0.5), torch.tensor([3, 1], dtype=torch.float64) - 0.5 * std, atol=1e-12)
    assert rl.ensemble_reward(z, "uwo", 0.0).tolist() == [3.0, 1.0]  # lambda 0 is the mean
    assert rl.ensemble_reward(z, "wco").tolist() == [1.0, 0.0]
    # one member: every mode is its score, the spread is 0
    one = torch.tensor([[0.5, -2.0]])
    for mode in ("mean", "uwo", "wco"):
        assert rl.ensemble_reward(one, mode, 3.0).tolist() == [0.5, -2.0]
    assert rl.ensemble_std(one).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown ensemble mode 'max'"):
        rl.ensemble_reward(z, "max")
    with pytest.raises(ValueError, match="shape"):
        rl.ensemble_reward(torch.zeros(3), "mean")


def test_bootstrap_is_a_seeded_resample_with_replacement():
    items = list(range(20))
    a, b = rm.bootstrap(items, 3), rm.bootstrap(items, 3)
    rng = random.Random(3)
    assert a == b == [rng.randrange(20) for _ in range(20)]
    assert len(a) == 20 and len(set(a)) < 20 and rm.bootstrap(items, 4) != a
    state = random.getstate()
    rm.bootstrap(items, 5)
    assert random.getstate() == state  # the global RNG is untouched


# ----------------------------------------------------------------------------- training

def scores_of(folder, convs=CONVS):
    model, tok = load_reward_model(str(folder))
    model.eval()
    return score_conversations(model, tok, convs, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    train_rows, _ = synthetic_pairs(48, 0.1, seed=11)
    eval_rows, _ = synthetic_pairs(16, 0.1, seed=12)
    return write_jsonl(tmp / "train.jsonl", train_rows), write_jsonl(tmp / "eval.jsonl", eval_rows)


def test_a_member_equals_a_single_reward_model_with_its_seed(tmp_path, pairs):
    """Bootstrap off: member m is exactly `tether rm` with seed + m (same data, same held-out prompts)."""
    train, ev = pairs
    flags = {"data.eval_path": str(ev), "train.max_steps": 4, "train.seed": 5}
    s = rm.train(rm_cfg(tmp_path, train, "ens", ensemble=2, ensemble_bootstrap=False, **flags))
    single = rm.train(rm_cfg(tmp_path, train, "single", **{**flags, "train.seed": 6}))
    out = tmp_path / "ens"
    # layout: OUT/model is the ensemble folder, each member a Hugging Face reward-model folder
    assert s["model"] == str(out / "model") and is_reward_ensemble(out / "model") and not is_reward_ensemble(single["model"])
    spec = json.loads((out / "model" / "ensemble.json").read_text())
    assert spec["kind"] == "tether-rm-ensemble" and spec["members"] == ["member-0", "member-1"]
    assert spec["seeds"] == [5, 6] and spec["bootstrap"] is False
    assert reward_member_paths(out / "model") == [str(out / "model" / "member-0"), str(out / "model" / "member-1")]
    assert reward_member_paths(single["model"]) == [single["model"]]
    for m in (0, 1):
        assert (out / "members" / f"m{m}" / "summary.json").exists() and (out / "members" / f"m{m}" / "metrics.jsonl").exists()
        assert any((out / "members" / f"m{m}" / "checkpoints").glob("step-*"))
        assert (out / "model" / f"member-{m}" / "model.safetensors").exists()
    # member 1 == the single reward model trained alone with seed 6: scores and every parameter
    assert torch.allclose(scores_of(out / "model" / "member-1"), scores_of(single["model"]), atol=1e-5)
    a = load_reward_model(str(out / "model" / "member-1"))[0].state_dict()
    b = load_reward_model(single["model"])[0].state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert s["members"][1]["eval/accuracy"] == single["eval/accuracy"] and s["members"][1]["reward_std"] == pytest.approx(single["reward_std"])
    # members differ (another seed: another data order)
    assert not torch.allclose(scores_of(out / "model" / "member-0"), scores_of(out / "model" / "member-1"), atol=1e-4)
    # the summary: each member's metrics and the ensemble's, which eval-rm reproduces from the saved members
    assert [m["seed"] for m in s["members"]] == [5, 6] and s["ensemble"] == 2 and s["steps"] == 4
    assert {"eval/loss", "eval/accuracy", "eval/margin", "eval/ensemble_std"} <= s.keys() and s["eval/ensemble_std"] > 0
    report = eval_rm.evaluate_rm(load_config(EvalRMConfig, None, {"model": s["model"], "data": str(ev), "out": str(tmp_path / "ev")}))
    assert report["accuracy_vs_labels"] == pytest.approx(s["eval/accuracy"], abs=1e-6)
    assert [m["accuracy_vs_labels"] for m in report["members"]] == pytest.approx([m["eval/accuracy"] for m in s["members"]], abs=1e-6)
    assert report["ensemble"]["members"] == 2 and report["ensemble_std"] > 0
    # the ensemble's reward in scores.jsonl is the mean of the members' normalised rewards
    row = json.loads((tmp_path / "ev" / "scores.jsonl").read_text().splitlines()[0])
    stats = [(m["reward_mean"], m["reward_std"]) for m in s["members"]]
    want = sum((c - mu) / sd for c, (mu, sd) in zip(row["members_chosen"], stats)) / 2
    assert row["r_chosen"] == pytest.approx(want, abs=1e-9)
    assert "members disagree" in eval_rm.format_report(report)
    # the report draws each member's learning curves
    from tether.report import write_report

    index = write_report(out).read_text()
    assert "ens member 0 (rm): learning curves" in index or "curves_ens_member_0" in index
    assert (out / "report" / "curves_ens_member_1.png").exists()


def test_member_zero_holds_out_what_a_single_run_holds_out(tmp_path, pairs):
    """Without eval data the held-out prompts come from train.seed, for every member: member 0 (bootstrap off)
    equals the single run of that seed, and member 1 holds out the same prompts."""
    train, _ = pairs
    flags = {"train.max_steps": 3, "data.eval_fraction": 0.25}
    s = rm.train(rm_cfg(tmp_path, train, "ens", ensemble=2, ensemble_bootstrap=False, **flags))
    single = rm.train(rm_cfg(tmp_path, train, "single", **flags))
    assert torch.allclose(scores_of(tmp_path / "ens" / "model" / "member-0"), scores_of(single["model"]), atol=1e-5)
    assert s["members"][0]["eval/loss"] == pytest.approx(single["eval/loss"], abs=1e-6)
    assert s["eval_prompts"] == single["eval_prompts"] == s["members"][1]["eval_prompts"] == 12


def test_bootstrap_members_with_lora_load_as_hugging_face_models(tmp_path, pairs):
    from transformers import AutoModelForSequenceClassification

    train, ev = pairs
    s = rm.train(rm_cfg(tmp_path, train, "ens", ensemble=2, **{"data.eval_path": str(ev), "train.max_steps": 2, "model.lora_r": 4}))
    out = tmp_path / "ens"
    for m, member in enumerate(s["members"]):
        assert member["bootstrap_seed"] == m and member["train_prompts"] == 48 and member["distinct_train_prompts"] < 48
        folder = out / "model" / f"member-{m}"
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["tether_reward_mean"] == pytest.approx(member["reward_mean"]) and cfg["tether_reward_std"] == pytest.approx(member["reward_std"])
        hf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
        ours, tok = load_reward_model(str(folder))
        ids = D.tokenize_scored(tok, CONVS[0], 512)
        with torch.no_grad():
            assert hf(torch.tensor([ids])).logits[0, 0].item() == pytest.approx(
                sequence_scores(ours.eval(), torch.tensor([ids]), torch.tensor([len(ids)])).item(), abs=1e-5)
        assert (out / "members" / f"m{m}" / "adapter" / "adapter_config.json").exists()
    models, tok = load_reward_ensemble(s["model"])
    assert len(models) == 2 and tok.pad_token_id != tok.eos_token_id


def test_resume_skips_finished_members_and_equals_a_straight_run(tmp_path, pairs):
    train, ev = pairs
    flags = {"data.eval_path": str(ev), "train.max_steps": 4, "train.save_every": 2}
    straight = rm.train(rm_cfg(tmp_path, train, "straight", ensemble=2, **flags))
    seen = []

    def stop_in_member_1(step, run, model):
        seen.append((run.out.name, step))
        if run.out.name == "m1" and step == 2:
            run.stop_requested = True

    cut = rm.train(rm_cfg(tmp_path, train, "cut", ensemble=2, **flags), on_step=stop_in_member_1)
    assert cut == {"status": "interrupted", "step": 2, "member": 1}
    assert not (tmp_path / "cut" / "model" / "ensemble.json").exists()  # not an ensemble until every member is saved
    with pytest.raises(TetherError, match="unfinished reward-model ensemble: pass --resume"):
        rm.train(rm_cfg(tmp_path, train, "cut", ensemble=2, **flags))
    seen.clear()
    done = rm.train(rm_cfg(tmp_path, train, "cut", ensemble=2, **{**flags, "train.resume": True}),
                    on_step=lambda step, run, model: seen.append((run.out.name, step)))
    assert seen == [("m1", 3), ("m1", 4)]  # member 0 was kept, member 1 continued from its checkpoint
    assert done["status"] == "done" and done["eval/accuracy"] == pytest.approx(straight["eval/accuracy"], abs=1e-6)
    for m in (0, 1):
        assert torch.allclose(scores_of(tmp_path / "cut" / "model" / f"member-{m}"),
                              scores_of(tmp_path / "straight" / "model" / f"member-{m}"), atol=1e-6)


def test_ensemble_size_from_the_command_line_and_its_errors(tmp_path, capsys, pairs):
    train, _ = pairs
    assert load_config(RMConfig, None, {}, ["ensemble=3"]).ensemble == 3
    assert main(["rm", "--ensemble", "4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "ensemble: 4  # reward models in an ensemble" in printed and "ensemble_bootstrap: true" in printed
    with pytest.raises(TetherError, match="ensemble must be >= 1"):
        rm.train(rm_cfg(tmp_path, train, ensemble=0))
    code = main(["rm", "--model", "builtin:tiny", "--data", str(train), "--out", str(tmp_path / "o"), "--ensemble", "0"])
    assert code == 2 and "ensemble must be >= 1" in capsys.readouterr().err
    with pytest.raises(TetherError, match="config key 'ensemble' expects int"):
        load_config(RMConfig, None, {}, ["ensemble=two"])
    with pytest.raises(TetherError, match="reward.ensemble' must be one of mean, uwo, wco"):
        load_config(__import__("tether.config", fromlist=["PPOConfig"]).PPOConfig, None, {}, ["reward.ensemble=max"])


# ----------------------------------------------------------------------------- scoring with an ensemble

@pytest.fixture(scope="module")
def hand_ensemble(tmp_path_factory):
    """Three tiny reward models with different heads and stored statistics, and their ensemble folder."""
    root = tmp_path_factory.mktemp("hand") / "ensemble"
    stats = [(0.5, 2.0), (-1.0, 0.5), (0.0, 1.0)]
    for m, (mean, std) in enumerate(stats):
        model, tok = load_reward_model("builtin:tiny")
        with torch.no_grad():
            torch.manual_seed(100 + m)
            model.score.weight.normal_(std=0.5)
        model.config.tether_reward_mean, model.config.tether_reward_std = mean, std
        save_pretrained(model, tok, root, model_dir=root / f"member-{m}")
    write_ensemble_manifest(root, [f"member-{m}" for m in range(3)])
    return root, stats


def test_scorer_normalises_each_member_then_combines(tmp_path, hand_ensemble):
    from tether.tasks import Prompt

    root, stats = hand_ensemble
    prompts = [Prompt(str(i), [{"role": "user", "content": "Pick."}], {}) for i in range(4)]
    texts = [c[-1]["content"] for c in CONVS]
    raw = torch.stack([scores_of(root / f"member-{m}") for m in range(3)])  # (3, 4)
    z = torch.stack([(raw[m] - mu) / sd for m, (mu, sd) in enumerate(stats)])
    assert (z.std(0) > 1e-3).all()  # the members really disagree
    base = {"reward.model": str(root), "reward.normalize": "stored"}
    for mode, lam, want in (("mean", 1.0, z.mean(0)), ("uwo", 0.7, z.mean(0) - 0.7 * z.std(0, correction=0)),
                            ("wco", 1.0, z.min(0).values)):
        scorer = ppo.Scorer(ppo_cfg(tmp_path, **base, **{"reward.ensemble": mode, "reward.uwo_lambda": lam}), None, "cpu", torch.float32)
        score, _ = scorer(prompts, texts, [True] * 4)
        assert scorer.ensemble and len(scorer.members) == 3
        assert torch.allclose(score, want, atol=1e-5), (mode, score, want)
        assert torch.allclose(scorer.disagreement, z.std(0, correction=0), atol=1e-5)
    # the length debias shifts every normalised member alike: the spread is unchanged
    scorer = ppo.Scorer(ppo_cfg(tmp_path, **base, **{"reward.ensemble": "wco", "reward.length_slope": 0.1,
                                                     "reward.length_center": 10.0}), None, "cpu", torch.float32)
    score, _ = scorer(prompts, texts, [True] * 4)
    lengths = torch.tensor([float(len(t)) for t in texts])
    assert torch.allclose(score, z.min(0).values - 0.1 * (lengths - 10.0), atol=1e-5)
    assert torch.allclose(scorer.disagreement, z.std(0, correction=0), atol=1e-5)
    # running normalisation: each member by its own running statistics, so each is standardised on the first batch
    scorer = ppo.Scorer(ppo_cfg(tmp_path, **{"reward.model": str(root), "reward.normalize": "running"}), None, "cpu", torch.float32)
    score, _ = scorer(prompts, texts, [True] * 4)
    zr = (raw - raw.mean(1, keepdim=True)) / raw.std(1, keepdim=True)
    assert len(scorer.running) == 3 and [s[0] for s in scorer.running] == [4, 4, 4]
    assert torch.allclose(score, zr.mean(0), atol=1e-5)
    # a single reward model: the scorer is today's (no disagreement); uwo is its score (no spread)
    single = ppo.Scorer(ppo_cfg(tmp_path, **{"reward.model": str(root / "member-1"), "reward.ensemble": "uwo"}), None, "cpu", torch.float32)
    score, _ = single(prompts, texts, [True] * 4)
    assert not single.ensemble and single.disagreement is None and torch.allclose(score, z[1], atol=1e-5)


def test_eval_scores_an_ensemble_by_its_mean_normalised_reward(hand_ensemble):
    from tether.stages.evaluate import Bench
    from tether.tasks import Prompt

    root, stats = hand_ensemble
    members, tok = load_reward_ensemble(str(root))
    b = Bench(EvalConfig(), None, [], torch.device("cpu"), torch.float32, None, None, members[0], tok, members)
    prompts = [Prompt(str(i), [{"role": "user", "content": "Pick."}], {}) for i in range(4)]
    got = torch.tensor(b.rm_scores(prompts, [c[-1]["content"] for c in CONVS]))
    want = torch.stack([(scores_of(root / f"member-{m}") - mu) / sd for m, (mu, sd) in enumerate(stats)]).mean(0)
    assert torch.allclose(got, want, atol=1e-5)


def test_bad_ensemble_folders_are_named(tmp_path, hand_ensemble):
    root, _ = hand_ensemble
    with pytest.raises(TetherError, match="is a reward-model ensemble"):
        load_reward_model(str(root))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ensemble.json").write_text(json.dumps({"kind": "tether-rm-ensemble", "members": ["member-0"]}))
    with pytest.raises(TetherError, match="member 'member-0' is not a model folder"):
        reward_member_paths(bad)
    (bad / "ensemble.json").write_text(json.dumps({"kind": "something", "members": []}))
    with pytest.raises(TetherError, match="not a tether reward-model ensemble"):
        reward_member_paths(bad)
    (bad / "ensemble.json").write_text(json.dumps({"kind": "tether-rm-ensemble", "members": ["../x"]}))
    with pytest.raises(TetherError, match="is not a model folder inside"):
        reward_member_paths(bad)


# ----------------------------------------------------------------------------- PPO with an ensemble

def ppo_cfg(tmp_path, name="ppo", **flags):
    from test_ppo import ppo_cfg as base

    return base(tmp_path, name, **flags)


def test_ppo_logs_the_members_disagreement_and_the_monitor_watches_it(tmp_path, hand_ensemble):
    root, _ = hand_ensemble
    seen = {}
    cfg = ppo_cfg(tmp_path, **{"reward.model": str(root), "reward.ensemble": "uwo", "model.lora_r": 4, "train.max_steps": 2,
                               "rollout.prompts_per_step": 3, "rollout.group_size": 2, "monitor.window": 1})
    s = ppo.train(cfg, on_step=lambda it, run, modules: seen.update(modules=modules))
    assert s["status"] == "done" and isinstance(seen["modules"]["critic"], ppo.SeparateCritic)  # the critic from member 0
    rows = [m for m in map(json.loads, (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) if "objective/scores" in m]
    assert len(rows) == 2
    for m in rows:
        assert m["objective/ensemble_std"] > 0 and m["monitor/disagreement"] == m["objective/ensemble_std"]
        assert m["monitor/flag_ensemble_disagreement"] in (0.0, 1.0)
    assert "monitor/disagreement_rise" in rows[1]  # window 1: the second iteration compares with the first
    rise = rows[1]["objective/ensemble_std"] / rows[0]["objective/ensemble_std"] - 1
    assert rows[1]["monitor/disagreement_rise"] == pytest.approx(rise, abs=1e-9)
    assert rows[1]["monitor/flag_ensemble_disagreement"] == float(rise > 0.5)
