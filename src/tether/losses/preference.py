"""Preference losses on rewards: pure functions of tensors (no models, no state).

Notation: r_c, r_r are scalar rewards of the chosen and rejected response of each pair (shape (P,)),
Delta = r_c - r_r, sigma is the logistic function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    p_chosen: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry negative log-likelihood (Bradley & Terry 1952; Christiano et al. 2017;
    Ouyang et al. 2022), with the usual extensions:

        Delta' = r_c - r_r - m                                  (margin m: Touvron et al. 2023, Llama 2)
        p'     = (1 - eps) * p + eps * (1 - p)                  (label smoothing eps for noisy labels)
        L      = - p' * log sigma(Delta') - (1 - p') * log sigma(-Delta')

    p is the probability that `chosen` is preferred: 1 for hard labels, the annotators' vote share
    (or an AI labeller's probability) for soft labels. With p = 1, eps = 0 and m = 0 this is
    -log sigma(r_c - r_r). Returns a (P,) tensor; average it yourself.
    """
    delta = r_chosen - r_rejected
    if margin is not None:
        delta = delta - margin
    p = torch.ones_like(delta) if p_chosen is None else p_chosen.to(delta.dtype)
    if label_smoothing:
        p = (1 - label_smoothing) * p + label_smoothing * (1 - p)
    # logsigmoid is the stable form of log(sigma(x)) for large |x|
    return -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta))


def reward_centering_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, coef: float) -> torch.Tensor:
    """Auxiliary term that pins the reward scale's free offset near zero
    (Eisenstein et al. 2023, "Helping or Herding?"):

        L_center = coef * mean((r_c + r_r)^2)

    Bradley-Terry only sees differences, so without it rewards can drift by any constant, which
    hurts a PPO value function initialised from the reward model.
    """
    return coef * ((r_chosen + r_rejected) ** 2).mean()


def pairwise_from_groups(rewards: torch.Tensor, chosen_idx: torch.Tensor, rejected_idx: torch.Tensor):
    """The InstructGPT trick (Ouyang et al. 2022, sec. 3.5): score each of the K responses of a prompt
    once, then read all of its labelled pairs out of that one vector of rewards:

        r_c[j] = rewards[chosen_idx[j]],  r_r[j] = rewards[rejected_idx[j]]

    K forward passes instead of 2 * C(K, 2), and every pair of a prompt sits in the same batch.
    """
    return rewards[chosen_idx], rewards[rejected_idx]
