"""The LM head on scored tokens only: chunked log-probs equal the full-logits ones (fp32, 1e-5), and the
gradient is the same."""

import torch

from tether.losses.lm import head_logprobs, token_logprobs
from tether.models import load_causal_lm
from tether.rollout import scored_logprobs


def test_chunked_head_log_probs_equal_the_full_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h, y = torch.randn(37, 16), torch.randint(0, 300, (37,))
    want = torch.log_softmax(head(h), -1).gather(-1, y[:, None])[:, 0]
    for chunk in (1, 5, 37, 4096):
        assert torch.allclose(head_logprobs(h, head, y, chunk=chunk), want, atol=1e-5)
    assert torch.allclose(head_logprobs(h, head, y, temperature=0.5), torch.log_softmax(head(h) / 0.5, -1).gather(-1, y[:, None])[:, 0], atol=1e-5)
    assert head_logprobs(h[:0], head, y[:0]).shape == (0,)


def test_head_entropy_is_a_statistic_unless_asked_for_its_gradient():
    """entropy=True: H per row, no gradient (nothing vocabulary-sized kept for backward); "grad": the same
    values and the gradient of sum H equals autograd's through the full softmax."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h, y = torch.randn(11, 16, requires_grad=True), torch.randint(0, 300, (11,))
    p = torch.softmax(head(h) / 0.7, -1)
    want = -(p * p.log()).sum(-1)
    (g_want,) = torch.autograd.grad(want.sum(), h)
    logp, ent = head_logprobs(h, head, y, temperature=0.7, chunk=4, entropy=True)
    assert torch.allclose(ent, want, atol=1e-5) and not ent.requires_grad and logp.requires_grad
    _, ent = head_logprobs(h, head, y, temperature=0.7, chunk=4, entropy="grad")
    (g,) = torch.autograd.grad(ent.sum(), h)
    assert torch.allclose(ent, want, atol=1e-5) and torch.allclose(g, g_want, atol=1e-5)


def test_scored_logprobs_equal_token_logprobs_on_the_selected_tokens_with_the_same_gradient():
    model = load_causal_lm("builtin:tiny")
    ids = torch.tensor([[1, 504, 2683, 314, 260, 2, 2], [1, 77, 88, 99, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    select = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    full = token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
    (g_full,) = torch.autograd.grad((full * select).sum(), model.model.layers[0].mlp.down_proj.weight)
    part = scored_logprobs(model, ids, select, attention_mask=mask)
    (g_part,) = torch.autograd.grad(part.sum(), model.model.layers[0].mlp.down_proj.weight)
    assert torch.allclose(part, full * select, atol=1e-5)
    assert torch.equal(part[select == 0], torch.zeros(int((select == 0).sum())))
    assert torch.allclose(g_part, g_full, atol=1e-6)
