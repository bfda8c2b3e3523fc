import pytest
import torch

from tether import models
from tether.errors import TetherError


def test_resolve_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU
    for native in (True, False):
        monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda native=native: native)
        # explicit settings are taken as they are, whatever the hardware
        assert models.resolve_dtype("fp32", cpu) is torch.float32
        assert models.resolve_dtype("bf16", cpu) is torch.bfloat16
        # auto on a CPU follows the native-bf16 detector
        assert models.resolve_dtype("auto", cpu) is (torch.bfloat16 if native else torch.float32)
        # auto on CUDA asks CUDA, not the CPU detector
        for cuda_bf16 in (True, False):
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda cuda_bf16=cuda_bf16: cuda_bf16)
            assert models.resolve_dtype("auto", cuda) is (torch.bfloat16 if cuda_bf16 else torch.float32)
            assert models.resolve_dtype("fp32", cuda) is torch.float32
    # resolve_dtype does not validate its argument; a bad value is refused where it enters, by the config
    from tether.config import SFTConfig, load_config

    with pytest.raises(TetherError, match="fp16"):
        load_config(SFTConfig, None, {"model.dtype": "fp16"})
    assert load_config(SFTConfig, None, {"model.dtype": "bf16"}).model.dtype == "bf16"


@pytest.mark.parametrize("cpuinfo,native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
    ("processor\t: 0\nbugs\t\t: avx512_bf16\nflags\t\t: fpu avx2\n", False),  # only the flags line counts
    ("processor\t: 0\nflags\t\t: fpu avx512_bf16x\n", False),  # whole flag names, not substrings
    ("processor\t: 0\n", False),  # no flags line at all
])
def test_cpu_has_fast_bf16_reads_the_flags_line(monkeypatch, cpuinfo, native):
    import io

    opened = []

    def fake_open(path, *a, **k):
        opened.append(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(models, "open", fake_open, raising=False)
    assert models.cpu_has_fast_bf16() is native
    assert opened == ["/proc/cpuinfo"]


def test_cpu_has_fast_bf16_without_proc_cpuinfo(monkeypatch):
    def missing(path, *a, **k):
        raise FileNotFoundError(path)

    monkeypatch.setattr(models, "open", missing, raising=False)
    assert models.cpu_has_fast_bf16() is False
    assert models.resolve_dtype("auto", torch.device("cpu")) is torch.float32


def test_autocast_runs_matmuls_in_the_given_dtype():
    cpu = torch.device("cpu")
    x = torch.randn(4, 4)
    with models.autocast(cpu, torch.float32):
        assert (x @ x).dtype == torch.float32
    with models.autocast(cpu, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    assert (x @ x).dtype == torch.float32  # and only inside the context


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


def test_pickled_weights_are_never_loaded(tmp_path):
    """Weights load from safetensors only: a folder holding just a pickled pytorch_model.bin is an error,
    for causal LMs and reward models alike (unpickling runs arbitrary code)."""
    import torch

    from tether.models import load_causal_lm, load_reward_model, load_tokenizer, save_pretrained

    model = load_causal_lm("builtin:tiny")
    tok = load_tokenizer("builtin:tiny")
    folder = save_pretrained(model, tok, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(TetherError, match="cannot load model"):
        load_causal_lm(str(folder))
    with pytest.raises(TetherError, match="as a reward model"):
        load_reward_model(str(folder))


def test_frozen_lora_base_in_bf16_gives_the_same_products_and_saves_merged_in_fp32(tmp_path):
    """Under bf16 autocast a frozen fp32 matrix is rounded to bf16 at every matmul, so storing it rounded
    changes no output bit; the adapters, norms and embeddings stay fp32, and the merged save is fp32."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer("builtin:tiny")
    ids = torch.tensor([[1, 504, 2683, 314, 260, 2]])
    fp32 = models.apply_lora(models.load_causal_lm("builtin:tiny"), 4, 8, 0.0, "all-linear")
    with torch.no_grad():
        for n, p in fp32.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    mixed = models.apply_lora(models.load_causal_lm("builtin:tiny"), 4, 8, 0.0, "all-linear")
    mixed.load_state_dict(fp32.state_dict())
    n = models.frozen_matrices_in(mixed, torch.bfloat16)
    assert n == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert models.frozen_matrices_in(mixed, torch.float32) == 0
    dtypes = {name: p.dtype for name, p in mixed.named_parameters()}
    assert all(d == torch.float32 for name, d in dtypes.items() if "lora_" in name or "norm" in name or "embed" in name)
    assert sum(d == torch.bfloat16 for d in dtypes.values()) == n
    with torch.no_grad(), models.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.equal(mixed(input_ids=ids).logits, fp32(input_ids=ids).logits)
    models.save_pretrained(mixed, tok, tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    with torch.no_grad():  # the merged model is the bf16-rounded base plus the fp32 adapter delta
        want = mixed.float()(input_ids=ids).logits
        assert torch.allclose(saved(ids).logits, want, atol=1e-5)


def test_right_padding_needs_no_attention_mask_and_scores_are_unchanged():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    holes = torch.tensor([[1, 0, 1, 1]])
    packed = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    assert models.causal_mask(right) is None and models.causal_mask(None) is None
    assert models.causal_mask(left) is left and models.causal_mask(holes) is holes and models.causal_mask(packed) is packed
    rm = models.load_reward_model("builtin:tiny")[0].eval()
    ids = torch.tensor([[1, 504, 2683, 2], [1, 314, 260, 77]])
    with torch.no_grad():
        got = models.sequence_scores(rm, ids, torch.tensor([3, 4]))
        h = rm.model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])).last_hidden_state
        want = rm.score(h).squeeze(-1)[[0, 1], [2, 3]]
    assert torch.allclose(got, want, atol=1e-6)
