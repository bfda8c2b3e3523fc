"""Preference losses: pure functions of tensors (no models, no state). First the reward-model
losses on scalar rewards, then the direct methods (DPO family, SimPO, KTO, ORPO) on log-probabilities.

Notation: r_c, r_r are scalar rewards of the chosen and rejected response of each pair (shape (P,)),
Delta = r_c - r_r, sigma is the logistic function.
"""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------------------------------------------
# Direct preference optimisation: losses on log-probabilities, no reward model.
#
# Inputs are (B,) tensors of log-probabilities SUMMED over each completion's tokens (pi_* for the
# policy, ref_* for the frozen reference) and (B,) token counts. With the log-ratios
#     l_c = pi_c - ref_c,   l_r = pi_r - ref_r,   h = l_c - l_r,
# the implicit rewards are beta * l (Rafailov et al. 2023). Each loss returns per-example losses
# (not averaged) and the rewards; the caller averages and detaches for logging.
# ---------------------------------------------------------------------------------------------------

# ipo is Azar et al.'s sequence-level loss; ipo_avg the per-token (length-averaged) variant TRL ships as "ipo"
DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_avg")


def average_logps(sum_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability logp(y) / |y|. Lengths below 1 count as 1, so an empty completion
    (sum 0) averages to 0 instead of nan."""
    return sum_logps / lengths.to(sum_logps.dtype).clamp(min=1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    p_chosen: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
):
    """DPO and its variants on the log-ratio margin h = l_c - l_r (eps = label_smoothing):

        sigmoid  -log sigma(beta h)                    (Rafailov et al. 2023, "Direct Preference Optimization")
                 soft label p = P(chosen preferred):  -p log sigma(beta h) - (1 - p) log sigma(-beta h)
        cdpo     (1 - eps) (-log sigma(beta h)) + eps (-log sigma(-beta h))
                                                       (Mitchell 2023, "A note on DPO with noisy preferences")
        robust   [(1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))] / (1 - 2 eps)
                                                       (Chowdhury et al. 2024, "Provably robust DPO"), eps < 0.5
        hinge    max(0, 1 - beta h)                    (Zhao et al. 2023, SLiC-HF)
        ipo      (h - 1 / (2 beta))^2,  h on SUMMED log-probs: the paper's sequence-level IPO
                                                       (Azar et al. 2023, "A General Theoretical Paradigm to
                                                       Understand Learning from Human Preferences", the empirical
                                                       IPO loss); target 1 / (2 beta) nats per response
        ipo_avg  (h_avg - 1 / (2 beta))^2,  h_avg = l_c / |y_c| - l_r / |y_r|: a later length-averaged
                                                       variant, not in the paper (TRL's loss_type="ipo" divides
                                                       the log-probs by the completion's token count); target
                                                       1 / (2 beta) nats per token

    Label smoothing on `sigmoid` moves the target to p' = (1 - eps) p + eps (1 - p), which for hard
    labels (p = 1) is exactly cdpo; `cdpo` is the same code under the name people ask for, and both
    take soft labels. `robust`, `hinge`, `ipo` and `ipo_avg` have no soft-label form, so p_chosen is
    an error there. Rewards are beta * l_c and beta * l_r (ipo too); for ipo_avg, beta times the
    length-averaged log-ratios l / |y|. Only ipo_avg (and no other type) needs the lengths.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if p_chosen is not None and loss_type not in ("sigmoid", "cdpo"):
        raise ValueError(f"p_chosen (soft labels) needs loss_type 'sigmoid' or 'cdpo', not {loss_type!r}")
    if label_smoothing and loss_type in ("hinge", "ipo", "ipo_avg"):
        raise ValueError(f"label_smoothing has no meaning for loss_type {loss_type!r}")
    l_c = policy_chosen_logps - ref_chosen_logps
    l_r = policy_rejected_logps - ref_rejected_logps

    if loss_type in ("ipo", "ipo_avg"):
        if loss_type == "ipo_avg":
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("loss_type 'ipo_avg' needs chosen_lengths and rejected_lengths (it length-averages the log-ratios)")
            l_c, l_r = average_logps(l_c, chosen_lengths), average_logps(l_r, rejected_lengths)
        # IPO regresses the margin onto a finite target, so (unlike DPO) it stops pushing once the
        # margin is 1 / (2 beta) even for deterministic preferences
        return (l_c - l_r - 1 / (2 * beta)) ** 2, beta * l_c, beta * l_r

    chosen_rewards, rejected_rewards = beta * l_c, beta * l_r
    margin = chosen_rewards - rejected_rewards  # beta * h
    if loss_type in ("sigmoid", "cdpo"):
        losses = bradley_terry_loss(chosen_rewards, rejected_rewards, p_chosen=p_chosen, label_smoothing=label_smoothing)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5 (the flip rate), got {label_smoothing}")
        eps = label_smoothing
        # unbiased under labels flipped with prob. eps: its expectation over flips is -log sigma(beta h)
        losses = ((1 - eps) * -F.logsigmoid(margin) - eps * -F.logsigmoid(-margin)) / (1 - 2 * eps)
    else:  # hinge
        losses = torch.relu(1 - margin)
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
):
    """SimPO (Meng, Xia, Chen 2024, "Simple Preference Optimization with a Reference-Free Reward"):

        r(y) = beta * logp(y) / |y|
        L    = -log sigma(r_c - r_r - gamma)            (eps > 0: smoothed as in cDPO)

    No reference model: the reward is the policy's own per-token log-likelihood, so it matches what
    generation optimises and does not grow with length; gamma is a target reward margin.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    chosen_rewards = beta * average_logps(policy_chosen_logps, chosen_lengths)
    rejected_rewards = beta * average_logps(policy_rejected_logps, rejected_lengths)
    losses = bradley_terry_loss(chosen_rewards, rejected_rewards, margin=gamma, label_smoothing=label_smoothing)
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    z0: torch.Tensor | None = None,
):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") on
    unpaired examples, each labelled desirable or not:

        r  = logpi(y|x) - logref(y|x)
        z0 = max(0, mean over mismatched pairs (x, y') of logpi(y'|x) - logref(y'|x))   (no gradient)
        L  = w_D (1 - sigma(beta (r - z0)))   if desirable
             w_U (1 - sigma(beta (z0 - r)))   otherwise

    z0 estimates KL(pi || ref) from completions paired with other examples' prompts; it is a
    reference point, not something to optimise, hence detached (as in the paper). With no
    mismatched pairs (a batch of one) z0 is 0. `z0` given: the caller's estimate over a larger batch
    (data parallelism: the mean over every rank's mismatched pairs), used as is. Returns (losses,
    rewards, z0): rewards = beta * r, (B,), for the caller to split by `desirable`, and z0 as a 0-dim
    tensor to log.
    """
    r = policy_logps - ref_logps
    if z0 is not None:
        z0 = z0.detach()
    elif kl_policy_logps.numel() == 0:
        z0 = r.new_zeros(())
    else:
        z0 = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    losses = torch.where(
        desirable.bool(),
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return losses, beta * r, z0


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log odds(y) = log(p / (1 - p)) = a - log(1 - exp(a)) for a per-token log-probability a < 0
    (Hong, Lee, Thorne 2024, ORPO).

    log(1 - exp(a)) is computed as log(-expm1(a)) for a > -ln 2 and log1p(-exp(a)) below (Maechler
    2012, "Accurately computing log(1 - exp(-|a|))"); each branch only ever sees its own range, so
    the other cannot leak an inf or nan into the gradient. a is first clamped to <= -eps (machine
    epsilon of its dtype): p = exp(a) closer to 1 than that is not representable anyway, and a = 0
    would give log odds +inf. So log odds is at most about 16 in float32 and 36 in float64.
    """
    a = avg_logp.clamp(max=-torch.finfo(avg_logp.dtype).eps)
    ln2 = math.log(2)
    log1mexp = torch.where(
        a > -ln2,
        torch.log(-torch.expm1(a.clamp(min=-ln2))),
        torch.log1p(-torch.exp(a.clamp(max=-ln2))),
    )
    return a - log1mexp


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float = 0.1,
):
    """ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model"), with per-token log-probabilities a = logp(y) / |y|:

        L_SFT = -a_c                                       (the chosen response's per-token NLL)
        L_OR  = -log sigma(log odds(y_c) - log odds(y_r))  (see `log_odds`)
        L     = L_SFT + lam * L_OR

    No reference model: the SFT term keeps the policy on the chosen responses while the odds ratio
    pushes the rejected ones down. Rewards are lam * a (as TRL logs them); the log-odds ratio for
    logging is log_odds(a_c) - log_odds(a_r). Returns (losses, chosen_rewards, rejected_rewards).
    """
    a_c = average_logps(policy_chosen_logps, chosen_lengths)
    a_r = average_logps(policy_rejected_logps, rejected_lengths)
    l_or = -F.logsigmoid(log_odds(a_c) - log_odds(a_r))
    return -a_c + lam * l_or, lam * a_c, lam * a_r


# --------------------------------------------------------------------------------------------------
# AI feedback labels (RL-CAI)


def option_probability(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """The AI labeller's soft label from its log-probabilities of the two option tokens (Bai et al. 2022,
    "Constitutional AI", Sec. 4.1): the options renormalised, i.e. a softmax over the two,

        p(A) = exp(l_A) / (exp(l_A) + exp(l_B)) = sigma(l_A - l_B)

    Mass the model puts on any other token is ignored. Tensors of any (equal) shape; returns p(A)."""
    return torch.sigmoid(logp_a - logp_b)


def swap_average(p_first_ab: torch.Tensor, p_first_ba: torch.Tensor) -> torch.Tensor:
    """Position-debiased preference for response 1 over response 2 (Bai et al. 2022 and Zheng et al. 2023,
    "Judging LLM-as-a-Judge", on position bias): ask twice, with the responses as (A, B) = (1, 2) and
    (A, B) = (2, 1), and average the probability given to response 1 in each order:

        p(1 > 2) = ( p(A | order 1, 2) + (1 - p(A | order 2, 1)) ) / 2

    A labeller that always says A gets 0.5, whatever the pair."""
    return 0.5 * (p_first_ab + 1.0 - p_first_ba)


def clamp_cot_probability(p: torch.Tensor, low: float = 0.4, high: float = 0.6) -> torch.Tensor:
    """Chain-of-thought labels are near 0 or 1 (the model has argued itself into an answer), which makes
    them badly calibrated; Bai et al. 2022 (Sec. 4.1) clamp them into [0.4, 0.6] before training the
    preference model on them: p' = min(high, max(low, p))."""
    if not 0.0 <= low <= 0.5 <= high <= 1.0:
        raise ValueError(f"the clamp needs 0 <= low <= 0.5 <= high <= 1, got [{low}, {high}]")
    return p.clamp(low, high)
