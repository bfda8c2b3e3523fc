"""End-to-end on the real SmolLM2-135M (a few steps: checks the real paths, not quality)."""

import json

import pytest
import torch

from tether.cli import main


@pytest.mark.slow
def test_real_model_lora_sft_bf16(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code = main(["sft", "--model", "builtin:smollm2-135m-instruct", "--data", "builtin:demos", "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--lora-r", "8", "--lr", "1e-3", "--dtype", "bf16",
                 "--max-length", "128", "--report-to", "none", "--set", "train.eval_batches=1", "--set", "data.overlong=drop"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval/loss"] == summary["eval/loss"]  # finite, not NaN
    assert (out / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 30
    assert all(torch.isfinite(p).all() for p in model.parameters())
