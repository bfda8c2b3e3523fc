"""Language-modelling losses: per-token log-probabilities and the masked SFT objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(x_t | x_<t) for t = 1..T-1.

    logits: (B, T, V) from a causal LM over input_ids (B, T). Returns (B, T-1): entry t-1 is the
    log-probability of token t given the tokens before it. Computed in fp32 via cross-entropy, which
    avoids materialising a full log-softmax copy of the logits.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)


def sft_loss(logps: torch.Tensor, loss_mask: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Masked negative log-likelihood (Radford et al. 2018; loss on completion tokens only as in
    Ouyang et al. 2022, InstructGPT):

        L = - sum_t m_t * log pi(x_t | x_<t) / N

    logps: (B, T-1) from `token_logprobs`; loss_mask: (B, T) with 1 on target tokens (shifted here to
    align with logps). N is the number of target tokens in the whole optimizer step, not in this
    micro-batch, so that gradient accumulation gives exactly the gradient of one big batch.
    """
    m = loss_mask[:, 1:].to(logps.dtype)
    return -(logps * m).sum() / num_tokens
