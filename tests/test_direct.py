"""tether dpo / kto / orpo (stages/direct.py) on the tiny model: masks, the concatenated forward, the
reference (cached, per batch, adapters off, never for reference-free losses), exact resume, KTO's
mismatched pairs, bad data, the CLI and a pipeline recipe. The loss formulas are tested in
test_direct_losses.py."""

import json
import random
import re

import pytest
import torch
import yaml
from conftest import chat, write_jsonl
from safetensors.torch import load_file

from tether import data as D
from tether import pipeline
from tether.cli import main
from tether.config import DirectConfig, load_config
from tether.errors import TetherError
from tether.models import apply_lora, load_causal_lm
from tether.runloop import micro_batch, seed_everything
from tether.stages import direct

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "amber"]


def pair_rows(n, seed=0):
    """Each prompt has a 'good' (chosen) and a 'bad' (rejected) answer: a learnable token feature."""
    rng = random.Random(seed)
    rows = []

    def filler():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))

    for i in range(n):
        rows.append({"prompt": f"Prompt {i}: pick one.", "chosen": f"{filler()} good {filler()}",
                     "rejected": f"{filler()} bad {filler()}"})
    return rows


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))


@pytest.fixture
def unpaired(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in pair_rows(8, seed=1) for side in ("chosen", "rejected")]
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


def dcfg(tmp_path, data, method="dpo", name="run", **flags):
    """A tiny-model config for `method`; `flags` use dotted keys, e.g. **{'direct.loss_type': 'ipo'}."""
    base = {"model.name": "builtin:tiny", "model.dtype": "fp32", "data.path": str(data), "train.out": str(tmp_path / name),
            "train.max_steps": 3, "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 1e-3, "train.warmup_steps": 0,
            "train.report_to": "none", "train.save_every": 0, "data.eval_fraction": 0.25}
    base.update(flags)
    return direct.with_method(load_config(DirectConfig, None, base), method)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def counted(monkeypatch):
    """Count reference loads and reference forwards (every reference log-prob goes through them)."""
    calls = {"load": 0, "forward": 0, "models": []}
    real_load, real_forward = direct.load_reference, direct.reference_logps

    def load(*a, **k):
        calls["load"] += 1
        ref = real_load(*a, **k)
        calls["models"].append(ref)
        return ref

    def forward(*a, **k):
        calls["forward"] += 1
        return real_forward(*a, **k)

    monkeypatch.setattr(direct, "load_reference", load)
    monkeypatch.setattr(direct, "reference_logps", forward)
    return calls


def test_mask_covers_exactly_the_completion(tok):
    prompt = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello, how can I help?"},
              {"role": "user", "content": "Pick one."}]
    t = direct.tokenize(tok, prompt, [{"role": "assistant", "content": "the good one"}])
    ids, mask = t["input_ids"], t["loss_mask"]
    first, n = mask.index(1), sum(mask)
    assert mask == [0] * first + [1] * n + [0] * (len(mask) - first - n)  # one contiguous span
    assert tok.decode(ids[first : first + n]) == "the good one<|im_end|>"  # content + closing EOS, nothing else
    # everything before is the prompt (its earlier assistant turn included) plus the generation prompt
    assert tok.decode(ids[:first]) == D.render(tok, prompt, add_generation_prompt=True)
    assert tok.eos_token_id == tok.pad_token_id  # why masks never come from the pad id


def test_concatenated_forward_equals_separate_forwards(tok):
    model = load_causal_lm("builtin:tiny").eval()
    items = [{"chosen": direct.tokenize(tok, [{"role": "user", "content": f"Q{i}"}], [{"role": "assistant", "content": c}]),
              "rejected": direct.tokenize(tok, [{"role": "user", "content": f"Q{i}"}], [{"role": "assistant", "content": r}])}
             for i, (c, r) in enumerate([("short", "a much longer answer here, with more words"), ("mid length one", "x")])]
    with torch.no_grad():
        logps, lengths = direct.policy_logps(model, items, direct.PAIRED, tok.pad_token_id, torch.device("cpu"), torch.float32)
        for k, key in enumerate(direct.PAIRED):
            for i, it in enumerate(items):
                alone, n = direct.sequence_logps(model, [it[key]], tok.pad_token_id, torch.device("cpu"), torch.float32)
                assert torch.allclose(logps[k, i], alone[0], atol=1e-5), (key, i)
                assert lengths[k, i] == n[0] == sum(it[key]["loss_mask"][1:])
    assert logps.shape == (2, 2) and (logps < 0).all()


def test_full_fine_tuning_moves_every_parameter_and_never_the_reference(tmp_path, pairs, counted):
    seen = {}
    cfg = dcfg(tmp_path, pairs, **{"direct.precompute_ref": False, "train.max_steps": 2})
    direct.train(cfg, on_step=lambda step, run, model: seen.update(model=model))
    init = load_causal_lm("builtin:tiny").state_dict()
    (ref,) = counted["models"]
    assert ref is not seen["model"] and counted["forward"] > 0  # per batch: the kept reference was used
    for name, p in seen["model"].named_parameters():
        assert p.requires_grad and not torch.equal(p.detach(), init[name]), name
    for name, p in ref.named_parameters():
        assert not p.requires_grad and torch.equal(p, init[name]), name


def test_lora_moves_adapters_only_and_the_reference_is_the_base(tmp_path, pairs, counted):
    seen = {}
    cfg = dcfg(tmp_path, pairs, **{"model.lora_r": 4, "model.lora_alpha": 8, "train.max_steps": 2, "train.lr": 1e-2})
    direct.train(cfg, on_step=lambda step, run, model: seen.update(model=model))
    assert counted["models"] == [None] and counted["forward"] > 0  # adapters off: no second model loaded
    seed_everything(0)  # the trainer seeds before wrapping, so this reproduces the initial adapter
    init = dict(apply_lora(load_causal_lm("builtin:tiny"), 4, 8, 0.0, "all-linear").named_parameters())
    base = load_causal_lm("builtin:tiny").state_dict()
    n_lora = 0
    for name, p in seen["model"].named_parameters():
        if "lora_" in name:
            n_lora += 1
            assert p.requires_grad and not torch.equal(p.detach(), init[name].detach()), name
        else:
            assert not p.requires_grad
            assert torch.equal(p.detach(), base[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
    assert n_lora > 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method,loss,uses_reference", [("dpo", "sigmoid", True), ("dpo", "simpo", False), ("orpo", "sigmoid", False)])
def test_reference_free_losses_never_touch_a_reference(tmp_path, pairs, counted, method, loss, uses_reference):
    s = direct.train(dcfg(tmp_path, pairs, method, **{"direct.loss_type": loss, "train.max_steps": 2}))
    assert s["status"] == "done" and s["steps"] == 2
    assert counted["load"] == (1 if uses_reference else 0)
    assert (counted["forward"] > 0) == uses_reference
    assert (tmp_path / "run" / direct.CACHE).exists() == uses_reference
    rows = metrics(tmp_path / "run")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in rows[1] and f"eval/{key}" in rows[0] and f"eval/{key}" in rows[-1], key
    if method == "orpo":
        assert "log_odds_ratio" in rows[1] and "nll_loss" in rows[1]


def test_precomputed_reference_equals_per_batch_reference(tmp_path, pairs):
    flags = {"train.max_steps": 2, "train.grad_accum": 2, "train.batch_size": 2}
    cached = direct.train(dcfg(tmp_path, pairs, name="cached", **flags))
    live = direct.train(dcfg(tmp_path, pairs, name="live", **flags, **{"direct.precompute_ref": False}))
    assert (tmp_path / "cached" / direct.CACHE).exists() and not (tmp_path / "live" / direct.CACHE).exists()
    a, b = metrics(tmp_path / "cached"), metrics(tmp_path / "live")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):  # losses and rewards read the reference log-probs: same to 1e-5 at every step
        for k in ("train/loss", "rewards/chosen", "rewards/rejected", "eval/loss", "eval/rewards/margins"):
            if k in ma:
                assert ma[k] == pytest.approx(mb[k], abs=1e-5), (ma["step"], k)
    assert cached["train/loss"] == pytest.approx(live["train/loss"], abs=1e-5)
    # and the cached values themselves against a fresh reference forward on differently padded batches
    from tether.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    cfg = direct.check(dcfg(tmp_path, pairs, name="cached"))
    train_set, eval_set = direct.load_examples(cfg, tok)
    table = load_file(tmp_path / "cached" / direct.CACHE)
    ref = load_causal_lm("builtin:tiny").eval()
    fresh = direct.reference_logps(ref, None, [e[k] for e in train_set[:5] for k in direct.PAIRED], tok.pad_token_id,
                                   torch.device("cpu"), torch.float32).view(5, 2)
    assert torch.allclose(table["train"][:5], fresh, atol=1e-5)
    assert table["eval"].shape == (len(eval_set), 2)


def test_resume_equals_straight_run_and_reuses_the_reference_cache(tmp_path, pairs, counted):
    flags = {"train.max_steps": 4, "train.grad_accum": 2, "train.batch_size": 2, "model.lora_r": 4, "model.lora_dropout": 0.2,
             "model.merge": False, "train.lr": 1e-2}  # LoRA dropout draws random numbers: the RNG must be restored too
    straight = direct.train(dcfg(tmp_path, pairs, name="straight", **flags))

    def interrupt(step, run, model):
        if step == 2:
            run.stop_requested = True  # what SIGTERM/SIGINT do

    assert direct.train(dcfg(tmp_path, pairs, name="resumed", **flags), on_step=interrupt) == {"status": "interrupted", "step": 2}
    cache = tmp_path / "resumed" / direct.CACHE
    stamp, forwards = cache.stat().st_mtime_ns, counted["forward"]
    resumed = direct.train(dcfg(tmp_path, pairs, name="resumed", **flags, **{"train.resume": True}))
    assert counted["forward"] == forwards and cache.stat().st_mtime_ns == stamp  # the cache was read, not recomputed
    assert resumed["steps"] == straight["steps"] == 4
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [m["train/loss"] for m in metrics(tmp_path / "straight") if "train/loss" in m]
    lb = [(m["step"], m["train/loss"]) for m in metrics(tmp_path / "resumed") if "train/loss" in m]
    assert [s for s, _ in lb] == [1, 2, 3, 4] and la == [x for _, x in lb]
    # the cache key follows the data: other token ids (or another reference, or dtype) give another key
    cfg = direct.check(dcfg(tmp_path, pairs))
    from tether.models import load_tokenizer

    train_set, eval_set = direct.load_examples(cfg, load_tokenizer("builtin:tiny"))
    key = direct.cache_key(cfg, torch.float32, {"train": train_set, "eval": eval_set}, direct.PAIRED)
    assert key == direct.cache_key(cfg, torch.float32, {"train": train_set, "eval": eval_set}, direct.PAIRED)
    assert key != direct.cache_key(cfg, torch.float32, {"train": train_set[1:], "eval": eval_set}, direct.PAIRED)
    assert key != direct.cache_key(cfg, torch.bfloat16, {"train": train_set, "eval": eval_set}, direct.PAIRED)
    assert direct.read_cache(cache, "another key") is None


@pytest.mark.parametrize("data", ["unpaired", "pairs"])
def test_kto_on_unpaired_data_and_on_pairs_logs_kl(tmp_path, request, tok, data):
    """The logged `kl` is z0 = max(0, mean over the batch's mismatched pairs of logpi - logref): at
    step 1 the policy is the reference (z0 = 0 up to float noise), and at steps 2 and 3 it equals z0
    recomputed here from a snapshot of the policy's weights and a fresh reference forward."""
    path = request.getfixturevalue(data)
    snapshots = {}
    cfg = dcfg(tmp_path, path, "kto", **{"train.max_steps": 3, "train.lr": 1e-2})
    s = direct.train(cfg, on_step=lambda step, run, model: snapshots.update(
        {step: {k: v.detach().clone() for k, v in model.state_dict().items()}}))
    assert s["stage"] == "kto" and s["status"] == "done" and s["train_examples"] + s["eval_examples"] in (16, 32)
    rows = metrics(tmp_path / "run")
    train_rows = {m["step"]: m for m in rows if "train/loss" in m}
    assert sorted(train_rows) == [1, 2, 3]
    assert train_rows[1]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first step's policy is the reference
    assert rows[0]["step"] == 0 and rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    # independent recomputation: the step-s batch went through the weights after step s - 1
    train_set, _ = direct.load_examples(direct.check(cfg), tok)
    cpu, pad = torch.device("cpu"), tok.pad_token_id
    ref = load_causal_lm("builtin:tiny").eval()
    raw = {}
    for step in (2, 3):
        policy = load_causal_lm("builtin:tiny")
        policy.load_state_dict(snapshots[step - 1])
        policy.eval()
        lengths = [max(len(e[k]["input_ids"]) for k in direct.UNPAIRED) for e in train_set]  # group_by_length
        batch = micro_batch(train_set, step - 1, cfg.train.batch_size, cfg.train.seed, lengths)
        assert len(batch) == 4 and all(e["prompt"] != train_set[e["kl_partner"]]["prompt"] for e in batch)
        with torch.no_grad():
            diffs = [direct.sequence_logps(policy, [e["kl"]], pad, cpu, torch.float32)[0].item()
                     - direct.sequence_logps(ref, [e["kl"]], pad, cpu, torch.float32)[0].item() for e in batch]
        raw[step] = sum(diffs) / len(diffs)
        assert train_rows[step]["kl"] == pytest.approx(max(0.0, raw[step]), abs=1e-4), (step, raw[step])
    assert any(r > 0.1 for r in raw.values()), raw  # the policy moved and z0 is unclamped somewhere: not just 0 == 0
    assert "rewards/chosen" in train_rows[3] or "rewards/rejected" in train_rows[3]
    assert "eval/rewards/chosen" in rows[-1] and "eval/rewards/rejected" in rows[-1] and "eval/rewards/accuracies" in rows[-1]
    assert "eval/kl" in rows[-1]
    assert load_file(tmp_path / "run" / direct.CACHE)["train"].shape[1] == 2  # completion and mismatched pair, both cached


def test_kto_mismatched_pairs_take_another_prompt(tmp_path, pairs, tok):
    cfg = direct.check(dcfg(tmp_path, pairs, "kto", **{"data.eval_fraction": 0.0}))
    examples, _ = direct.load_examples(cfg, tok)
    assert len(examples) == 32 and sum(e["label"] for e in examples) == 16  # chosen -> desirable, rejected -> not
    for e in examples:  # its own prompt with the completion of an example of another prompt
        partner = examples[e["kl_partner"]]
        assert partner["prompt"] != e["prompt"]
        assert e["kl"] == direct.tokenize(tok, e["prompt"], partner["messages"]["completion"])
    again, _ = direct.load_examples(cfg, tok)
    assert [e["kl"] for e in again] == [e["kl"] for e in examples]  # fixed at preparation: same on every run


@pytest.mark.parametrize("command,row,extra,message", [
    ("kto", {"prompt": "p", "completion": "a", "label": "yes"}, [], "row 1, field 'label': must be true or false"),
    ("kto", {"prompt": "p", "completion": "a"}, [], "row 1, field 'label': missing column (unpaired data needs"),
    ("kto", {"prompt": "p", "completion": "", "label": True}, [], "row 1, field 'completion': empty completion"),
    ("dpo", {"prompt": "p", "chosen": "same", "rejected": "same"}, [], "row 1, field 'chosen': chosen and rejected are identical"),
    ("dpo", {"prompt": "p", "completion": "a", "label": True}, [], "row 1, field 'chosen': missing column"),
    ("orpo", {"prompt": "p", "chosen": "", "rejected": "b"}, [], "row 1, field 'chosen': empty chosen"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b"}, ["--loss", "cdpo"], "loss_type cdpo needs direct.label_smoothing > 0"),
    ("kto", {"prompt": "p", "chosen": "a", "rejected": "b"}, ["--set", "direct.loss_type=ipo"], "applies to tether dpo only"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b"}, ["--loss", "ipo", "--set", "direct.label_smoothing=0.1"],
     "direct.label_smoothing has no meaning for ipo"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b"}, ["--loss", "ipo_avg", "--set", "direct.label_smoothing=0.1"],
     "direct.label_smoothing has no meaning for ipo_avg"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b"}, ["--loss", "ipo_avg", "--set", "direct.soft_labels=true"],
     "direct.soft_labels needs tether dpo with loss_type sigmoid or cdpo"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "b"}, ["--loss", "hinge", "--set", "direct.soft_labels=true"],
     "direct.soft_labels needs tether dpo with loss_type sigmoid or cdpo"),
])
def test_bad_data_and_settings_exit_2(tmp_path, capsys, command, row, extra, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [row, {"prompt": "q", "chosen": "c", "rejected": "d"}])
    code = main([command, "--model", "builtin:tiny", "--data", str(bad), "--out", str(tmp_path / "o"), "--report-to", "none", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tether: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("loss", ["ipo", "ipo_avg"])
def test_cli_dpo_with_a_loss_flag(tmp_path, pairs, capsys, loss):
    from transformers import AutoModelForCausalLM

    out = tmp_path / loss
    code = main(["dpo", "--model", "builtin:tiny", "--data", str(pairs), "--out", str(out), "--loss", loss, "--max-steps", "2",
                 "--dtype", "fp32", "--report-to", "none", "--lr", "1e-3", "--no-precompute-ref"])
    assert code == 0 and "tether: done. model:" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())["direct"]
    assert (saved["method"], saved["loss_type"], saved["beta"], saved["precompute_ref"]) == ("dpo", loss, 0.1, False)
    s = json.loads((out / "summary.json").read_text())
    assert s["stage"] == "dpo" and s["loss_type"] == loss and s["steps"] == 2 and s["model"] == str(out / "model")
    # before the first step the policy is the reference: every margin is 0, so the loss is the target squared
    assert s["eval/loss_initial"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-3)
    for k in ("train/loss", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies", "eval/loss_initial"):
        assert k in s, k
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    assert main(["orpo", "--model", "builtin:tiny", "--set", "direct.loss_type=simpo", "--data", str(pairs)]) == 2


def test_dpo_learns_the_preference(tmp_path):
    """lr 3e-3 on the tiny model: after one epoch (3 steps) the held-out implicit reward prefers 'good'."""
    train, ev = write_jsonl(tmp_path / "t.jsonl", pair_rows(24, seed=2)), write_jsonl(tmp_path / "e.jsonl", pair_rows(8, seed=3))
    s = direct.train(dcfg(tmp_path, train, **{"data.eval_path": str(ev), "train.max_steps": 0, "train.epochs": 1,
                                              "train.batch_size": 8, "train.lr": 3e-3}))
    assert s["eval/rewards/accuracies_initial"] == 0 and s["eval/loss_initial"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert s["eval/rewards/accuracies"] >= 0.9 and s["eval/loss"] < s["eval/loss_initial"] - 0.05 and s["eval/rewards/margins"] > 0


def test_soft_labels_reach_the_loss(tmp_path):
    """p_chosen = 0.5 on every pair: -0.5 log sigma(beta h) - 0.5 log sigma(-beta h) is flat at h = 0,
    where the policy starts (it is the reference), so the gradient is exactly zero and nothing moves.
    (Per-batch reference: the same batch through identical weights gives bit-identical log-probs. A
    cached one comes from differently padded batches and differs by ~1e-7, which Adam would amplify.)"""
    rows = [{**r, "p_chosen": 0.5} for r in pair_rows(16)]
    data = write_jsonl(tmp_path / "soft.jsonl", rows)
    flags = {"direct.precompute_ref": False, "train.max_steps": 2}
    direct.train(dcfg(tmp_path, data, name="soft", **flags, **{"direct.soft_labels": True}))
    direct.train(dcfg(tmp_path, data, name="hard", **{**flags, "train.max_steps": 1}))
    soft = [m for m in metrics(tmp_path / "soft") if "train/loss" in m]
    hard = [m for m in metrics(tmp_path / "hard") if "train/loss" in m]
    assert all(m["train/grad_norm"] == 0 and m["rewards/margins"] == 0 for m in soft)
    assert soft[-1]["train/loss"] == pytest.approx(0.6931, abs=1e-4)
    assert hard[0]["train/grad_norm"] > 1e-3  # hard labels: the same start does get a gradient


def test_min_agreement_keeps_the_pairs_the_panel_agreed_on(tmp_path, tok):
    """Vote shares 1.0, 0.8, 0.6 and 0.4 (the rejected side's majority: agreement 0.6): at 0.8 the
    first two of every four pairs are trained on; KTO keeps or drops both halves of a pair together;
    the held-out split is never filtered."""
    shares = [1.0, 0.8, 0.6, 0.4]
    rows = [{**r, "p_chosen": shares[i % 4]} for i, r in enumerate(pair_rows(16))]
    data, ev = write_jsonl(tmp_path / "votes.jsonl", rows), write_jsonl(tmp_path / "ev.jsonl", rows[:4])
    flags = {"data.eval_path": str(ev), "data.min_agreement": 0.8}
    train, held = direct.load_examples(direct.check(dcfg(tmp_path, data, **flags)), tok)
    assert [e["row"] for e in train] == [i + 1 for i in range(16) if i % 4 < 2] and len(held) == 4
    train, _ = direct.load_examples(direct.check(dcfg(tmp_path, data, "kto", **flags)), tok)
    assert sorted(e["row"] for e in train) == sorted(2 * [i + 1 for i in range(16) if i % 4 < 2])
    assert sum(e["label"] for e in train) == 8
    train, _ = direct.load_examples(direct.check(dcfg(tmp_path, data, **{**flags, "data.min_agreement": 0.6})), tok)
    assert len(train) == 16  # 0.4 for chosen is 0.6 agreement (with the rejected side)
    train, _ = direct.load_examples(direct.check(dcfg(tmp_path, data, **{**flags, "data.min_agreement": 0.0})), tok)
    assert len(train) == 16


@pytest.mark.parametrize("rows,value,message", [
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}], 0.8, "needs a p_chosen column"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": 0.6}], 0.8, "no example has annotator agreement >= 0.8"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": 1.0}], 0.4, "must be in (0.5, 1]"),
])
def test_min_agreement_errors(tmp_path, tok, rows, value, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(TetherError, match=re.escape(message)):
        direct.load_examples(direct.check(dcfg(tmp_path, data, **{"data.eval_path": str(data), "data.min_agreement": value})), tok)


def test_pipeline_recipe_with_direct_stages(tmp_path, pairs):
    demos = write_jsonl(tmp_path / "demos.jsonl", [chat(f"Say {w}.", f"{w} {w}.") for w in WORDS])
    small = {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "report_to": "none", "save_every": 0}
    recipe = {"name": "tiny-direct", "out": str(tmp_path / "run"), "stages": {
        "sft": {"model": {"name": "builtin:tiny", "dtype": "fp32"}, "data": {"path": str(demos)}, "train": small},
        "ipo": {"kind": "dpo", "model": {"name": "${sft.model}", "dtype": "fp32"}, "data": {"path": str(pairs)},
                "direct": {"loss_type": "ipo"}, "train": small},
        "kto": {"model": {"name": "${sft.model}", "dtype": "fp32"}, "data": {"path": str(pairs)}, "train": small},
    }}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert pipeline.run(path, report=False) == 0
    run = tmp_path / "run"
    state = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    assert [state[n]["status"] for n in ("sft", "ipo", "kto")] == ["done"] * 3
    ipo, kto = (json.loads((run / n / "summary.json").read_text()) for n in ("ipo", "kto"))
    assert (ipo["stage"], ipo["loss_type"], kto["stage"]) == ("dpo", "ipo", "kto")
    assert yaml.safe_load((run / "ipo" / "config.yaml").read_text())["model"]["name"] == str(run / "sft" / "model")
    assert pipeline.run(path, report=False) == 0  # nothing changed: every stage skipped
    assert all(s.get("skipped") for s in json.loads((run / "pipeline.json").read_text())["stages"])


def test_shipped_direct_recipe_is_valid():
    """direct.yaml extends the quickstart: its stages first (identical, so a run folder shares them),
    then a larger label set, the five methods (on the pairs the panel agreed on) and their comparison."""
    from importlib import resources

    with resources.as_file(resources.files("tether.recipes") / "direct.yaml") as p:
        r = pipeline.read_recipe(p)
        quick = pipeline.read_recipe(p.with_name("quickstart.yaml"))
    assert list(r["stages"])[: len(quick["stages"])] == list(quick["stages"]) and r["out"] == quick["out"]
    assert {n: r["stages"][n] for n in quick["stages"]} == quick["stages"]
    assert {n: k for n, (k, _) in r["stages"].items() if n not in quick["stages"]} == {
        "label_direct": "label", "dpo": "dpo", "ipo": "dpo", "simpo": "dpo", "kto": "kto", "orpo": "orpo", "eval_direct": "eval"}
    for method in ("dpo", "ipo", "simpo", "kto", "orpo"):
        data = r["stages"][method][1]["data"]
        assert data["path"] == "${label_direct.train}" and data["min_agreement"] == 0.8
    # the IPO stage picks the length-averaged form on purpose, at the beta it was measured with
    assert r["stages"]["ipo"][1]["direct"] == {"loss_type": "ipo_avg", "beta": 0.5}
