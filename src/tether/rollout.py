"""Sampling from a policy: batched generation with KV cache (Hugging Face `generate`, left padding),
and the per-token log-probs of sampled responses that RL and evaluation need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tether.data import render
from tether.losses.rl import entropy_from_logits


@dataclass
class Sample:
    text: str        # the response, without the prompt and without the closing EOS
    finished: bool   # True if the model emitted EOS within max_new_tokens
    n_tokens: int    # response tokens, the closing EOS included


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 8, progress: str | None = None) -> list[Sample]:
    """Complete each chat prompt (a message list); greedy when temperature == 0.

    Whether a response finished is read from the first EOS in the generated tokens, never from a
    padding mask: SmolLM2 pads with its EOS token.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right, so pad on the left
    out: list[Sample] = []
    bar = tqdm(total=len(prompts), desc=progress, unit="resp", disable=progress is None, dynamic_ncols=True)
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render(tok, p, add_generation_prompt=True) for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sample = temperature > 0
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=0 if sample else None,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():
                end = row.index(tok.eos_token_id) if tok.eos_token_id in row else None
                body = row if end is None else row[:end]
                out.append(Sample(tok.decode(body, skip_special_tokens=True).strip(), end is not None,
                                  len(row) if end is None else end + 1))
            bar.update(len(texts))
    finally:
        bar.close()
        tok.padding_side = side
        model.train(was_training)
    return out


def response_lengths(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Length of each generated response, its first EOS included; a response that never emitted EOS
    (truncated at max_new_tokens) has the full width. Read from the tokens, never from a padding
    mask: with pad == EOS, everything after the first EOS is padding that looks like EOS."""
    is_eos = response_ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full_like(is_eos[:, 0], response_ids.shape[1], dtype=torch.long))
    return first.long()


@torch.no_grad()
def sample_batch(policy, tok, prompts, R, device) -> dict:
    """Sample one response per prompt entry (`tether.tasks.Prompt`) as tensors for RL: left-padded
    queries, right-padded responses, lengths (first EOS included), masks, decoded texts. `R` has
    batch_size, temperature and max_new_tokens; sampling is plain (top_p 1, no top-k), so the
    log-probs at the same temperature are exactly the sampling distribution's."""
    was_training = policy.training
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right
    policy.eval()
    q_ids, q_mask, r_ids = [], [], []
    for i in range(0, len(prompts), R.batch_size):
        texts = [render(tok, p.messages, add_generation_prompt=True) for p in prompts[i : i + R.batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = policy.generate(**enc, do_sample=True, temperature=R.temperature, top_p=1.0, top_k=0,
                              max_new_tokens=R.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        q_ids.append(enc["input_ids"])
        q_mask.append(enc["attention_mask"])
        r_ids.append(out[:, enc["input_ids"].shape[1]:])
    policy.train(was_training)
    tok.padding_side = side
    Q = max(x.shape[1] for x in q_ids)
    T = max(x.shape[1] for x in r_ids)
    pad = tok.pad_token_id
    query_ids = torch.cat([F.pad(x, (Q - x.shape[1], 0), value=pad) for x in q_ids])
    query_mask = torch.cat([F.pad(x, (Q - x.shape[1], 0), value=0) for x in q_mask])
    response_ids = torch.cat([F.pad(x, (0, T - x.shape[1]), value=pad) for x in r_ids])
    lengths = response_lengths(response_ids, tok.eos_token_id)
    finished = (response_ids == tok.eos_token_id).any(dim=1)
    mask = (torch.arange(T, device=response_ids.device)[None, :] < lengths[:, None]).float()
    texts = [tok.decode(r[: n - 1 if f else n], skip_special_tokens=True).strip()
             for r, n, f in zip(response_ids.tolist(), lengths.tolist(), finished.tolist())]
    return {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids, "lengths": lengths,
            "mask": mask, "finished": finished.cpu(), "texts": texts}


def join(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded queries + right-padded responses -> ids, attention mask, position ids. The
    response part of the mask comes from lengths (pad == EOS), positions from the mask (left padding)."""
    T = batch["response_ids"].shape[1]
    resp_mask = (torch.arange(T, device=batch["lengths"].device)[None, :] < batch["lengths"][:, None]).long()
    ids = torch.cat([batch["query_ids"], batch["response_ids"]], dim=1)
    mask = torch.cat([batch["query_mask"], resp_mask], dim=1)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def trunk(model):
    """(backbone, lm_head, config) of a causal LM, through a peft wrapper if there is one: calling the backbone
    still runs the active LoRA adapters (and `disable_adapter()` still turns them off)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings(), base.config


def policy_forward(model, batch: dict, temperature: float, with_entropy: bool = False, value_head=None):
    """Per-token log pi(y_t | x, y_<t) of the response tokens (B, T) at the sampling temperature, the
    entropy (with_entropy) and, with `value_head`, the values V(x, y_<t) read from the same forward
    (a value head on the policy's last hidden state): returns (logp, entropy or None, values or None).

    The LM head runs only on the positions that predict response tokens: the query's logits are never
    needed, and with a 49k vocabulary the head is a large share of a small model's compute."""
    ids, mask, pos = join(batch)
    Q = batch["query_ids"].shape[1]
    backbone, lm_head, config = trunk(model)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state[:, Q - 1 : -1]
    logits = lm_head(hidden).float()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 caps its logits; the head alone would not
        logits = torch.tanh(logits / cap) * cap
    logits = logits / temperature
    targets = batch["response_ids"]
    logp = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    return logp, (entropy_from_logits(logits) if with_entropy else None), values
