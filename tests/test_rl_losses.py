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
