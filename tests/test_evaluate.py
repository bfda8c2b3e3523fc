"""`tether eval` on the tiny model: the pure pieces by hand (distinct-n, win rate, best-of-n and its KL,
gold summaries), RM scoring in batches, then whole runs: a model under two labels has KL exactly 0 and
ties, a perturbed model has KL > 0, results.json agrees with samples.jsonl, and the errors."""

import itertools
import json
import math

import pytest
import torch

from tether.config import EvalConfig, load_config
from tether.errors import TetherError
from tether.models import (
    TINY,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    score_conversations,
)
from tether.stages import evaluate as ev
from tether.tasks import Gold, Prompt, Task, register_task
from tether.tasks.instruct import gold_score


class ChecksTask(Task):
    """Four held-out prompts with built-in checks, gold from the built-in scorer (penalties included)."""

    name = "test:checks"
    CHECKS = ([{"type": "min_words", "n": 3}], [{"type": "lowercase"}, {"type": "max_words", "n": 40}],
              [{"type": "refuse"}], [{"type": "comply"}, {"type": "min_words", "n": 2}])

    def prompts(self, split="train"):
        return [Prompt(f"c{i}", [{"role": "user", "content": f"Question {i}: tell me about rivers."}], {"checks": c})
                for i, c in enumerate(self.CHECKS)]

    def gold(self, prompt, response, finished=True):
        return gold_score(prompt.meta["checks"], response, finished)


register_task(ChecksTask.name, ChecksTask)

MODEL_KEYS = {"model", "gold", "gold_se", "checks", "penalties", "rm_score", "kl", "kl_se", "gold_sampled", "rm_score_sampled",
              "length", "eos_rate", "distinct_1", "distinct_2", "repetition", "win_rate_gold", "win_rate_rm", "time_s",
              "rm_length_corr", "gold_vs_baseline", "gold_vs_baseline_se"}


def eval_cfg(tmp_path, name="eval", **flags):
    base = {"task.name": "test:checks", "out": str(tmp_path / name), "dtype": "fp32", "sample.max_new_tokens": 6,
            "sample.batch_size": 8, "kl_samples": 1}
    base.update(flags)
    return load_config(EvalConfig, None, base)


# --------------------------------------------------------------------------------------------------
# Pure pieces


def test_distinct_n_win_rate_mean_se_by_hand():
    texts = ["the cat the cat", "The dog"]
    assert ev.distinct_n(texts, 1) == pytest.approx(3 / 6)  # the, cat, dog of 6 words
    assert ev.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) x2, (cat the), (the dog)
    assert ev.distinct_n(["a b", "a b"], 2) == 0.5  # n-grams never cross two responses: no (b a)
    assert ev.distinct_n(["one", ""], 2) == 0.0 and ev.distinct_n([], 1) == 0.0
    a, b = [1.0, 0.5, 0.9, 0.3], [0.0, 0.5, 0.2, 0.3]
    assert ev.win_rate(a, b) == 0.75 and ev.win_rate(b, a) == 0.25 and ev.win_rate(a, a) == 0.5
    m, se = ev.mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert ev.mean_se([2.0]) == (2.0, 0.0)


def test_summarise_gold_pass_rates_over_prompts_with_the_check():
    golds = [Gold(1.0, {"lowercase": 1.0, "max_words": 1.0}), Gold(0.3, {"lowercase": 0.0}, {"no_eos": 0.2}),
             Gold(0.0, {"refuse": 0.0}, {"empty": 1.0})]
    s = ev.summarise_gold(golds)
    assert s["gold"] == pytest.approx(1.3 / 3)
    assert s["checks"] == {"lowercase": 0.5, "max_words": 1.0, "refuse": 0.0}
    assert s["penalties"] == pytest.approx({"no_eos": 0.2 / 3, "empty": 1 / 3})


def test_best_of_n_kl_and_sizes():
    assert ev.best_of_n_kl(1) == 0.0
    assert ev.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert ev.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert ev.best_of_n_sizes(1) == [1] and ev.best_of_n_sizes(8) == [1, 2, 4, 8] and ev.best_of_n_sizes(6) == [1, 2, 4, 6]


def test_best_of_n_picks_the_rm_argmax_of_the_first_n():
    rm = [[0.1, 0.5, 0.3, 0.9], [0.7, 0.2, 0.8, 0.1], [0.4, 0.4, 0.4, 0.4]]
    gold = [[0.0, 1.0, 0.5, 0.2], [1.0, 0.0, 0.3, 0.4], [0.6, 0.0, 0.0, 0.0]]
    assert ev.best_of_n_picks(rm, 1) == [0, 0, 0]
    assert ev.best_of_n_picks(rm, 2) == [1, 0, 0]  # ties go to the earliest sample
    assert ev.best_of_n_picks(rm, 3) == [1, 2, 0]
    assert ev.best_of_n_picks(rm, 4) == [3, 2, 0]
    curve = ev.best_of_n_curve(rm, gold, 4)
    assert [c["n"] for c in curve] == [1, 2, 4]
    assert [c["rm_score"] for c in curve] == pytest.approx([1.2 / 3, 1.6 / 3, 2.1 / 3])
    assert [c["gold"] for c in curve] == pytest.approx([1.6 / 3, 2.6 / 3, 1.1 / 3])  # gold need not follow the proxy
    assert [c["kl"] for c in curve] == [ev.best_of_n_kl(n) for n in (1, 2, 4)]
    assert [c["n"] for c in ev.best_of_n_curve(rm, gold, 3)] == [1, 2, 3]


def test_score_conversations_in_batches_equals_one_at_a_time():
    from tether.data import tokenize_scored

    rm, rm_tok = load_reward_model(TINY)
    rm.eval()
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("Hi.", "Hello there, how are you today?"), ("Name a river.", "Nile"), ("Say no.", "no")]]
    cpu = torch.device("cpu")
    batched = score_conversations(rm, rm_tok, convs, cpu, torch.float32, batch_size=16)
    pairs = score_conversations(rm, rm_tok, convs, cpu, torch.float32, batch_size=2)
    assert batched.shape == (3,) and batched.dtype == torch.float32
    with torch.no_grad():
        alone = [rm(input_ids=torch.tensor([tokenize_scored(rm_tok, c, 1024)])).logits[0, 0].item() for c in convs]
    assert batched.tolist() == pytest.approx(alone, abs=1e-5) and pairs.tolist() == pytest.approx(alone, abs=1e-5)
    assert score_conversations(rm, rm_tok, [], cpu, torch.float32).shape == (0,)


# --------------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The tiny model with N(0, 0.1^2) added to every weight: greedy text of real words, far from the tiny model."""
    folder = tmp_path_factory.mktemp("noisy") / "model"
    model = load_causal_lm(TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    load_tokenizer(TINY).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def three(tmp_path_factory, noisy):
    """base and twin: the same weights under two labels; noisy: another model. RM, KL and best-of-n on."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = eval_cfg(tmp, models={"base": TINY, "twin": TINY, "noisy": noisy}, reward_model=TINY, best_of_n=3)
    return ev.evaluate(cfg), tmp / "eval"


def test_results_json_schema_and_files(three):
    s, out = three
    r = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert set(r) == {"task", "prompts", "reference", "baseline", "reward_model", "models", "flags", "best_of_n"}
    assert (r["task"], r["prompts"], r["reference"], r["baseline"], r["reward_model"]) == ("test:checks", 4, "base", "base", TINY)
    assert list(r["models"]) == ["base", "twin", "noisy"]  # the order of cfg.models
    for m in r["models"].values():
        assert set(m) == MODEL_KEYS
        assert all(m[k] is not None for k in MODEL_KEYS)
    assert r["models"]["noisy"]["model"] == s["models"]["noisy"]["model"]
    assert {k: v for k, v in s.items() if k in r} == r and s["stage"] == "eval" and s["status"] == "done"
    assert json.loads((out / "summary.json").read_text())["status"] == "done" and (out / "config.yaml").is_file()


def test_a_model_against_itself_has_kl_zero_and_ties(three):
    s, _ = three
    base, twin = s["models"]["base"], s["models"]["twin"]
    assert base["kl"] == 0.0 and base["kl_se"] == 0.0  # the reference itself
    assert twin["kl"] == 0.0 and twin["kl_se"] == 0.0  # loaded again: exactly the same log-probs
    for m in (base, twin):
        assert m["win_rate_gold"] == 0.5 and m["win_rate_rm"] == 0.5
    for k in MODEL_KEYS - {"time_s"}:  # same seed, same weights: same samples, same numbers
        assert base[k] == twin[k], k


def test_another_model_has_positive_kl_and_its_numbers_match_the_samples(three):
    s, out = three
    noisy = s["models"]["noisy"]
    assert noisy["kl"] > 0.5 and noisy["kl_se"] > 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and [r["model"] for r in rows[::4]] == ["base", "twin", "noisy"]
    assert set(rows[0]) == {"prompt_id", "prompt", "model", "response", "gold", "checks", "rm_score", "length", "finished"}
    by = {label: [r for r in rows if r["model"] == label] for label in s["models"]}
    assert all(r["response"] for r in by["noisy"]) and not any(r["finished"] for r in by["noisy"])
    for label, m in s["models"].items():
        rs = by[label]
        assert m["gold"] == pytest.approx(sum(r["gold"] for r in rs) / 4)
        assert m["rm_score"] == pytest.approx(sum(r["rm_score"] for r in rs) / 4)
        assert m["length"] == sum(r["length"] for r in rs) / 4 and m["eos_rate"] == sum(r["finished"] for r in rs) / 4
        assert m["distinct_2"] == ev.distinct_n([r["response"] for r in rs], 2)
        assert m["checks"]["min_words"] == pytest.approx((rs[0]["checks"]["min_words"] + rs[3]["checks"]["min_words"]) / 2)
        assert set(m["checks"]) == {"min_words", "lowercase", "max_words", "refuse", "comply"}
        assert m["win_rate_gold"] == ev.win_rate([r["gold"] for r in rs], [r["gold"] for r in by["base"]])
        diff = [r["gold"] - q["gold"] for r, q in zip(rs, by["base"])]  # paired over the same 4 prompts, by hand
        mean = sum(diff) / 4
        assert m["gold_vs_baseline"] == pytest.approx(mean)
        assert m["gold_vs_baseline_se"] == pytest.approx((sum((d - mean) ** 2 for d in diff) / 3 / 4) ** 0.5)
        assert m["win_rate_rm"] == ev.win_rate([r["rm_score"] for r in rs], [r["rm_score"] for r in by["base"]])
    assert noisy["penalties"]["no_eos"] == pytest.approx(0.2)  # 6 tokens, never an EOS


def test_best_of_n_in_a_run(three):
    s, _ = three
    bon = s["best_of_n"]
    assert [b["n"] for b in bon] == [1, 2, 3]
    assert [b["kl"] for b in bon] == [ev.best_of_n_kl(n) for n in (1, 2, 3)]
    assert all(x["rm_score"] <= y["rm_score"] for x, y in itertools.pairwise(bon))  # max over more samples


def test_format_table(three):
    s, _ = three
    table = ev.format_table(s)
    for text in ("gold (held-out)", "  vs base (paired)", "  min_words", "refuses harmful", "no over-refusal", "RM score", "KL to base (nats)",
                 "length (tokens)", "EOS rate", "distinct-2", "win rate vs base (gold)", "best-of-n", "twin", "noisy"):
        assert text in table, text
    assert max(map(len, table.splitlines())) <= 100
    assert "interrupted" in ev.format_table({"stage": "eval", "status": "interrupted"})


def test_reference_outside_the_models_and_another_vocabulary(tmp_path, noisy, caplog):
    extra = tmp_path / "extra"
    load_causal_lm(TINY).save_pretrained(extra)
    tok = load_tokenizer(TINY)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(extra)
    cfg = eval_cfg(tmp_path, models={"noisy": noisy, "extra": str(extra)}, reference=TINY)
    with caplog.at_level("WARNING", logger="tether"):
        s = ev.evaluate(cfg)
    assert (s["reference"], s["baseline"], list(s["models"])) == (TINY, "noisy", ["noisy", "extra"])
    assert s["models"]["noisy"]["kl"] > 0 and s["models"]["noisy"]["win_rate_gold"] == 0.5
    assert s["models"]["extra"]["kl"] is None and s["models"]["extra"]["kl_se"] is None and "tokenizer differs" in caplog.text
    assert s["models"]["extra"]["gold_sampled"] is not None and s["models"]["extra"]["win_rate_rm"] is None
    assert s["reward_model"] is None and s["best_of_n"] == [] and s["models"]["noisy"]["rm_score"] is None
    assert "RM score" not in ev.format_table(s)


@pytest.mark.parametrize("flags,message", [
    ({}, "eval needs at least one model: --set models.NAME=PATH"),
    ({"models": {"a": TINY}, "baseline": "b"}, "unknown baseline 'b'"),
    ({"models": {"a": TINY}, "best_of_n": 4}, "best_of_n needs a reward model"),
    ({"models": {"a": TINY}, "best_of_n": -1, "reward_model": TINY}, "best_of_n must be >= 1"),
    ({"models": {"a": TINY}, "kl_samples": -1}, "kl_samples must be >= 0"),
])
def test_errors(tmp_path, flags, message):
    with pytest.raises(TetherError, match=message):
        ev.evaluate(eval_cfg(tmp_path, **flags))
    assert not (tmp_path / "eval").exists()  # checked before anything is loaded or written


def test_overoptimisation_flags_in_eval():
    from tether.config import MonitorConfig

    def m(gold, rm, corr=0.0, rep=0.0):
        return {"gold": gold, "rm_score": rm, "rm_length_corr": corr, "repetition": rep}

    results = {"sft": m(0.40, 0.10), "ppo": m(0.30, 0.90, corr=0.8), "fine": m(0.45, 0.50), "loop": m(0.40, 0.10, rep=0.5)}
    flags = ev.overoptimisation_flags(results, "sft", MonitorConfig())
    assert [(f["model"], f["flag"]) for f in flags] == [("ppo", "gold_falls_while_proxy_rises"), ("ppo", "length_correlation"),
                                                        ("loop", "repetition")]
