"""Sampling from a policy: batched generation with KV cache (Hugging Face `generate`, left padding)."""

from __future__ import annotations

import torch

from tether.data import render


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 8) -> list[str]:
    """Complete each chat prompt (a message list); greedy when temperature == 0. Returns the texts
    of the responses, without the prompt and without the closing EOS."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right, so pad on the left
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render(tok, p, add_generation_prompt=True) for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sample = temperature > 0
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            for row in ids[:, enc["input_ids"].shape[1]:]:
                out.append(tok.decode(row, skip_special_tokens=True).strip())
    finally:
        tok.padding_side = side
        model.train(was_training)
    return out
