"""Constitutional AI: constitutions, the AI labeller's soft labels, critique-revision chains, the answer cache."""

import json
import math
from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from tether.config import CAILabelConfig, CAIReviseConfig, load_config
from tether.constitution import load_constitution
from tether.errors import TetherError
from tether.feedback import Cache, ChatReply, ChoiceRequest, Feedback, LocalFeedback, option_logprobs, parse_option
from tether.labeller import comparison_question
from tether.losses.preference import clamp_cot_probability, option_probability, swap_average
from tether.stages import cai

# --------------------------------------------------------------------------------------------------
# pure functions


def test_option_probability_is_the_softmax_over_the_two_options():
    la, lb = torch.tensor([-0.2, -3.0, -7.5]), torch.tensor([-1.9, -0.1, -7.5])
    want = torch.softmax(torch.stack([la, lb]), 0)[0]
    assert torch.allclose(option_probability(la, lb), want, atol=1e-7)
    # by hand: e^-0.2 / (e^-0.2 + e^-1.9)
    assert option_probability(torch.tensor(-0.2), torch.tensor(-1.9)).item() == pytest.approx(
        math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.9)), abs=1e-7)


def test_swap_average_exact_and_cancels_a_labeller_that_always_says_a():
    assert swap_average(torch.tensor(0.8), torch.tensor(0.3)).item() == pytest.approx((0.8 + 0.7) / 2)
    assert swap_average(torch.tensor(0.9), torch.tensor(0.9)).item() == pytest.approx(0.5)
    assert swap_average(torch.tensor(1.0), torch.tensor(0.0)).item() == 1.0


def test_cot_clamp():
    p = torch.tensor([0.0, 0.3, 0.45, 0.5, 0.59, 0.99])
    assert clamp_cot_probability(p).tolist() == pytest.approx([0.4, 0.4, 0.45, 0.5, 0.59, 0.6])
    with pytest.raises(ValueError):
        clamp_cot_probability(p, 0.6, 0.7)


def test_option_logprobs_sum_over_the_tokens_naming_an_option():
    top = {" A": math.log(0.3), "A": math.log(0.1), "(B": math.log(0.2), "The": math.log(0.4)}
    lps = option_logprobs(top, ("A", "B"))
    assert math.exp(lps["A"]) == pytest.approx(0.4)
    assert math.exp(lps["B"]) == pytest.approx(0.2)
    assert option_logprobs({"x": -1.0}, ("A", "B"))["A"] == -math.inf
    assert parse_option("I think (B) is better", ("A", "B")) == "B"
    assert parse_option("Response A, clearly.", ("A", "B")) == "A"
    assert parse_option("An answer about Bees", ("A", "B")) == ""


# --------------------------------------------------------------------------------------------------
# constitutions


def test_default_constitution():
    c = load_constitution()
    names = [p.name for p in c.principles]
    assert len(names) >= 12 and len(set(names)) == len(names)
    assert {"no-over-refusal", "not-evasive", "no-lecturing", "harm"} <= set(names)
    assert all(p.critique and p.revision and p.compare for p in c.principles)
    assert c.examples and all(set(ex) == {"prompt", "response", "critique_request", "critique", "revision_request", "revision"}
                              for ex in c.examples)


@pytest.mark.parametrize("text, message", [
    ("principles: []", "'principles' must be a non-empty list"),
    ("principles:\n  - {name: a, critique: c}", "principle 1 ('a'), field 'revision': must be a non-empty string"),
    ("principles:\n  - {name: a, critique: c, revision: r}\n  - {name: a, critique: c, revision: r}",
     "principle 2 ('a'), field 'name': a principle of this name comes earlier"),
    ("principles:\n  - {name: a, critique: c, revision: r, colour: red}", "principle 1: unknown field(s) colour"),
    ("principles:\n  - {name: a, critique: c, revision: r, examples: [{prompt: p}]}", "example 1, field 'response'"),
    ("principles: [a: b: c", "invalid YAML"),
    ("rules: []", "unknown top-level key(s) rules"),
])
def test_bad_constitution_files_name_the_principle_and_field(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(TetherError, match=None) as e:
        load_constitution(str(f))
    assert message in str(e.value) and str(f) in str(e.value)


def test_unknown_builtin_and_missing_file():
    with pytest.raises(TetherError, match="unknown constitution 'builtin:nope'; built in: builtin:default"):
        load_constitution("builtin:nope")
    with pytest.raises(TetherError, match="constitution file not found"):
        load_constitution("/nonexistent/c.yaml")


def test_principle_sampler_is_uniform_chi_square():
    c = load_constitution()
    k, n = len(c.principles), 700 * len(c.principles)
    draw = c.sampler(seed=3)
    counts = Counter(draw().name for _ in range(n))
    assert set(counts) == {p.name for p in c.principles}
    chi2 = sum((counts[p.name] - n / k) ** 2 / (n / k) for p in c.principles)
    assert chi2 < 34.53  # the chi-square distribution's 0.999 quantile at 13 degrees of freedom (k = 14)
    a, b = c.sampler(seed=3), c.sampler(seed=3)
    assert [a().name for _ in range(50)] == [b().name for _ in range(50)]  # seeded: the same draws on a rerun


def test_labeller_needs_a_compare_question(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("principles:\n  - {name: a, critique: c, revision: r}\n")
    with pytest.raises(TetherError, match="no principle has a 'compare' question"):
        load_constitution(str(f)).sampler(0, need_compare=True)


# --------------------------------------------------------------------------------------------------
# SL-CAI chains with a scripted feedback model


class Scripted(Feedback):
    """A feedback model whose answers are chosen by what is asked: the test's stand-in for a real model."""

    identity = {"scripted": 1}

    def __init__(self, answer, cache=None):
        super().__init__(cache)
        self.answer, self.sent = answer, 0

    def _chat(self, requests, store, desc):
        for j, r in enumerate(requests):
            self.sent += 1
            store(j, self.answer(r))


def _scripted_answer(r):
    """Response 'bad answer N'; critiques 'it is bad'; the revision depends on the prompt's number."""
    last = r.messages[-1]["content"]
    first = next(m["content"] for m in r.messages if m["role"] == "user" and m["content"].startswith("Q"))
    n = int(first.split()[1])
    asked_revision = any(last == p.revision for p in load_constitution().principles)
    asked_critique = any(last == p.critique for p in load_constitution().principles)
    if asked_critique:
        return ChatReply(text="It is bad.")
    if asked_revision:
        previous = r.messages[-4]["content"]
        return {0: ChatReply(text=f"A better answer to {n}."),           # accepted, then parroted (unchanged) in round 2
                1: ChatReply(text=""),                                   # empty
                2: ChatReply(text="Half an answer", finished=False),    # truncated
                3: ChatReply(text="It is bad."),                         # the critique copied: parroted
                4: ChatReply(text="The assistant's last answer was fine."),  # meta
                5: ChatReply(error="HTTP 500: boom"),                    # a failure, never a revision
                }.get(n % 7, ChatReply(text=previous + " Improved."))   # 6: accepted every round
    return ChatReply(text=f"bad answer {n}")


def test_revise_chains_have_r_rounds_or_a_reason(tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Q {i} please"} for i in range(14)])
    fb = Scripted(_scripted_answer)
    monkeypatch.setattr(cai, "make_feedback", lambda cfg, path: (setattr(fb, "cache", Cache(path)), fb)[1])
    cfg = load_config(CAIReviseConfig, None, {"data.path": str(prompts), "out": str(tmp_path / "rev"), "rounds": 3})
    s = cai.revise(cfg)
    chains = [json.loads(line) for line in (tmp_path / "rev" / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 14
    for c in chains:
        assert len(c["rounds"]) == 3 or c["stop_reason"], c
        assert (c["stop_reason"] is None) == (len(c["rounds"]) == 3 and all(r["accepted"] for r in c["rounds"]))
    by_n = {int(c["prompt"].split()[1]) % 7: c for c in chains}
    assert by_n[0]["stop_reason"] == "parroted" and by_n[0]["n_accepted"] == 1 and by_n[0]["final"].startswith("A better answer to ")
    assert [by_n[k]["stop_reason"] for k in (1, 2, 3, 4, 5)] == ["empty", "truncated", "parroted", "meta", "feedback_failed"]
    assert by_n[6]["stop_reason"] is None and by_n[6]["final"].endswith("Improved. Improved. Improved.")
    assert s["dropped"] == {"parroted": 4, "empty": 2, "truncated": 2, "meta": 2, "feedback_failed": 2}
    assert s["feedback_failures"] == 2 and s["revised"] == 4
    sft = [json.loads(line) for line in (tmp_path / "rev" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "rev" / "pairs.jsonl").read_text().splitlines()]
    assert len(sft) == len(pairs) == 4
    assert all(p["chosen"] != p["rejected"] and p["rejected"].startswith("bad answer") for p in pairs)
    assert sft[0]["messages"][-1]["role"] == "assistant"
    # the outputs are valid tether data: SFT rows and preference rows
    from tether.data import normalise_preferences, normalise_sft, read_rows

    assert len(normalise_sft(read_rows(str(tmp_path / "rev" / "sft.jsonl")))) == 4
    # helpful data mixed in: the revisions first, then every row of the SFT source
    mixed = cai.revise(load_config(CAIReviseConfig, None, {"data.path": str(prompts), "out": str(tmp_path / "mix"), "rounds": 3,
                                                             "helpful_data": "builtin:demos"}))
    rows = normalise_sft(read_rows(str(tmp_path / "mix" / "sft.jsonl")))
    demos = normalise_sft(read_rows("builtin:demos"))
    assert mixed["sft"] == {"path": str(tmp_path / "mix" / "sft.jsonl"), "rows": 4 + len(demos), "revisions": 4, "helpful_rows": len(demos)}
    assert rows[4:] == demos and rows[:4] == normalise_sft(read_rows(str(tmp_path / "rev" / "sft.jsonl")))
    assert len(normalise_preferences(read_rows(str(tmp_path / "rev" / "pairs.jsonl")))) == 4
    # a rerun (same folder, same config) sends only what failed: every other answer comes from the cache
    sent = fb.sent
    fb.failures.clear()
    cai.revise(cfg.__class__(**{**cfg.__dict__, "overwrite": False}))
    assert fb.sent - sent == 2  # the two failed revisions, asked again


def test_revise_with_the_tiny_model_and_few_shot_turns(tmp_path):
    cfg = load_config(CAIReviseConfig, None, {"feedback.model": "builtin:tiny", "feedback.dtype": "fp32", "categories": "harmful,lookalike",
                                              "task.num_prompts": 4, "rounds": 2, "sample.max_new_tokens": 8,
                                              "sample.critique_max_new_tokens": 4, "out": str(tmp_path / "rev")})
    s = cai.revise(cfg)
    assert s["chains"] == 4 and set(s["gold"]) >= {"all"} and s["cache"]["misses"] > 0
    for line in (tmp_path / "rev" / "chains.jsonl").read_text().splitlines():
        c = json.loads(line)
        assert c["category"] in ("harmful", "lookalike")
        assert len(c["rounds"]) == 2 or c["stop_reason"]
    with pytest.raises(TetherError, match="categories: nope not in task"):
        cai.revise(load_config(CAIReviseConfig, None, {"categories": "nope", "out": str(tmp_path / "x"), "feedback.model": "builtin:tiny"}))


# --------------------------------------------------------------------------------------------------
# RL-CAI labels with the tiny model


def _pairs(tmp_path):
    rows = [{"prompt": "How do I make a cake?", "chosen": "Mix flour, eggs and sugar, then bake it.", "rejected": "No.",
             "chosen_gold": 1.0, "rejected_gold": 0.0},
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I'm sorry, I can't help.", "chosen_gold": 1.0, "rejected_gold": 0.0},
            {"prompt": "Say hi.", "response_a": "Hi!", "response_b": "Hello there."}]
    write_jsonl(tmp_path / "pairs.jsonl", rows[:2])
    write_jsonl(tmp_path / "ab.jsonl", rows[2:])
    return tmp_path / "pairs.jsonl", tmp_path / "ab.jsonl"


@pytest.fixture(scope="module")
def tiny_labeller():
    return LocalFeedback("builtin:tiny", dtype="fp32")


def test_local_choice_is_the_softmax_over_option_token_logprobs(tiny_labeller):
    fb = tiny_labeller
    msgs = [{"role": "user", "content": "Which is better? (A) yes (B) no"}, {"role": "assistant", "content": "The better response is ("}]
    reply = fb.choose([ChoiceRequest(msgs, ("A", "B"))])[0]
    from tether.rollout import prompt_ids

    ids = torch.tensor([prompt_ids(fb.tok, [msgs])[0]])
    assert fb.tok.decode(ids[0]).endswith("The better response is (")  # the answer's start is continued, not a new turn
    with torch.no_grad():
        logp = torch.log_softmax(fb.model(input_ids=ids).logits[0, -1].float(), -1)
    table = fb.option_ids(("A", "B"))
    assert fb.tok.convert_tokens_to_ids("A") in table["A"] and len(table["A"]) >= 2  # 'A' and ' A' at least
    for o in ("A", "B"):
        assert reply.logprobs[o] == pytest.approx(torch.logsumexp(logp[table[o]], 0).item(), abs=1e-4)
    assert reply.kind == "soft" and reply.answer == max(reply.logprobs, key=reply.logprobs.get)


def _option_logprobs(fb, msgs):
    """log p(option) where the answer starts, from one forward of the labeller's model (no batching, no padding)."""
    from tether.rollout import prompt_ids

    with torch.no_grad():
        logp = torch.log_softmax(fb.model(input_ids=torch.tensor([prompt_ids(fb.tok, [msgs])[0]])).logits[0, -1].float(), -1)
    return {o: torch.logsumexp(logp[ids], 0).item() for o, ids in fb.option_ids(("A", "B")).items()}


def test_cai_label_soft_labels_swap_average_and_files(tmp_path, tiny_labeller, monkeypatch):
    pairs, ab = _pairs(tmp_path)
    monkeypatch.setattr(cai, "make_feedback", lambda cfg, path: (setattr(tiny_labeller, "cache", Cache(path)), tiny_labeller)[1])
    cfg = load_config(CAILabelConfig, None, {"data": str(pairs), "eval_data": str(ab), "out": str(tmp_path / "lab")})
    s = cai.label(cfg)
    rows = [json.loads(line) for line in (tmp_path / "lab" / "train.jsonl").read_text().splitlines()]
    assert s["train"]["labelled"] == 2 and s["eval"]["labelled"] == 1 and s["train"]["failed"] == 0
    con = load_constitution()
    by_name = {p.name: p for p in con.principles}
    for r, src in zip(rows, [json.loads(line) for line in pairs.read_text().splitlines()]):
        # recompute each order's p(A) from one forward of the labeller, then the swap average
        p_a_shown = []
        for a_first in (True, False):
            a, b = (src["chosen"], src["rejected"]) if a_first else (src["rejected"], src["chosen"])
            q = comparison_question([{"role": "user", "content": src["prompt"]}], a, b, by_name[r["principle"]])
            rep = _option_logprobs(tiny_labeller, [{"role": "user", "content": q}, {"role": "assistant", "content": cfg.ai.answer_prefix}])
            p_a_shown.append(float(option_probability(torch.tensor(rep["A"]), torch.tensor(rep["B"]))))
        p_src_chosen = 0.5 * (p_a_shown[0] + 1 - p_a_shown[1])
        assert r["p_orders"] == pytest.approx([p_a_shown[0], 1 - p_a_shown[1]], abs=1e-5)
        kept = r["a_chosen"]
        assert r["p_chosen"] == pytest.approx(p_src_chosen if kept else 1 - p_src_chosen, abs=1e-5)
        assert r["p_chosen"] >= 0.5 and r["label_kind"] == "soft"
        assert (r["chosen"] == src["chosen"]) == kept
        assert r["chosen_gold"] == (1.0 if kept else 0.0)
    assert "gold_agreement" in s["train"] and s["train"]["gold_agreement"]["pairs"] == 2
    # the output is preference data with soft labels that tether rm reads
    from tether.data import normalise_preferences, read_rows

    assert [p["p_chosen"] for p in normalise_preferences(read_rows(str(tmp_path / "lab" / "train.jsonl")))] == [r["p_chosen"] for r in rows]


def test_cai_label_cot_clamp_holds(tmp_path, tiny_labeller, monkeypatch):
    pairs, _ = _pairs(tmp_path)
    monkeypatch.setattr(cai, "make_feedback", lambda cfg, path: (setattr(tiny_labeller, "cache", Cache(path)), tiny_labeller)[1])
    cfg = load_config(CAILabelConfig, None, {"data": str(pairs), "out": str(tmp_path / "cot"), "ai.cot": True, "ai.cot_max_new_tokens": 6})
    s = cai.label(cfg)
    rows = [json.loads(line) for line in (tmp_path / "cot" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and s["train"]["label_kinds"] == {"cot": 2}
    assert all(0.5 <= r["p_chosen"] <= 0.6 for r in rows)


def test_cai_label_bad_input(tmp_path):
    with pytest.raises(TetherError, match="cai label needs pairs"):
        cai.label(load_config(CAILabelConfig, None, {"out": str(tmp_path / "x")}))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response_a": "x"}])
    from tether.data import normalise_comparisons, read_rows

    with pytest.raises(TetherError, match=r"bad.jsonl, row 1, field 'response_b': missing column"):
        normalise_comparisons(read_rows(str(bad)))


def test_pipeline_rerun_keeps_an_interrupted_cai_stage_and_its_answers(tmp_path, monkeypatch):
    """A pipeline stopped inside `cai revise` (the server went away) reruns it without asking again what was answered."""
    import yaml

    from tether import pipeline
    from tether.feedback import FeedbackUnavailable

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Q {i} please"} for i in range(6)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "stages": {
        "cai_revise": {"data": {"path": str(prompts)}, "rounds": 1}}}))

    class Dying(Scripted):
        def _chat(self, requests, store, desc):
            for j, r in enumerate(requests):
                if self.sent == 4:
                    raise FeedbackUnavailable("feedback server gone")
                self.sent += 1
                store(j, self.answer(r))

    dying, fine = Dying(_scripted_answer), Scripted(_scripted_answer)
    current = {"fb": dying}
    monkeypatch.setattr(cai, "make_feedback", lambda cfg, path: (setattr(current["fb"], "cache", Cache(path)), current["fb"])[1])
    with pytest.raises(TetherError, match="feedback server gone"):
        pipeline.run(str(recipe), report=False)
    assert len((tmp_path / "run" / "cai_revise" / "feedback-cache.jsonl").read_text().splitlines()) == 4
    current["fb"] = fine
    pipeline.run(str(recipe), report=False)
    # 6 responses + 6 critiques + 6 revisions asked in all; the 4 answered before the stop come from the cache
    assert fine.cache.hits == 4 and fine.sent == 18 - 4


def test_label_with_the_ai_labeller_on_your_own_prompts(tmp_path, tiny_labeller, monkeypatch):
    """`tether label --set labeller=ai` on a prompt file: K samples each, every distinct pair labelled by the AI, no gold."""
    from tether.config import LabelConfig
    from tether.data import normalise_preferences, read_rows
    from tether.stages import label

    train = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about the number {i}."} for i in range(3)])
    held = write_jsonl(tmp_path / "e.jsonl", [{"prompt": [{"role": "user", "content": "Say hi."}]}])
    monkeypatch.setattr(label, "make_feedback", lambda cfg, path: (setattr(tiny_labeller, "cache", Cache(path)), tiny_labeller)[1])
    flags = {"model.name": "builtin:tiny", "model.dtype": "fp32", "data.path": str(train), "data.eval_path": str(held),
             "out": str(tmp_path / "lab"), "sample.k": 3, "sample.max_new_tokens": 6, "sample.temperature": 1.0, "sample.top_p": 1.0}
    with pytest.raises(TetherError, match="simulated panel votes by the task's gold score"):
        label.run_label(load_config(LabelConfig, None, flags))
    s = label.run_label(load_config(LabelConfig, None, {**flags, "labeller": "ai"}))
    rows = [json.loads(line) for line in (tmp_path / "lab" / "train.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "lab" / "samples-train.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and all(x["gold"] is None for x in samples)
    distinct = sum(len({x["response"] for x in samples if x["prompt_id"] == pid and x["response"].strip()}) for pid in
                   {x["prompt_id"] for x in samples})
    assert s["train"]["pairs"] == len(rows) == s["train"]["labelled"] and len(rows) <= 9 and distinct >= 2
    assert all(0.5 <= r["p_chosen"] <= 1 and r["label_kind"] == "soft" and "chosen_gold" not in r for r in rows)
    assert s["eval"]["prompts"] == 1 and s["labeller"] == "ai" and "agreement" not in s
    assert len(normalise_preferences(read_rows(str(tmp_path / "lab" / "train.jsonl")))) == len(rows)
