import pytest
import torch

from tether import models
from tether.errors import TetherError


def test_resolve_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert models.resolve_dtype("fp32", cpu) == torch.float32
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert isinstance(models.autocast(cpu, torch.float32), type(models.autocast(cpu, torch.float32)))


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = models.load_causal_lm("builtin:tiny"), models.load_causal_lm("builtin:tiny")
    assert torch.equal(torch.get_rng_state(), before)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.config.num_hidden_layers == 2


def test_bad_model_names():
    with pytest.raises(TetherError, match="unknown builtin model"):
        models.load_causal_lm("builtin:gpt5")
    with pytest.raises(TetherError, match="model folder not found"):
        models.load_causal_lm("./missing-folder")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(TetherError, match="has no config.json"):
        models.load_causal_lm(str(tmp_path))


@pytest.mark.slow
def test_embedded_model_cache_matches_gguf_and_second_load_skips_gguf(monkeypatch):
    from transformers import AutoModelForCausalLM

    from tether.data import render

    folder = models.smollm2_folder()  # builds the cache if this machine has none yet
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    tok = models.load_tokenizer(models.SMOLLM2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    prompt = render(tok, [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)

    gguf_dir, gguf_file = models._gguf_location()
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file).eval()

    def no_gguf():
        raise AssertionError("the cached model must load without touching the GGUF file")

    monkeypatch.setattr(models, "_gguf_location", no_gguf)
    cached = models.load_causal_lm(models.SMOLLM2).eval()
    with torch.no_grad():
        assert torch.allclose(cached(**enc).logits, reference(**enc).logits, atol=1e-4)
        out = cached.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
