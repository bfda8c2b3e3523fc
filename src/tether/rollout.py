"""Sampling from a policy: batched generation with KV cache (Hugging Face `generate`, left padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tether.data import render


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
