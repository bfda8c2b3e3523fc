import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from tether.errors import TrainingDiverged
from tether.losses.lm import sft_loss, token_logprobs
from tether.models import apply_lora, load_causal_lm
from tether.runloop import seed_everything
from tether.stages import sft


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_token_logprobs_and_sft_loss_by_hand():
    # vocabulary of 3; logits chosen so the softmax is easy to write down
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 0]])
    lp = token_logprobs(logits, ids)
    z1 = math.log(3.0)                      # uniform over 3
    z2 = math.log(math.exp(2) + 2)          # softmax([2, 0, 0])
    expected = torch.tensor([[-z1, 2.0 - z2]])  # token 1 under uniform; token 0 under [2, 0, 0]
    assert torch.allclose(lp, expected, atol=1e-6)
    mask = torch.tensor([[0, 0, 1]])        # only the last token is a target
    assert sft_loss(lp, mask, 1).item() == pytest.approx(z2 - 2.0, abs=1e-6)
    # normalised by the step's token count, not the micro-batch's
    assert sft_loss(lp, mask, 4).item() == pytest.approx((z2 - 2.0) / 4, abs=1e-6)


def test_run_folder_and_hf_loading(tmp_path, chat_file, tok):
    from transformers import AutoModelForCausalLM

    summary = sft.train(tiny_cfg(tmp_path, chat_file, **{"train.max_steps": 5, "train.report_to": "tensorboard"}))
    out = tmp_path / "run"
    assert summary["status"] == "done" and summary["steps"] == 5
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (out / f).is_file(), f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [m["step"] for m in metrics(out) if "train/loss" in m] == [1, 2, 3, 4, 5]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["eval/loss"] < saved["eval/loss_initial"]  # lr 1e-3 on a tiny model learns fast
    assert saved["peak_memory_mb"] > 0 and saved["wall_time_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    enc = tok("<|im_start|>user\nhi<|im_end|>\n", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4 or gen[0, -1] == tok.eos_token_id


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_straight_run(tmp_path, chat_file, lora):
    flags = {"train.max_steps": 8, "train.grad_accum": 2, "train.batch_size": 3}
    if lora:  # dropout draws random numbers: an exact match needs the RNG state restored too
        flags.update({"model.lora_r": 4, "model.lora_dropout": 0.2, "model.merge": False})
    straight = sft.train(tiny_cfg(tmp_path, chat_file, "straight", **flags))

    def interrupt(step, run, model):
        if step == 3:
            run.stop_requested = True  # what SIGTERM/SIGINT do

    part = sft.train(tiny_cfg(tmp_path, chat_file, "resumed", **flags), on_step=interrupt)
    assert part == {"status": "interrupted", "step": 3}
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000003" / "progress.json").exists()
    assert not (tmp_path / "resumed" / "summary.json").exists()
    resumed = sft.train(tiny_cfg(tmp_path, chat_file, "resumed", **flags, **{"train.resume": True}))
    assert resumed["steps"] == straight["steps"] == 8
    sub = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    a, b = load_file(tmp_path / "straight" / sub), load_file(tmp_path / "resumed" / sub)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics: every step exactly once, and the same losses
    la = [m["train/loss"] for m in metrics(tmp_path / "straight") if "train/loss" in m]
    lb = [(m["step"], m["train/loss"]) for m in metrics(tmp_path / "resumed") if "train/loss" in m]
    assert [s for s, _ in lb] == list(range(1, 9))
    assert la == [x for _, x in lb]


def test_existing_checkpoints_need_resume(tmp_path, chat_file):
    from tether.errors import TetherError

    cfg = tiny_cfg(tmp_path, chat_file, **{"train.max_steps": 2})
    sft.train(cfg)
    with pytest.raises(TetherError, match="pass --resume"):
        sft.train(cfg)


def test_grad_accumulation_equals_one_big_batch(tmp_path, chat_file):
    # plain order: the same 4 examples in one micro-batch of 4 or two of 2 (length grouping would reorder them)
    one = tiny_cfg(tmp_path, chat_file, "one", **{"train.max_steps": 1, "train.batch_size": 4, "train.grad_accum": 1, "train.group_by_length": False})
    two = tiny_cfg(tmp_path, chat_file, "two", **{"train.max_steps": 1, "train.batch_size": 2, "train.grad_accum": 2, "train.group_by_length": False})
    sft.train(one), sft.train(two)
    m1 = next(m for m in metrics(tmp_path / "one") if "train/loss" in m)
    m2 = next(m for m in metrics(tmp_path / "two") if "train/loss" in m)
    assert m1["train/target_tokens"] == m2["train/target_tokens"]
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], abs=1e-5)
    assert m2["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-4)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are poison."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nan_guard_skips_bad_steps(tmp_path, chat_file, monkeypatch):
    calls = {"n": 0}
    real = sft.sft_loss

    def flaky(logps, mask, n):
        calls["n"] += 1
        loss = real(logps, mask, n)
        if calls["n"] == 2:
            return loss * float("nan")          # step 2: non-finite loss
        if calls["n"] == 4:
            return _NanGrad.apply(loss)          # step 4: finite loss, NaN gradients
        return loss

    monkeypatch.setattr(sft, "sft_loss", flaky)
    summary = sft.train(tiny_cfg(tmp_path, chat_file, **{"train.max_steps": 5, "train.max_nan_skips": 2}))
    assert summary["status"] == "done" and summary["nan_skipped"] == 2
    skipped = [m["train/nan_skipped"] for m in metrics(tmp_path / "run") if "train/loss" in m]
    assert skipped == [0, 1, 1, 2, 2]
    for name, t in load_file(tmp_path / "run" / "model" / "model.safetensors").items():
        assert torch.isfinite(t).all(), name


def test_nan_guard_keeps_weights_and_stops_after_k(tmp_path, chat_file, monkeypatch):
    monkeypatch.setattr(sft, "sft_loss", lambda *a: _NanGrad.apply(sft_loss(*a)))
    seen = {}
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        sft.train(tiny_cfg(tmp_path, chat_file, **{"train.max_steps": 10, "train.max_nan_skips": 3}),
                  on_step=lambda step, run, model: seen.update(model=model, step=step))
    assert seen["step"] == 2  # the third bad step raises before its callback
    fresh = load_causal_lm("builtin:tiny").state_dict()
    for k, v in seen["model"].state_dict().items():
        assert torch.equal(v, fresh[k]), k  # no update ever reached the weights


def test_lora_changes_adapter_only_and_merge_matches(tmp_path, chat_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = {}
    cfg = tiny_cfg(tmp_path, chat_file, **{"model.lora_r": 4, "model.lora_alpha": 8, "train.max_steps": 4, "train.lr": 1e-2})
    sft.train(cfg, on_step=lambda step, run, model: seen.update(model=model))
    model = seen["model"]
    seed_everything(0)  # the trainer seeds before wrapping, so this reproduces the initial adapter
    init = dict(apply_lora(load_causal_lm("builtin:tiny"), 4, 8, 0.0, "all-linear").named_parameters())
    base = load_causal_lm("builtin:tiny").state_dict()
    n_lora = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            n_lora += 1
            assert p.requires_grad and not torch.equal(p.detach(), init[name].detach()), name
        else:
            assert not p.requires_grad
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base[base_name]), name
    assert n_lora > 0
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    adapted = PeftModel.from_pretrained(load_causal_lm("builtin:tiny"), out / "adapter").eval()
    x = torch.tensor([[1, 520, 9531, 198, 19556]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, adapted(x).logits, atol=1e-4)
