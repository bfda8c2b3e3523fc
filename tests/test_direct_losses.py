"""Direct preference losses (DPO family, SimPO, KTO, ORPO): hand-computed values with plain floats,
gradients against autograd, and the optimum each loss reaches in small tabular models."""

import itertools
import math

import pytest
import torch

from tether.losses.preference import (
    average_logps,
    dpo_loss,
    kto_loss,
    log_odds,
    orpo_loss,
    simpo_loss,
)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def sig(x):
    return 1 / (1 + math.exp(-x))


def nls(x):
    """-log sigma(x) with plain floats."""
    return math.log(1 + math.exp(-x))


# Two pairs: h = (pi_c - ref_c) - (pi_r - ref_r) = (1) - (-1) = 2 and (1) - (2) = -1.
PI_C, PI_R, REF_C, REF_R = t(-5.0, -4.0), t(-7.0, -3.0), t(-6.0, -5.0), t(-6.0, -5.0)
H = [2.0, -1.0]
L_C, L_R = [1.0, 1.0], [-1.0, 2.0]


def dpo(**kw):
    return dpo_loss(PI_C, PI_R, REF_C, REF_R, **kw)


def close(got, want, tol=1e-6):
    assert got.tolist() == pytest.approx(want, abs=tol)


# ----------------------------------------------------------------------------- DPO by hand

def test_dpo_sigmoid_by_hand_with_soft_labels_and_smoothing():
    b = 0.1
    losses, rc, rr = dpo(beta=b)
    close(losses, [nls(b * h) for h in H])
    close(rc, [b * x for x in L_C])
    close(rr, [b * x for x in L_R])
    # soft labels: -(p log sigma(bh) + (1 - p) log sigma(-bh))
    p = [0.7, 0.2]
    losses, _, _ = dpo(beta=b, p_chosen=t(*p))
    close(losses, [pi * nls(b * h) + (1 - pi) * nls(-b * h) for pi, h in zip(p, H)])
    # label smoothing eps on soft labels: target (1 - eps) p + eps (1 - p)
    eps = 0.1
    q = [(1 - eps) * pi + eps * (1 - pi) for pi in p]
    losses, _, _ = dpo(beta=b, p_chosen=t(*p), label_smoothing=eps)
    close(losses, [qi * nls(b * h) + (1 - qi) * nls(-b * h) for qi, h in zip(q, H)])
    # smoothing on hard labels is cDPO
    close(dpo(beta=b, label_smoothing=eps)[0], dpo(beta=b, loss_type="cdpo", label_smoothing=eps)[0].tolist())


def test_dpo_cdpo_robust_hinge_by_hand():
    b, eps = 0.5, 0.2
    close(dpo(beta=b, loss_type="cdpo", label_smoothing=eps)[0],
          [(1 - eps) * nls(b * h) + eps * nls(-b * h) for h in H])
    close(dpo(beta=b, loss_type="robust", label_smoothing=eps)[0],
          [((1 - eps) * nls(b * h) - eps * nls(-b * h)) / (1 - 2 * eps) for h in H])
    # hinge: relu(1 - beta h): 1 - 1 = 0 and 1 + 0.5 = 1.5; with beta 0.1: 0.8 and 1.1
    close(dpo(beta=b, loss_type="hinge")[0], [0.0, 1.5])
    close(dpo(beta=0.1, loss_type="hinge")[0], [0.8, 1.1])
    # cdpo/robust/hinge rewards are the DPO ones
    for lt in ("cdpo", "robust", "hinge"):
        close(dpo(beta=b, loss_type=lt)[1], [b * x for x in L_C])
        close(dpo(beta=b, loss_type=lt)[2], [b * x for x in L_R])


def test_ipo_by_hand_is_sequence_level():
    # Azar et al.'s IPO on summed log-ratios: (h - 1/(2 beta))^2 with h = 2 and -1
    losses, rc, rr = dpo(beta=0.5, loss_type="ipo")
    close(losses, [(2 - 1) ** 2, (-1 - 1) ** 2])          # target 1/(2 * 0.5) = 1: 1 and 4
    close(rc, [0.5, 0.5])                                  # beta * l_c, l_c = 1, 1
    close(rr, [-0.5, 1.0])                                 # beta * l_r, l_r = -1, 2
    losses, rc, rr = dpo(beta=0.1, loss_type="ipo")
    close(losses, [9.0, 36.0])                             # target 5: (2 - 5)^2, (-1 - 5)^2
    close(rc, [0.1, 0.1])
    close(rr, [-0.1, 0.2])
    # lengths, when given, change nothing: the sequence-level form never reads them
    losses, rc, rr = dpo(beta=0.1, loss_type="ipo", chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([4, 1]))
    close(losses, [9.0, 36.0])
    close(rc, [0.1, 0.1])
    close(rr, [-0.1, 0.2])


def test_ipo_avg_by_hand_is_length_averaged():
    b = 0.1
    lc_len, lr_len = [2, 4], [4, 1]
    nc = [x / n for x, n in zip(L_C, lc_len)]   # 1/2, 1/4 = 0.5, 0.25
    nr = [x / n for x, n in zip(L_R, lr_len)]   # -1/4, 2/1 = -0.25, 2
    assert nc == [0.5, 0.25] and nr == [-0.25, 2.0]
    losses, rc, rr = dpo(beta=b, loss_type="ipo_avg",
                         chosen_lengths=torch.tensor(lc_len), rejected_lengths=torch.tensor(lr_len))
    close(losses, [18.0625, 45.5625])            # (0.75 - 5)^2 = 4.25^2, (-1.75 - 5)^2 = 6.75^2
    close(losses, [(c - r - 1 / (2 * b)) ** 2 for c, r in zip(nc, nr)])
    close(rc, [0.05, 0.025])                     # beta * averaged l_c
    close(rr, [-0.025, 0.2])                     # beta * averaged l_r


def test_ipo_forms_differ_with_lengths_and_agree_when_every_length_is_1():
    lengths = dict(chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([4, 1]))
    seq, avg = dpo(beta=0.1, loss_type="ipo", **lengths), dpo(beta=0.1, loss_type="ipo_avg", **lengths)
    close(seq[0], [9.0, 36.0])
    close(avg[0], [18.0625, 45.5625])
    assert (seq[0] - avg[0]).abs().min().item() > 1   # losses and rewards both differ
    assert not torch.allclose(seq[1], avg[1]) and not torch.allclose(seq[2], avg[2])
    # equal lengths above 1 still differ: the per-token target is |y| times harder to reach in summed nats
    same = dict(chosen_lengths=torch.tensor([3, 3]), rejected_lengths=torch.tensor([3, 3]))
    close(dpo(beta=0.1, loss_type="ipo_avg", **same)[0], [(2 / 3 - 5) ** 2, (-1 / 3 - 5) ** 2])
    ones = dict(chosen_lengths=torch.ones(2, dtype=torch.long), rejected_lengths=torch.ones(2, dtype=torch.long))
    seq, avg = dpo(beta=0.1, loss_type="ipo", **ones), dpo(beta=0.1, loss_type="ipo_avg", **ones)
    for x, y in zip(seq, avg):
        assert torch.equal(x, y)
    close(avg[0], [9.0, 36.0])


def test_robust_dpo_is_unbiased_under_label_flips():
    # Labels flipped with prob. eps: E[robust loss] = (1 - eps) L(h) + eps L(-h) = clean -log sigma(beta h)
    b, eps = 0.3, 0.35
    fwd = dpo(beta=b, loss_type="robust", label_smoothing=eps)[0]
    flipped = dpo_loss(PI_R, PI_C, REF_R, REF_C, beta=b, loss_type="robust", label_smoothing=eps)[0]
    close((1 - eps) * fwd + eps * flipped, [nls(b * h) for h in H])


def test_dpo_sigmoid_gradient_is_beta_sigma_of_negative_margin():
    b = 0.1
    pi_c = PI_C.clone().requires_grad_()
    pi_r = PI_R.clone().requires_grad_()
    losses, rc, rr = dpo_loss(pi_c, pi_r, REF_C, REF_R, beta=b)
    losses.sum().backward()
    # d loss / d pi_c = -beta sigma(r_r - r_c), d loss / d pi_r = +beta sigma(r_r - r_c)
    weight = [sig(b * (lr - lc)) for lc, lr in zip(L_C, L_R)]
    close(pi_c.grad, [-b * w for w in weight])
    close(pi_r.grad, [b * w for w in weight])
    close(torch.sigmoid(rr - rc).detach(), weight)


# ----------------------------------------------------------------------------- optima in tabular models

def two_response_gap_trajectory(loss_type, beta, steps=1000, lr=1.0):
    """Policy = softmax of 2 logits, uniform reference, y1 always preferred, lengths 1; plain
    gradient descent on the exact loss. Returns pi(y1) at the end and the logit gap at every step."""
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ref = torch.log(torch.full((2,), 0.5, dtype=torch.float64))
    one = torch.ones(1)
    gaps = []
    for _ in range(steps):
        logp = torch.log_softmax(z, 0)
        loss, _, _ = dpo_loss(logp[:1], logp[1:], ref[:1], ref[1:], beta=beta, loss_type=loss_type,
                              chosen_lengths=one, rejected_lengths=one)
        grad, = torch.autograd.grad(loss.sum(), z)
        with torch.no_grad():
            z -= lr * grad
        gaps.append((z[0] - z[1]).item())
    return torch.softmax(z, 0)[0].item(), gaps


def test_ipo_reaches_its_finite_optimum_while_dpo_keeps_growing():
    # lengths 1: both IPO forms are the same loss here and stop at the logit gap 1/(2 beta)
    for loss_type, beta in itertools.product(("ipo", "ipo_avg"), (0.5, 1.0)):
        p1, gaps = two_response_gap_trajectory(loss_type, beta, lr=0.1, steps=300)
        assert p1 == pytest.approx(sig(0.5 / beta), abs=1e-6), loss_type
        assert gaps[-1] == pytest.approx(0.5 / beta, abs=1e-6), loss_type
    beta = 0.5
    _, dpo_gaps = two_response_gap_trajectory("sigmoid", beta)
    # deterministic preferences: DPO's optimum is pi(y1) = 1, so the gap never stops growing
    assert all(b > a for a, b in itertools.pairwise(dpo_gaps))
    assert dpo_gaps[-1] > 5 * (0.5 / beta)
    assert dpo_gaps[-1] - dpo_gaps[-101] > 0.01   # still moving at the end


def minimise(n, loss_fn):
    """Logits z (n,) that minimise loss_fn(log_softmax(z)), by LBFGS in float64."""
    z = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(torch.log_softmax(z, 0))
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(z, 0).detach()


def test_cdpo_margin_converges_to_log_odds_of_smoothing():
    # (1 - eps) sigma(-m) = eps sigma(m) at the minimum: m = beta h = ln((1 - eps) / eps)
    beta, zero = 0.5, torch.zeros(1, dtype=torch.float64)
    for eps in (0.1, 0.25):
        def cdpo(logp, eps=eps):
            return dpo_loss(logp[:1], logp[1:], zero, zero, beta=beta, loss_type="cdpo", label_smoothing=eps)

        logp = minimise(2, lambda lp, f=cdpo: f(lp)[0].sum())
        _, rc, rr = cdpo(logp)
        assert (rc - rr).item() == pytest.approx(math.log((1 - eps) / eps), abs=1e-6)


def test_dpo_on_bradley_terry_preferences_recovers_the_rewards():
    # 4 responses with rewards r, preferences drawn from Bradley-Terry: P(i > j) = sigma(r_i - r_j).
    # The exact expected DPO loss is minimised where beta log(pi / pi_ref) = r + const.
    r = [1.0, 0.2, -0.5, -1.3]
    beta = 0.5
    ref = torch.log(t(0.4, 0.3, 0.2, 0.1))
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    ci, ri = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    w = t(*[sig(r[i] - r[j]) for i, j in pairs])
    logp = minimise(4, lambda lp: (w * dpo_loss(lp[ci], lp[ri], ref[ci], ref[ri], beta=beta)[0]).sum())
    implicit = beta * (logp - ref)
    mean_r = sum(r) / 4
    close(implicit - implicit.mean(), [x - mean_r for x in r])
    # the same optimum from soft labels on the 6 unordered pairs
    up = [(i, j) for i, j in pairs if i < j]
    ci2, ri2 = torch.tensor([i for i, _ in up]), torch.tensor([j for _, j in up])
    logp = (implicit / beta + ref).requires_grad_()
    losses = dpo_loss(logp[ci2], logp[ri2], ref[ci2], ref[ri2], beta=beta, p_chosen=t(*[sig(r[i] - r[j]) for i, j in up]))[0]
    grad, = torch.autograd.grad(losses.sum(), logp)
    assert grad.abs().max().item() < 1e-6


# ----------------------------------------------------------------------------- KTO

# mismatched pairs with log-ratios 0.25 and 0.75: z0 = 0.5
KL_PI, KL_REF = t(-1.75, -4.25), t(-2.0, -5.0)


def test_kto_by_hand():
    b = 0.1
    # desirable with r = 2; undesirable with r = 3
    pol, ref, des = t(-8.0, -7.0), t(-10.0, -10.0), torch.tensor([True, False])
    losses, rewards, z0 = kto_loss(pol, ref, des, KL_PI, KL_REF, beta=b)
    assert z0.dim() == 0 and z0.item() == pytest.approx(0.5, abs=1e-12)
    assert losses[0].item() == pytest.approx(0.4626, abs=1e-4)
    close(losses, [1 - sig(b * (2 - 0.5)), 1 - sig(b * (0.5 - 3))])
    close(rewards, [b * 2, b * 3])
    losses, _, _ = kto_loss(pol, ref, des, KL_PI, KL_REF, beta=b, desirable_weight=1.5, undesirable_weight=0.7)
    close(losses, [1.5 * (1 - sig(0.15)), 0.7 * (1 - sig(-0.25))])


def test_kto_reference_point_is_clamped_and_detached():
    pol, ref, des = t(-8.0), t(-10.0), torch.tensor([True])
    # mismatched mean log-ratio -0.5 -> z0 = 0
    _, _, z0 = kto_loss(pol, ref, des, KL_REF, KL_PI, beta=0.1)
    assert z0.item() == 0.0
    close(kto_loss(pol, ref, des, KL_REF, KL_PI, beta=0.1)[0], [1 - sig(0.2)])
    # no gradient reaches the mismatched completions, only the example itself
    kl_pi = KL_PI.clone().requires_grad_()
    pol = pol.clone().requires_grad_()
    losses, _, z0 = kto_loss(pol, ref, des, kl_pi, KL_REF, beta=0.1)
    assert not z0.requires_grad
    losses.sum().backward()
    assert kl_pi.grad is None
    # d/dr (1 - sigma(beta (r - z0))) = -beta sigma'(0.15)
    close(pol.grad, [-0.1 * sig(0.15) * (1 - sig(0.15))])


# ----------------------------------------------------------------------------- SimPO and ORPO

def test_simpo_by_hand():
    b, g, eps = 2.0, 0.5, 0.1
    pc, pr, lc, lr = t(-6.0, -2.0), t(-10.0, -9.0), torch.tensor([3, 4]), torch.tensor([4, 3])
    rc, rr = [b * -6 / 3, b * -2 / 4], [b * -10 / 4, b * -9 / 3]   # [-4, -1], [-5, -6]
    losses, got_c, got_r = simpo_loss(pc, pr, lc, lr, beta=b, gamma=g)
    close(losses, [nls(c - r - g) for c, r in zip(rc, rr)])
    close(got_c, rc)
    close(got_r, rr)
    losses, _, _ = simpo_loss(pc, pr, lc, lr, beta=b, gamma=g, label_smoothing=eps)
    close(losses, [(1 - eps) * nls(c - r - g) + eps * nls(-(c - r - g)) for c, r in zip(rc, rr)])


def naive_log_odds(a):
    return a - math.log(1 - math.exp(a))


def test_orpo_by_hand():
    lam = 0.1
    pc, pr, lc, lr = t(-2.0, -0.3), t(-3.0, -8.0), torch.tensor([4, 3]), torch.tensor([2, 5])
    ac, ar = [-0.5, -0.1], [-1.5, -1.6]
    losses, rc, rr = orpo_loss(pc, pr, lc, lr, lam=lam)
    close(losses, [-c + lam * nls(naive_log_odds(c) - naive_log_odds(r)) for c, r in zip(ac, ar)])
    close(rc, [lam * c for c in ac])
    close(rr, [lam * r for r in ar])
    close(average_logps(pc, lc), ac)


def test_log_odds_stable_near_zero_and_matches_naive_elsewhere():
    a = [-1e-3, -0.01, -0.3, -0.69, -0.7, -1.0, -3.0, -20.0]
    close(log_odds(t(*a)), [naive_log_odds(x) for x in a], tol=1e-9)
    # close to 0 the naive 1 - exp(a) cancels; the stable value is a - log(-expm1(a))
    assert log_odds(t(-1e-8)).item() == pytest.approx(-1e-8 - math.log(-math.expm1(-1e-8)), rel=1e-12)
    for dtype in (torch.float32, torch.float64):
        for a_c, a_r in [(-1e-8, -1.0), (0.0, -1.0), (-1.0, 0.0), (0.0, 0.0), (-1e-8, -1e-8)]:
            pc = torch.tensor([a_c * 2], dtype=dtype, requires_grad=True)
            pr = torch.tensor([a_r * 3], dtype=dtype, requires_grad=True)
            losses, _, _ = orpo_loss(pc, pr, torch.tensor([2]), torch.tensor([3]))
            losses.sum().backward()
            assert torch.isfinite(losses).all(), (dtype, a_c, a_r)
            assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), (dtype, a_c, a_r)
    # a = 0 is clamped just below 0: finite, and larger than any representable a < 0 gives
    assert math.isfinite(log_odds(t(0.0)).item()) and log_odds(t(0.0)).item() >= log_odds(t(-1e-12)).item()


def test_length_normalised_rewards_ignore_repetition_but_dpo_does_not():
    # the same responses with every token repeated: logp and length double, per-token logp unchanged
    pc, pr, lc, lr = t(-6.0), t(-10.0), torch.tensor([3]), torch.tensor([4])
    for loss in (simpo_loss, orpo_loss):
        once = loss(pc, pr, lc, lr)
        twice = loss(2 * pc, 2 * pr, 2 * lc, 2 * lr)
        for x, y in zip(once, twice):
            close(y, x.tolist(), tol=1e-12)
    ref_c, ref_r = t(-7.0), t(-9.0)
    _, rc1, rr1 = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)
    _, rc2, rr2 = dpo_loss(2 * pc, 2 * pr, 2 * ref_c, 2 * ref_r, beta=0.1)
    close(rc2, [2 * rc1.item()])
    close(rr2, [2 * rr1.item()])


# ----------------------------------------------------------------------------- errors

def test_errors_are_clear():
    with pytest.raises(ValueError, match="sigmoid, cdpo, robust, hinge, ipo, ipo_avg$"):
        dpo(loss_type="dop")
    with pytest.raises(ValueError, match="'ipo_avg' needs chosen_lengths and rejected_lengths"):
        dpo(loss_type="ipo_avg")
    with pytest.raises(ValueError, match="'ipo_avg' needs chosen_lengths and rejected_lengths"):
        dpo(loss_type="ipo_avg", chosen_lengths=torch.tensor([1, 1]))
    close(dpo(loss_type="ipo", beta=0.5)[0], [1.0, 4.0])  # the sequence-level form needs no lengths
    for eps in (0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing < 0.5"):
            dpo(loss_type="robust", label_smoothing=eps)
    with pytest.raises(ValueError, match="p_chosen"):
        dpo(loss_type="hinge", p_chosen=t(0.7, 0.2))
    for lt in ("ipo", "ipo_avg", "hinge"):
        with pytest.raises(ValueError, match=f"label_smoothing has no meaning for loss_type '{lt}'"):
            dpo(loss_type=lt, label_smoothing=0.1, chosen_lengths=torch.tensor([1, 1]),
                rejected_lengths=torch.tensor([1, 1]))
        with pytest.raises(ValueError, match="p_chosen"):
            dpo(loss_type=lt, p_chosen=t(0.7, 0.2), chosen_lengths=torch.tensor([1, 1]),
                rejected_lengths=torch.tensor([1, 1]))


def test_float32_inputs_and_integer_lengths_keep_dtype():
    pc, pr = torch.tensor([-2.0]), torch.tensor([-3.0])
    for out in (simpo_loss(pc, pr, torch.tensor([2]), torch.tensor([3])),
                orpo_loss(pc, pr, torch.tensor([2]), torch.tensor([3])),
                dpo_loss(pc, pr, pc, pr, loss_type="ipo"),
                dpo_loss(pc, pr, pc, pr, loss_type="ipo_avg", chosen_lengths=torch.tensor([2]),
                         rejected_lengths=torch.tensor([3]))):
        assert all(x.dtype == torch.float32 and x.shape == (1,) for x in out)
