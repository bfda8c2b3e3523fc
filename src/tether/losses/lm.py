"""Language-modelling losses: per-token log-probabilities and the masked SFT objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.losses.rl import entropy_from_logits


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


def head_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, softcap: float | None = None,
                  temperature: float = 1.0, chunk: int = 2048, entropy: bool | str = False):
    """log pi(target_n | h_n) for N selected positions: hidden (N, H) -> (N,) in fp32.

    The LM head runs only on the positions that are scored (a prompt's logits are never needed, and with
    a 49k vocabulary the head is a fifth of a 135M model's compute), `chunk` rows at a time, and each
    chunk's logits are reduced to one log-prob per row by cross-entropy right away, so no (rows x
    vocabulary) fp32 tensor larger than one chunk exists at once outside autograd's saved state.

    entropy: also return each position's entropy H = logsumexp(z) - sum softmax(z) z (N,): True computes it
    without gradient (a logged statistic: no second vocabulary-sized tensor saved for backward), "grad"
    with gradient (an entropy bonus in the loss). Returns (logp, entropy) then.
    """
    out, ents = [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i : i + chunk]).float()
        if softcap:  # Gemma 2 caps its logits; the head alone would not
            logits = torch.tanh(logits / softcap) * softcap
        if temperature != 1.0:
            logits = logits / temperature
        out.append(-F.cross_entropy(logits, targets[i : i + chunk], reduction="none"))
        if entropy:
            with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
                ents.append(entropy_from_logits(logits if entropy == "grad" else logits.detach()))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(out) if out else empty
    return (logp, torch.cat(ents) if ents else empty) if entropy else logp
