"""Sampling from a policy through the rollout engine (tether.engine), and the per-token log-probs of
sampled responses that RL and evaluation need (the trainer's own forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tether.data import render
from tether.engine import Engine
from tether.losses.lm import head_logprobs
from tether.models import causal_mask


@dataclass
class Sample:
    text: str        # the response, without the prompt and without the closing EOS
    finished: bool   # True if the model emitted EOS within max_new_tokens
    n_tokens: int    # response tokens, the closing EOS included


def engine_dtype(model) -> torch.dtype:
    """The dtype to sample in: the autocast dtype when the caller runs under autocast (bf16 on CPUs with
    native bf16), else the model's own."""
    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next(model.parameters()).dtype


def prompt_ids(tok, prompts: list[list[dict]]) -> list[list[int]]:
    """Chat prompts (message lists) -> token ids with the generation prompt appended. A prompt whose last
    message is the assistant's is continued: that message's content is the start of the answer
    (vLLM's `continue_final_message`), so `[..., user, {"role": "assistant", "content": "The answer is ("}]`
    ends right after the parenthesis."""
    out = []
    for p in prompts:
        prefix = ""
        if p and p[-1]["role"] == "assistant":
            p, prefix = p[:-1], p[-1]["content"]
        out.append(tok(render(tok, p, add_generation_prompt=True) + prefix, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 8, progress: str | None = None, engine: Engine | None = None,
             min_new_tokens: int = 0) -> list[Sample]:
    """Complete each chat prompt (a message list); greedy when temperature == 0. Runs on the rollout
    engine (tether.engine; its own no-grad copy of the weights in the autocast dtype), or on `engine`.

    Whether a response finished is read from the first EOS in the generated tokens, never from a
    padding mask: SmolLM2 pads with its EOS token.
    """
    engine = engine or Engine(model, tok, engine_dtype(model))
    bar = tqdm(total=len(prompts), desc=progress, unit="resp", disable=progress is None, dynamic_ncols=True)
    try:
        out = engine.generate(prompt_ids(tok, prompts), max_new_tokens, temperature, top_p, batch_size,
                              min_new_tokens=min_new_tokens, progress=bar.update)
    finally:
        bar.close()
    return [Sample(tok.decode(r[:-1] if f else r, skip_special_tokens=True).strip(), f, len(r))
            for r, f in zip(out.response_ids, out.finished)]


def response_lengths(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Length of each generated response, its first EOS included; a response that never emitted EOS
    (truncated at max_new_tokens) has the full width. Read from the tokens, never from a padding
    mask: with pad == EOS, everything after the first EOS is padding that looks like EOS."""
    is_eos = response_ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full_like(is_eos[:, 0], response_ids.shape[1], dtype=torch.long))
    return first.long()


@torch.no_grad()
def sample_batch(policy, tok, prompts, R, device, engine: Engine | None = None, seeds: list[int] | None = None) -> dict:
    """Sample one response per prompt entry (`tether.tasks.Prompt`) as tensors for RL: left-padded
    queries, right-padded responses, lengths (first EOS included), masks, decoded texts, and the
    engine's own log-probs of the sampled tokens (`engine_logp`; the trainer recomputes its own, so
    PPO's first ratio is exactly 1). `R` has batch_size, temperature and max_new_tokens; sampling is
    plain (top_p 1, no top-k), so log-probs at the same temperature are the sampling distribution's.
    `seeds`: one per prompt entry, for seeded sampling (Engine.generate)."""
    engine = engine or Engine(policy, tok, engine_dtype(policy))
    queries = prompt_ids(tok, [p.messages for p in prompts])
    out = engine.generate(queries, R.max_new_tokens, R.temperature, 1.0, R.batch_size, seeds=seeds)
    pad = tok.pad_token_id
    Q = max(len(q) for q in queries)
    T = max(len(r) for r in out.response_ids)
    query_ids = torch.tensor([[pad] * (Q - len(q)) + q for q in queries], device=device)
    query_mask = torch.tensor([[0] * (Q - len(q)) + [1] * len(q) for q in queries], device=device)
    response_ids = torch.tensor([r + [pad] * (T - len(r)) for r in out.response_ids], device=device)
    engine_logp = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in out.logprobs], device=device)
    lengths = torch.tensor([len(r) for r in out.response_ids], device=device)
    finished = torch.tensor(out.finished)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    texts = [tok.decode(r[:-1] if f else r, skip_special_tokens=True).strip() for r, f in zip(out.response_ids, out.finished)]
    return {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids, "lengths": lengths,
            "mask": mask, "finished": finished, "texts": texts, "engine_logp": engine_logp}


def join(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded queries + right-padded responses -> one right-padded row per sequence (query, then
    response): ids (B, L), the attention mask (B, L), a prefix of ones, so causal attention alone hides
    the padding and SDPA runs its maskless kernel (models.causal_mask), and `at` (B, T), the column whose
    output predicts each response token (query length - 1 + t). The response part of the mask comes from
    lengths (pad == EOS); positions are the plain column index."""
    qm = batch["query_mask"].bool()
    qlen = qm.sum(1)
    resp = batch["response_ids"]
    B, T = resp.shape
    L = int(qlen.max()) + T
    ids = torch.zeros(B, L, dtype=resp.dtype, device=resp.device)
    for i, n in enumerate(qlen.tolist()):
        ids[i, :n] = batch["query_ids"][i][qm[i]]
        ids[i, n : n + T] = resp[i]
    mask = (torch.arange(L, device=resp.device)[None, :] < (qlen + batch["lengths"].to(qlen.device))[:, None]).long()
    at = qlen[:, None] - 1 + torch.arange(T, device=resp.device)[None, :]
    return ids, mask, at


def response_states(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) read at the columns `at` (B, T) from `join`: (B, T, ...)."""
    idx = at.view(*at.shape, *([1] * (x.dim() - 2))).expand(*at.shape, *x.shape[2:])
    return x.gather(1, idx)


def trim_padding(batch: dict) -> tuple[dict, int]:
    """A rollout (sub)batch without the columns that are padding in every row: responses cut at the longest
    length, left-padded queries from their first real column (`join` drops query padding anyway; this keeps
    the minibatch's tensors small). Every real token's log-prob is unchanged. Returns (batch, T) with T the
    kept response length."""
    T = max(int(batch["lengths"].max()), 1)
    q0 = int(batch["query_mask"].any(0).long().argmax())  # first column some query uses
    out = dict(batch, query_ids=batch["query_ids"][:, q0:], query_mask=batch["query_mask"][:, q0:],
               response_ids=batch["response_ids"][:, :T])
    if "mask" in batch:
        out["mask"] = batch["mask"][:, :T]
    return out, T


def trunk(model):
    """(backbone, lm_head, config) of a causal LM, through a peft wrapper if there is one: calling the backbone
    still runs the active LoRA adapters (and `disable_adapter()` still turns them off)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings(), base.config


def scored_logprobs(model, input_ids: torch.Tensor, select: torch.Tensor, **kwargs) -> torch.Tensor:
    """log pi(x_t | x_<t) (B, T-1), like `token_logprobs(model(...).logits, input_ids)`, but the LM head runs
    only where `select` (B, T-1) is true (the trained or scored tokens; elsewhere the result is 0): the
    backbone once, then `head_logprobs` on the selected hidden states. kwargs go to the backbone
    (attention_mask, position_ids)."""
    backbone, lm_head, config = trunk(model)
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = causal_mask(kwargs["attention_mask"])  # right padding needs no mask
    hidden = backbone(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state[:, :-1]
    sel = select.bool()
    logp = head_logprobs(hidden[sel], lm_head, input_ids[:, 1:][sel], getattr(config, "final_logit_softcapping", None))
    out = torch.zeros(sel.shape, dtype=logp.dtype, device=logp.device)
    out[sel] = logp
    return out


def policy_forward(model, batch: dict, temperature: float, with_entropy: bool | str = False, value_head=None):
    """Per-token log pi(y_t | x, y_<t) of the response tokens (B, T) at the sampling temperature, the
    entropy (with_entropy: True = without gradient, a statistic; "grad" = with it, for an entropy bonus)
    and, with `value_head`, the values V(x, y_<t) read from the same forward (a value head on the policy's
    last hidden state): returns (logp, entropy or None, values or None). Beyond each response's length
    (its padding) logp and entropy are 0.

    The LM head runs only on the positions that predict a real response token: the query's logits are
    never needed, nor the padding's, and with a 49k vocabulary the head is a large share of a small
    model's compute (`head_logprobs`, chunked)."""
    ids, mask, at = join(batch)
    backbone, lm_head, config = trunk(model)
    hidden = response_states(backbone(input_ids=ids, attention_mask=causal_mask(mask), use_cache=False).last_hidden_state, at)
    T = batch["response_ids"].shape[1]
    sel = torch.arange(T, device=at.device)[None, :] < batch["lengths"].to(at.device)[:, None]  # real response tokens
    res = head_logprobs(hidden[sel], lm_head, batch["response_ids"][sel], getattr(config, "final_logit_softcapping", None),
                        temperature, entropy=with_entropy)
    logp, ent = res if with_entropy else (res, None)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    return _scatter(logp, sel), (_scatter(ent, sel) if ent is not None else None), values


def _scatter(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(sel.shape)
    out[sel] = x
    return out
