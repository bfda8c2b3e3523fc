"""The rollout engine: prompts in; response token ids, their log-probs and finished flags out.

One small interface serves every stage that samples (label, ppo, eval, and later CAI):

    engine = Engine(model, tok)                 # a no-grad copy of the weights in the sampling dtype
    out = engine.generate(prompt_ids, max_new_tokens=64, temperature=1.0)
    engine.load_weights(model)                  # after each optimizer update (LoRA adapters merged in)

Why it is fast on a CPU (SmolLM2-135M, 2 cores, bf16; profile of Hugging Face `generate` first):
  - its own copy of the weights in bf16: autocast re-casts every fp32 weight matrix at every decode
    step (a full copy of the model per token step), and the rollout never needs gradients;
  - for Llama-family models (SmolLM2, Llama, Mistral without sliding windows) a decode step of its own:
    q/k/v and gate/up fused into one matmul each, a static KV cache written in place (no torch.cat of
    the whole cache per step), RMSNorm and rotary embeddings in a few ops, so a step is ~15 kernels a
    layer instead of ~60 small ones;
  - prompts sorted by length and batched, so left padding is short;
  - finished rows dropped from the batch (their cache rows too) once a quarter of the batch is done;
  - plain temperature sampling (no full-vocabulary sort) unless top-p < 1.
Other architectures use Hugging Face `generate` on the same bf16 copy (`impl="hf"`), which is also the
reference the fast path is tested against (greedy outputs identical in fp32; log-probs equal to the
trainer's forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    response_ids: list[list[int]]  # each response's tokens: its closing EOS included, nothing after it
    logprobs: list[list[float]]    # log pi(y_t | x, y_<t) at the sampling temperature (T = 1 when greedy)
    finished: list[bool]           # True when the response ended with EOS within max_new_tokens


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights a forward pass of `model` uses, keyed as in its base model: with peft LoRA adapters
    the active adapter's delta is added (W + scale * B @ A) without touching the model itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    deltas = {}
    for name, mod in base.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and not getattr(mod, "disable_adapters", False):
            for adapter in getattr(mod, "active_adapters", []):
                if adapter in getattr(mod, "lora_A", {}):
                    key = f"{name}.weight"
                    deltas[key] = deltas.get(key, 0) + mod.get_delta_weight(adapter).detach()
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = value.detach() + deltas[clean] if clean in deltas else value.detach()
    return out


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' lowbias32) on int64 tensors holding values in [0, 2^32)."""
    m = 0xFFFFFFFF
    x = x & m
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & m  # int64 products wrap; only the low 32 bits are kept
    x = ((x ^ (x >> 15)) * 0x846CA68B) & m
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """Uniforms in [0, 1) (float32, 24 bits: the resolution of an fp32 CDF), one per seed, a pure function
    of (seed, step): the counter-based stream of seeded sampling (`Engine.generate(seeds=...)`)."""
    x = _hash32(_hash32(seeds.to(torch.int64)) + step + 1)
    return (x >> 8).to(torch.float32) / float(1 << 24)


def _supports_fast(config) -> bool:
    """The fast decode step implements the plain Llama block (what SmolLM2 is)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (getattr(config, "model_type", "") in ("llama", "mistral") and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False) and getattr(config, "hidden_act", "silu") == "silu"
            and rope.get("rope_type", "default") == "default" and not getattr(config, "sliding_window", None)
            and getattr(config, "pretraining_tp", 1) == 1)


def _onednn_bf16() -> bool:
    """oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only CPU the packed
    path raises, so the engine falls back to plain F.linear there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Engine:
    """Sampling from a causal LM with its own no-grad copy of the weights (see the module docstring)."""

    def __init__(self, model, tok, dtype: torch.dtype | None = None, impl: str = "auto"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config, self.tok = base.config, tok
        self.device = next(base.parameters()).device
        self.dtype = dtype or next(base.parameters()).dtype
        if impl not in ("auto", "fast", "hf"):
            raise ValueError(f"unknown engine impl {impl!r} (auto, fast, hf)")
        if impl == "fast" and not _supports_fast(self.config):
            raise ValueError(f"the fast decode step does not support model_type {self.config.model_type!r}; use impl='hf'")
        self.impl = "fast" if impl == "auto" and _supports_fast(self.config) else ("hf" if impl == "auto" else impl)
        self._hf = None
        # bf16 matrices on a CPU go through oneDNN with pre-packed weights: the same products, bit for bit,
        # at 1.7-2.5x the speed of F.linear for the decode step's shapes (batch 16-64 x 576-3072)
        self._packed = (self.impl == "fast" and self.device.type == "cpu" and self.dtype == torch.bfloat16
                        and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                        and _onednn_bf16())
        self.load_weights(model)

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, model, state: dict | None = None) -> None:
        """Copy the model's current (LoRA-merged) weights into the engine, cast to the engine's dtype;
        `state`: those weights already gathered (a sharded model's full state dict)."""
        sd = {k: v.to(self.device, self.dtype) for k, v in (state if state is not None else merged_state_dict(model)).items()}
        if self.impl == "hf":
            if self._hf is None:
                from transformers import AutoModelForCausalLM

                self._hf = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype).to(self.device).eval()
                self._hf.requires_grad_(False)
            self._hf.load_state_dict(sd, strict=False)
            if getattr(self.config, "tie_word_embeddings", False):
                self._hf.tie_weights()
            return
        c, L = self.config, self.config.num_hidden_layers
        p = "model.layers.{}."
        self.embed = sd["model.embed_tokens.weight"]
        self.lm_head = sd.get("lm_head.weight", self.embed) if not c.tie_word_embeddings else self.embed
        self.norm = sd["model.norm.weight"]
        self.layers = []
        for i in range(L):
            w = {k[len(p.format(i)):]: v for k, v in sd.items() if k.startswith(p.format(i))}
            self.layers.append((
                w["input_layernorm.weight"],
                torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]]),
                w["self_attn.o_proj.weight"],
                w["post_attention_layernorm.weight"],
                torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
                w["mlp.down_proj.weight"],
            ))
        if self._packed:  # one-off re-layout of each matrix into oneDNN's blocked format (see _linear)
            pack = torch.ops.mkldnn._reorder_linear_weight
            self.lm_head = pack(self.lm_head)
            self.layers = [(ln1, pack(wqkv), pack(wo), ln2, pack(wgu), pack(wd)) for ln1, wqkv, wo, ln2, wgu, wd in self.layers]
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.device).float() / self.head_dim))

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 batch_size: int = 64, min_new_tokens: int = 0, progress=None, seeds: list[int] | None = None) -> Rollout:
        """Sample (temperature > 0) or decode greedily (temperature == 0) a response for each prompt (token
        ids, chat template already applied). Prompts are sorted by length and run in batches of
        `batch_size`; results come back in the prompts' order. `min_new_tokens` suppresses EOS before that
        many tokens (benchmarks use it to make every row do the same work). `progress` (a callable taking
        the number of finished prompts) is called after each batch. `seeds` (one int per prompt): each
        response's random draws come from its own seed and token position (`counter_uniform`), not from
        torch's global stream, so a response does not depend on which prompts share its batch or process
        (data-parallel RL samples the same responses on any number of ranks). The fast path only; the
        Hugging Face path draws from torch's stream."""
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        ids: list = [None] * len(prompt_ids)
        lps: list = [None] * len(prompt_ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            args = ([prompt_ids[i] for i in chunk], max_new_tokens, temperature, top_p, min_new_tokens)
            out = (self._batch_fast(*args, seeds=[seeds[i] for i in chunk] if seeds is not None else None)
                   if self.impl == "fast" else self._batch_hf(*args))
            for i, (r, lp) in zip(chunk, zip(*out)):
                ids[i], lps[i] = r, lp
            if progress is not None:
                progress(len(chunk))
        eos = self.tok.eos_token_id
        return Rollout(ids, lps, [len(r) > 0 and r[-1] == eos for r in ids])

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(next tokens (B,), their log-probs (B,)) from fp32 logits (B, V). Greedy at T = 0 (log-probs at
        T = 1); plain categorical sampling at temperature T; nucleus sampling only when top_p < 1. `u` (B, 1):
        the rows' uniforms in [0, 1) (seeded sampling), else drawn from torch's stream."""
        if temperature <= 0:
            nxt = logits.argmax(-1)
            return nxt, torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0]
        probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, -1)  # one pass over the vocabulary
        if u is None:
            u = torch.rand(probs.shape[0], 1, device=probs.device)
        if top_p < 1.0:
            nxt = self._nucleus(probs, top_p, u)
        else:
            # inverse-CDF sampling: one uniform per row against the cumulative probabilities. (torch.multinomial
            # draws an exponential variate for every vocabulary entry: a third of a decode step on a CPU.)
            cdf = probs.cumsum(-1)
            nxt = torch.searchsorted(cdf, u.to(cdf.dtype) * cdf[:, -1:], right=True)[:, 0].clamp(max=probs.shape[1] - 1)
        # the log-prob before any truncation (what the trainer's forward computes); never near fp32's
        # underflow, since the token was sampled
        return nxt, probs.gather(-1, nxt[:, None])[:, 0].log()

    @staticmethod
    def _nucleus(probs: torch.Tensor, top_p: float, u: torch.Tensor | None = None, k: int = 256) -> torch.Tensor:
        """Nucleus sampling (Holtzman et al. 2020): a token from the smallest set of most likely tokens whose
        mass reaches top_p, renormalised. The set comes from the k most likely tokens (a top-k is ~20x
        cheaper than sorting a 49k vocabulary, the sort HF's top-p does every step), with k grown 8-fold
        while some row's top k hold less than top_p, so the result is exact."""
        V = probs.shape[-1]
        k = min(k, V)
        vals, idx = probs.topk(k, -1)  # sorted, most likely first
        while k < V and bool((vals.sum(-1) < top_p).any()):
            k = min(V, k * 8)
            vals, idx = probs.topk(k, -1)
        kept = vals.masked_fill(vals.cumsum(-1) - vals > top_p, 0.0)  # drop what lies beyond the nucleus
        cdf = kept.cumsum(-1)
        u = torch.rand(probs.shape[0], 1, device=probs.device) if u is None else u
        j = torch.searchsorted(cdf, u.to(cdf.dtype) * cdf[:, -1:], right=True).clamp(max=k - 1)
        return idx.gather(-1, j)[:, 0]

    def _batch_hf(self, prompts, max_new_tokens, temperature, top_p, min_new_tokens):
        """The reference path: Hugging Face `generate` on the engine's weights (left padding), then the
        sampled tokens' log-probs from the returned scores."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        Q = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (Q - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (Q - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sample = temperature > 0
        out = self._hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                                do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                                top_k=0 if sample else None, pad_token_id=pad, eos_token_id=self.tok.eos_token_id,
                                output_logits=True, return_dict_in_generate=True)
        gen = out.sequences[:, Q:]
        logits = torch.stack(out.logits, 1).float()  # raw logits, before temperature
        logp = torch.log_softmax(logits / (temperature if sample else 1.0), -1).gather(-1, gen[..., None])[..., 0]
        return self._trim(gen.tolist(), logp.tolist())

    def _trim(self, rows, lps):
        eos = self.tok.eos_token_id
        out_ids, out_lps = [], []
        for r, lp in zip(rows, lps):
            n = r.index(eos) + 1 if eos in r else len(r)
            out_ids.append(r[:n])
            out_lps.append(lp[:n])
        return out_ids, out_lps

    # ---- the Llama decode step -----------------------------------------------------------------
    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, head_dim) for integer positions (B, T), as Hugging Face's Llama computes them."""
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _linear(self, x, w):
        """x @ w.T, with w pre-packed for oneDNN when the engine packs (see __init__)."""
        if self._packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
        return F.linear(x, w)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def _norm(self, x, w):
        """RMSNorm in one kernel (it accumulates in fp32 for bf16 inputs); Hugging Face's Llama computes the
        same in fp32 then rounds to bf16 before the weight: in bf16 the two may differ in the last bit."""
        return F.rms_norm(x, (x.shape[-1],), w, eps=self.config.rms_norm_eps)

    def _forward(self, x, cos, sin, kc, vc, start: int, mask):
        """One pass of the transformer over new tokens x (B, T, H) at cache columns [start, start + T);
        kc, vc: (layers, B, kv_heads, T_max, head_dim) static caches, written in place; mask (B, 1, T, start + T),
        True where a query may attend. Returns the last hidden state after the final norm (B, T, H)."""
        B, T, _ = x.shape
        Hq, Hkv, D = self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim
        cos, sin = cos[:, None], sin[:, None]
        for i, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            h = self._norm(x, ln1)
            qk, v = self._linear(h, wqkv).split([(Hq + Hkv) * D, Hkv * D], -1)
            qk = self._rotate(qk.view(B, T, Hq + Hkv, D).transpose(1, 2), cos, sin)  # q and k heads rotated at once
            q = qk[:, :Hq]
            kc[i, :, :, start : start + T] = qk[:, Hq:]
            vc[i, :, :, start : start + T] = v.view(B, T, Hkv, D).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, kc[i, :, :, : start + T], vc[i, :, :, : start + T], attn_mask=mask,
                                               enable_gqa=Hq != Hkv)
            x = x + self._linear(a.transpose(1, 2).reshape(B, T, Hq * D), wo)
            g, u = self._linear(self._norm(x, ln2), wgu).chunk(2, -1)
            x = x + self._linear(F.silu(g) * u, wd)
        return self._norm(x, self.norm)

    def _batch_fast(self, prompts, max_new_tokens, temperature, top_p, min_new_tokens, seeds=None):
        c, dev = self.config, self.device
        seeds = torch.tensor(seeds, dtype=torch.int64) if seeds is not None else None
        B, Q = len(prompts), max(len(p) for p in prompts)
        Tmax = Q + max_new_tokens
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        eos = self.tok.eos_token_id
        ids = torch.tensor([[pad] * (Q - len(p)) + p for p in prompts], device=dev)
        valid = torch.zeros(B, Tmax, dtype=torch.bool, device=dev)  # key columns a row may attend to
        for b, p in enumerate(prompts):
            valid[b, Q - len(p) :] = True
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        kc = torch.empty(c.num_hidden_layers, B, c.num_key_value_heads, Tmax, self.head_dim, dtype=self.dtype, device=dev)
        vc = torch.empty_like(kc)
        # prefill: causal within each prompt, no attention to left padding (a padding query sees itself, so
        # no softmax row is empty)
        pos = (valid[:, :Q].long().cumsum(1) - 1).clamp(min=0)
        causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=dev))
        mask = (causal[None] & valid[:, None, :Q]) | torch.eye(Q, dtype=torch.bool, device=dev)[None]
        cos, sin = self._rope(pos)
        h = self._forward(F.embedding(ids, self.embed), cos, sin, kc, vc, 0, mask[:, None])
        logits = self._linear(h[:, -1], self.lm_head).float()

        rows = torch.arange(B, device=dev)  # which original row each active batch row is
        out_ids = [[] for _ in range(B)]
        out_lps = [[] for _ in range(B)]
        fin = torch.zeros(B, dtype=torch.bool, device=dev)  # active rows that have emitted EOS
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                logits[:, eos] = -float("inf")
            u = counter_uniform(seeds[rows.cpu()], t)[:, None].to(dev) if seeds is not None and temperature > 0 else None
            nxt, lp = self._sample(logits, temperature, top_p, u)
            for r, tok_, l in zip(rows.tolist(), nxt.tolist(), lp.tolist()):
                out_ids[r].append(tok_)
                out_lps[r].append(l)
            fin |= nxt == eos
            if t == max_new_tokens - 1 or fin.all():
                break
            if fin.sum() * 4 >= len(rows):  # drop finished rows (and their cache) once they are a quarter of the batch
                keep = (~fin).nonzero()[:, 0]
                rows, nxt, valid, plen, fin = rows[keep], nxt[keep], valid[keep], plen[keep], fin[keep]
                kc, vc = kc[:, keep], vc[:, keep]
            # rows finished but not yet dropped keep decoding; what they add after EOS is cut by _trim
            col = Q + t
            cos, sin = self._rope((plen + t)[:, None])
            h = self._forward(F.embedding(nxt[:, None], self.embed), cos, sin, kc, vc, col, valid[:, None, None, : col + 1])
            logits = self._linear(h[:, -1], self.lm_head).float()
        return self._trim(out_ids, out_lps)
