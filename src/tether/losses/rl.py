"""RL pieces for RLHF: KL estimators, per-token rewards, GAE, whitening, PPO losses, GRPO and RLOO
advantages, the adaptive KL controller, reward-model ensembles. Pure functions on tensors.

Shapes: per-token tensors are (B, T) over response tokens; `mask` is 1 on real response tokens
(EOS included) and 0 on padding. Masks are built from lengths by the caller, never from a pad id.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask); `total` replaces sum(mask) (the count over a larger batch, e.g. every
    data-parallel rank's minibatch, of which this one is a share)."""
    mask = mask.to(x.dtype)
    if total is not None:
        return (x * mask).sum() / max(float(total), 1.0)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, all_sum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of x over the masked entries; with `all_sum` over every rank's entries."""
    S = all_sum or (lambda t: t)
    mask = mask.to(x.dtype)
    n = S(mask.sum())
    mean = S((x * mask).sum()) / n.clamp(min=1)
    return mean, S((((x - mean) ** 2) * mask).sum()) / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, all_sum=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries only (unbiased variance), as in Ziegler et al. (2019)
    and Huang et al. (2024, "The N+ implementation details of RLHF with PPO"). With
    shift_mean=False the mean is added back: rewards keep their sign, only their scale changes.
    Padding is returned as 0. `all_sum` (tether.distributed.World.all_sum) makes mean and variance
    those of the global batch, every rank's share of it (two passes: sum and count, then squares)."""
    mean, var = masked_moments(x, mask, all_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating
    KL divergence"), with log r = log pi_ref(x) - log pi(x):

        k1 = -log r                   unbiased, high variance, can be negative per token
        k2 = (log r)^2 / 2            biased, low variance, always >= 0
        k3 = (r - 1) - log r          unbiased, low variance, always >= 0
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL penalty used as a LOSS term (GRPO, Shao et al. 2024; PPO with kl_in_reward off),
    differentiated through log pi with the sampled tokens held fixed. With y ~ pi and
    r = pi_ref(y) / pi(y), the expected gradients of the three estimators differ (d/dtheta of the
    per-token estimator, then E_pi; sum_y pi grad log pi = 0 is used throughout):

        k2 = (log r)^2 / 2      grad = (log pi - log pi_ref) grad log pi  ->  E = grad KL(pi || ref)
        k3 = (r - 1) - log r    grad = (1 - r) grad log pi                ->  E = grad KL(ref || pi)
        k1 = -log r             grad = grad log pi                        ->  E = 0

    So k2 is the one whose gradient is that of the reverse KL that RLHF's objective penalises; k3
    (GRPO's choice) pulls towards the reference through the forward KL, which agrees to second order
    near pi = pi_ref; k1 as a loss only adds noise, so it is refused (use it in the reward instead,
    where its *value* is what matters). These are per-token gradients at the visited prefixes: a
    partial gradient of the sequence-level KL (Tang & Munos 2025, "On a few pitfalls in KL divergence
    gradient estimation for RL").
    """
    if kind == "k1":
        raise ValueError("the k1 KL estimator has zero expected gradient as a loss term; use k2 or k3 as a loss, "
                         "or k1 in the reward (kl_in_reward)")
    return kl_estimate(logp, ref_logp, kind)


def aggregate(x: torch.Tensor, mask: torch.Tensor, norm: str = "token", budget: int | None = None, total=None) -> torch.Tensor:
    """Per-token losses (B, T) -> one scalar.

        token     sum(x * mask) / sum(mask)      every real token of the minibatch weighs the same
        constant  sum(x * mask) / (B * budget)   Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
                                                 Training"): a constant normaliser, the generation budget,
                                                 so a sequence's weight does not depend on its own length
                                                 or on the lengths of the others in its minibatch

    `total`: the minibatch is a share of a larger one (data parallelism) and the normaliser is that
    one's: its real tokens (token) or its sequences (constant); the shares' losses then sum to its loss.
    """
    if norm == "token":
        return masked_mean(x, mask, total=total)
    if norm == "constant":
        if not budget or budget <= 0:
            raise ValueError("loss_norm 'constant' needs the generation budget (max_new_tokens > 0)")
        return (x * mask.to(x.dtype)).sum() / ((x.shape[0] if total is None else float(total)) * budget)
    raise ValueError(f"unknown loss normalisation {norm!r} (token, constant)")


def kl_penalised_rewards(score: torch.Tensor, kl: torch.Tensor, beta: float, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token rewards of RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022):

        r_t = -beta * KL_t,   plus score(x, y) on the last real response token t = len(y) - 1

    score: (B,); kl: (B, T); lengths: (B,) response lengths (EOS included). The score lands on the
    last real token, never on padding (which is 0 in the result).
    """
    T = kl.shape[1]
    mask = (torch.arange(T, device=kl.device)[None, :] < lengths[:, None]).to(kl.dtype)
    rewards = -beta * kl * mask
    rewards[torch.arange(len(score), device=kl.device), lengths - 1] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016):

        delta_t = r_t + gamma * V_{t+1} - V_t        (V_{t+1} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                          (the value target)

    Returns (advantages, returns), zero on padding.
    """
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, dual_clip: float | None = None, norm: str = "token", budget: int | None = None,
                    total=None, weights: torch.Tensor | None = None):
    """Clipped surrogate objective (Schulman et al. 2017), with optional dual clip (Ye et al. 2020):

        ratio = exp(logp - old_logp)
        L     = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
        dual  : for A < 0, L = min(L, -A * c)   (c > 1 caps the loss of a runaway ratio)

    `weights` (B, T), no gradient: per-token importance weights applied to L (truncated importance
    sampling for a rollout engine other than the trainer, `truncated_importance_weights`).
    The per-token losses are reduced by `aggregate(norm, budget, total)`. Returns (loss, stats) with stats
    (means over this minibatch's real tokens):
    clipfrac, approxkl and ratio mean. approxkl estimates KL(pi_old || pi) from the rollout's tokens,
    which were sampled from pi_old: with ratio = pi / pi_old, Schulman's (2020) k3 is
    (ratio - 1) - log ratio, unbiased and >= 0 per token.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = torch.max(pg1, pg2)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.min(loss, -adv * dual_clip), loss)
    if weights is not None:
        loss = loss * weights
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
            "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return aggregate(loss, mask, norm, budget, total), stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2, total=None):
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al. 2019):

        V_clip = old_V + clip(V - old_V, -eps, eps)
        L      = 1/2 * max((V - R)^2, (V_clip - R)^2)

    Returns (loss, clipfrac); `total`: the token count the mean divides by (as in `masked_mean`).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask, total=total)
    return loss, masked_mean((l2 > l1).float(), mask).item()


def grpo_advantages(scores: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath), G samples per prompt
    laid out consecutively:

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    scale_std=False drops the std division, which biases GRPO towards prompts whose rewards barely
    vary (too easy or too hard); Dr. GRPO (Liu et al. 2025) does that *and* sums the token losses
    over a constant budget instead of averaging them (`aggregate(norm="constant")`). Returns (B,),
    one advantage per sequence.
    """
    g = scores.view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024), k samples per prompt:

        A_i = r_i - 1/(k-1) * sum_{j != i} r_j
    """
    g = scores.view(-1, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


ENSEMBLE_MODES = ("mean", "uwo", "wco")


def ensemble_std(scores: torch.Tensor) -> torch.Tensor:
    """The members' disagreement on each sample: the population std over members (dim 0) of (K, B)
    scores, sqrt(1/K sum_k (r_k - mean_k' r_k')^2); 0 for a single member. Returns (B,)."""
    return scores.std(dim=0, correction=0)


def ensemble_reward(scores: torch.Tensor, mode: str = "mean", lam: float = 1.0) -> torch.Tensor:
    """One reward per sample from K reward models' scores (K, B) (Coste et al. 2023, "Reward Model
    Ensembles Help Mitigate Overoptimization"), each member's score already normalised by its own
    statistics so the members share units:

        mean  r = 1/K sum_k r_k
        uwo   r = mean - lam * std_k(r_k)      uncertainty-weighted optimisation (population std over members)
        wco   r = min_k r_k                    worst-case optimisation

    Coste et al. penalise the variance, mean - lam * Var_k(r_k); tether subtracts the std, which keeps
    the penalty in the reward's own units (so lam is a number of standard deviations, independent of
    the reward's scale). With K = 1 every mode is the member's score (std 0, min = the score). Returns (B,).
    """
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"ensemble_reward expects scores of shape (members, samples), got {tuple(scores.shape)}")
    if mode == "mean":
        return scores.mean(0)
    if mode == "uwo":
        return scores.mean(0) - lam * ensemble_std(scores)
    if mode == "wco":
        return scores.min(0).values
    raise ValueError(f"unknown ensemble mode {mode!r} ({', '.join(ENSEMBLE_MODES)})")


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2): a proportional controller on the KL.

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    n_steps is the number of samples (or steps) the KL was measured over.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy H = logsumexp(z) - sum softmax(z) * z, computed stably in fp32."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def truncated_importance_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                                 cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling for a rollout engine whose numerics differ from the trainer's
    (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; vLLM
    samples in its own kernels and precision, so pi_engine != pi_old even at the same weights):

        w_t = min(pi_old(y_t) / pi_engine(y_t), C) = min(exp(logp_old - logp_engine), C)

    The per-token policy loss is multiplied by w_t (no gradient through it), which corrects the
    expectation from the engine's distribution to the trainer's; the cap C bounds the variance (IMPALA's
    V-trace truncation, Espeholt et al. 2018). Returns w (B, T), 0 on padding.
    """
    with torch.no_grad():
        return torch.exp(trainer_logp - engine_logp).clamp(max=cap) * mask.to(trainer_logp.dtype)


def minibatch_partition(n_rows: int, minibatch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of each minibatch of one epoch: rows of the same residue class modulo minibatch_size
    go to different minibatches, in a random order per class, so minibatch j holds one row of every class.

    A shuffle of this shape does not depend on how the rows are split over data-parallel ranks: when
    rank r owns the rows of the prompt groups g with g = r (mod W) and W * group_size divides
    minibatch_size, every class lies on one rank and every minibatch takes minibatch_size / W rows from
    each rank, so W processes run the same minibatches as one (each its own share) and the result does
    not depend on W. With n_rows not a multiple of minibatch_size the last minibatch holds the rest.
    """
    m = -(-n_rows // minibatch_size)  # minibatches
    slot = torch.empty(n_rows, dtype=torch.long)
    for c in range(min(minibatch_size, n_rows)):
        rows = torch.arange(c, n_rows, minibatch_size)
        slot[rows] = torch.randperm(m, generator=generator)[: len(rows)]
    if n_rows % minibatch_size:  # keep the minibatch sizes of a plain shuffle: full ones, then the rest
        order = torch.argsort(slot * n_rows + torch.arange(n_rows), stable=True)
        return [order[i : i + minibatch_size] for i in range(0, n_rows, minibatch_size)]
    return [torch.nonzero(slot == j)[:, 0] for j in range(m)]
