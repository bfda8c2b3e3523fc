"""The RL pieces against hand-computed values (the PPO trainer itself is a later issue)."""

import math

import pytest
import torch

from tether.losses import rl
from tether.rollout import response_lengths


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_estimators():
    logp, ref = t([-1.0]), t([-2.0])  # log r = ref - logp = -1
    assert rl.kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert rl.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert rl.kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    assert rl.kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        rl.kl_estimate(logp, ref, "k4")


def test_score_lands_on_last_real_token_with_pad_equal_eos():
    EOS = 2
    ids = torch.tensor([[5, 6, EOS, EOS, EOS],    # finished: EOS at 2, then padding that is also EOS
                        [5, 6, 7, 8, 9]])         # truncated: never emitted EOS
    lengths = response_lengths(ids, EOS)
    assert lengths.tolist() == [3, 5]
    kl = t([0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.1, 0.1, 0.1, 0.1])
    r = rl.kl_penalised_rewards(torch.tensor([1.0, 2.0], dtype=torch.float64), kl, beta=0.5, lengths=lengths)
    assert torch.allclose(r[0], t([-0.05, -0.1, -0.15 + 1.0, 0.0, 0.0])[0])   # on the EOS, nothing on padding
    assert torch.allclose(r[1], t([-0.05, -0.05, -0.05, -0.05, -0.05 + 2.0])[0])  # on the last token


def test_gae_by_hand_with_mask():
    rewards = t([0.1, 0.0, 1.0], [0.1, 1.0, 7.0])
    values = t([0.2, 0.4, 0.6], [0.2, 0.4, 9.0])  # row 2 has length 2: its third value is padding garbage
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 0.4
    a1 = (0.9 * 0.6 - 0.4) + 0.72 * a2
    a0 = (0.1 + 0.9 * 0.4 - 0.2) + 0.72 * a1
    assert torch.allclose(adv[0], t([a0, a1, a2])[0])
    b1 = 1.0 - 0.4
    b0 = (0.1 + 0.9 * 0.4 - 0.2) + 0.72 * b1
    assert torch.allclose(adv[1], t([b0, b1, 0.0])[0])
    assert torch.allclose(ret, (adv + values) * mask)
    # gamma = lam = 1: every advantage is the final reward minus the value
    adv1, _ = rl.gae(t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), t([1, 1, 1]), 1.0, 1.0)
    assert torch.allclose(adv1, t([0.5, 0.5, 0.5]))


def test_whitening_ignores_padding():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert torch.allclose(rl.masked_whiten(x, mask), t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(rl.masked_whiten(x, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]), atol=1e-6)


def test_clipped_policy_loss_and_dual_clip():
    old = t([0.0])
    logp = old + math.log(1.5)  # ratio 1.5, outside the 0.2 clip range
    mask = t([1])
    loss, s = rl.ppo_policy_loss(logp, old, t([1.0]), mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and s["clipfrac"] == 1.0 and s["ratio_mean"] == pytest.approx(1.5)
    loss, s = rl.ppo_policy_loss(logp, old, t([-1.0]), mask, clip=0.2)
    assert loss.item() == pytest.approx(1.5) and s["clipfrac"] == 0.0
    loss, _ = rl.ppo_policy_loss(logp, old, t([-1.0]), mask, clip=0.2, dual_clip=1.3)
    assert loss.item() == pytest.approx(1.3)
    # ratio exactly 1: loss is -mean(A), approx KL 0
    loss, s = rl.ppo_policy_loss(old, old, t([2.0]), mask)
    assert loss.item() == pytest.approx(-2.0) and s["approxkl"] == 0.0


def test_clipped_value_loss():
    loss, clipfrac = rl.ppo_value_loss(t([1.0]), t([0.0]), t([1.0]), t([1]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64) and clipfrac == 1.0
    loss, clipfrac = rl.ppo_value_loss(t([0.1]), t([0.0]), t([1.0]), t([1]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81) and clipfrac == 0.0


def test_grpo_and_rloo_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    assert torch.allclose(rl.grpo_advantages(scores, 3), torch.tensor([-1, 0, 1, 0, 0, 0], dtype=torch.float64) / (1 + 1e-4))
    assert torch.allclose(rl.grpo_advantages(scores, 3, scale_std=False), torch.tensor([-1.0, 0, 1, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(rl.rloo_advantages(scores[:3], 3), torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64))


def test_adaptive_kl_controller():
    assert rl.adaptive_kl_beta(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 0.0256))
    assert rl.adaptive_kl_beta(0.1, kl=6.6, target=6.0, horizon=10000, n_steps=256) == pytest.approx(0.1 * (1 + 0.1 * 0.0256))
    assert rl.adaptive_kl_beta(0.1, kl=0.0, target=6.0, horizon=10000, n_steps=256) < 0.1


def test_entropy():
    assert rl.entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert rl.entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_approxkl_estimates_kl_old_new_from_old_samples():
    """PPO's approx KL: tokens sampled from pi_old, ratio = pi/pi_old; Schulman's k3 (ratio - 1) - log ratio
    averages to the exact KL(old || new) of the two categorical distributions."""
    old, new = torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64), torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    x = torch.multinomial(old, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))[None, :]
    mask = torch.ones_like(x, dtype=torch.float64)
    adv = torch.zeros_like(mask)
    _, stats = rl.ppo_policy_loss(new.log()[x], old.log()[x], adv, mask)
    exact = (old * (old / new).log()).sum().item()  # KL(old || new) = 0.577
    assert stats["approxkl"] == pytest.approx(exact, rel=0.01)
    # the former expm1(-log_ratio) + log_ratio averages to sum(old^2 / new) - 1 - KL(old || new) = 0.638 here
    wrong = ((old**2 / new).sum() - 1).item() - exact
    assert abs(wrong - exact) > 0.05 * exact


def test_kl_loss_gradients_of_each_estimator():
    """The expected gradient of each estimator used as a loss (samples held fixed, weighted by pi):
    k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi), k1 -> 0 (and refused)."""
    logits = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.0], dtype=torch.float64), 0)
    tokens = torch.arange(4)[None, :]  # every outcome once; weights pi(x) make the sum an exact expectation

    def expected_grad(kind):
        logp = torch.log_softmax(logits, 0)
        weights = logp.exp().detach()
        per_token = rl.kl_estimate(logp[tokens], ref[tokens], kind)
        (g,) = torch.autograd.grad((weights * per_token[0]).sum(), logits)
        return g

    def grad_of(f):
        (g,) = torch.autograd.grad(f(torch.log_softmax(logits, 0)), logits)
        return g

    reverse = grad_of(lambda lp: (lp.exp() * (lp - ref)).sum())         # KL(pi || ref)
    forward = grad_of(lambda lp: (ref.exp() * (ref - lp)).sum())        # KL(ref || pi)
    assert torch.allclose(expected_grad("k2"), reverse, atol=1e-12)
    assert torch.allclose(expected_grad("k3"), forward, atol=1e-12)
    assert torch.allclose(expected_grad("k1"), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(reverse, forward, atol=1e-3)
    with pytest.raises(ValueError, match="zero expected gradient"):
        rl.kl_loss(ref[tokens], ref[tokens], "k1")
    assert torch.allclose(rl.kl_loss(ref[tokens], ref[tokens] - 1, "k2"), torch.full((1, 4), 0.5, dtype=torch.float64))


def test_token_and_constant_loss_normalisation():
    """token: mean over the real tokens; constant (Dr. GRPO): sum over (sequences * generation budget)."""
    x = t([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0], [1, 1, 0, 0])
    assert rl.aggregate(x, mask, "token").item() == pytest.approx((1 + 2 + 3 + 10 + 20) / 5)
    assert rl.aggregate(x, mask, "constant", budget=8).item() == pytest.approx((1 + 2 + 3 + 10 + 20) / (2 * 8))
    with pytest.raises(ValueError, match="budget"):
        rl.aggregate(x, mask, "constant")
    # the policy loss goes through the same reduction: with ratio 1 and advantages A, the loss is -A aggregated
    adv = t([1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0])
    logp = torch.zeros_like(adv)
    loss, _ = rl.ppo_policy_loss(logp, logp, adv, mask, norm="constant", budget=4)
    assert loss.item() == pytest.approx((-1 * 3 + 2 * 2) / (2 * 4))
    loss, _ = rl.ppo_policy_loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx((-1 * 3 + 2 * 2) / 5)
