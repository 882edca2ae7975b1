"""The transformers' dropout (native counter-based CPU kernel, its fallbacks) and the attention
that uses it for its weights."""

import pytest
import torch
import torch.nn.functional as F

from detr_variants._native import _C
from detr_variants.layers import (
    FeedForward,
    MultiheadAttention,
    dropout,
    dropout_add,
    ffn_hidden,
    scaled_dot_product_attention,
)

requires_native = pytest.mark.skipif(
    _C is None or not hasattr(_C, "dropout_cpu_forward"), reason="detr_variants._C not built"
)


def seeded(fn, x, p=0.3, seed=0):
    torch.manual_seed(seed)
    return fn(x, p, True)


@requires_native
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keeps_each_element_with_probability_one_minus_p_and_rescales(p):
    x = torch.rand(1000, 1000) + 1.0  # positive: a dropped element is exactly 0
    out = seeded(dropout, x, p)
    kept = out != 0
    # 5 standard deviations of the kept fraction of 1e6 independent draws
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    # the two 32-bit halves of one hash serve neighbouring elements: they must be independent
    even, odd = kept.flatten()[0::2].float(), kept.flatten()[1::2].float()
    assert abs(torch.corrcoef(torch.stack([even, odd]))[0, 1].item()) < 0.01


@requires_native
def test_mask_follows_torch_seed_not_thread_count():
    x = torch.randn(4, 70001)  # odd sizes: blocks and pairs do not divide evenly
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = seeded(dropout, x)
        torch.set_num_threads(2)
        two = seeded(dropout, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(seeded(dropout, x, seed=0), seeded(dropout, x, seed=1))
    torch.manual_seed(0)
    assert not torch.equal(dropout(x, 0.3, True), dropout(x, 0.3, True))  # a new mask per call


def identity_linear(n):
    linear = torch.nn.Linear(n, n, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(n, dtype=torch.float64))
        linear.bias.zero_()
    return linear


def ffn_hidden_of(linear):
    return lambda t, p, training: ffn_hidden(t, linear, F.relu, p, training)


@requires_native
def test_ffn_hidden_is_dropout_of_relu_of_linear_with_one_mask():
    x = torch.randn(3, 257, 129, dtype=torch.float64)
    expected = seeded(dropout, F.relu(x))  # one hash stream: the same mask as dropout's
    out = seeded(ffn_hidden_of(identity_linear(129)), x)
    assert out.shape == x.shape and torch.equal(out, expected)


@requires_native
@pytest.mark.parametrize("fn", [dropout, ffn_hidden_of(identity_linear(33))])
def test_gradient_is_the_mask_times_the_scale(fn):
    x = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: seeded(fn, t), (x,))
    out = seeded(fn, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).double() / 0.7)


@requires_native
def test_residual_is_added_in_the_same_pass():
    x = torch.randn(7, 301, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(7, 301, dtype=torch.float64, requires_grad=True)
    out = seeded(lambda t, p, training: dropout_add(t, residual, p, training), x)
    assert torch.equal(out, residual + seeded(dropout, x))
    grad_x, grad_residual = torch.autograd.grad(out.sum(), [x, residual])
    assert torch.equal(grad_residual, torch.ones_like(residual))
    torch.testing.assert_close(grad_x, (seeded(dropout, x) != 0).double() / 0.7)
    small = (x[:2, :17].detach().requires_grad_(), residual[:2, :17].detach().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda t, r: seeded(lambda a, p, tr: dropout_add(a, r, p, tr), t), small
    )
    half, half_residual = x.detach().bfloat16(), residual.detach().bfloat16()  # F.dropout path
    assert torch.equal(
        seeded(lambda t, p, tr: dropout_add(t, half_residual, p, tr), half),
        half_residual + seeded(F.dropout, half),
    )


@requires_native
def test_nan_is_kept_as_torch_does():
    x = torch.full((64,), float("nan"))
    assert seeded(dropout, x).isnan().all()


def test_identity_at_inference_and_torch_elsewhere():
    x = torch.randn(2, 5, 8)
    assert torch.equal(dropout(x, 0.3, False), x)
    linear = identity_linear(8).float()
    assert torch.equal(ffn_hidden(x, linear, F.relu, 0.3, False), F.relu(x))
    half = x.to(torch.bfloat16)  # no native kernel for this dtype: F.dropout
    assert torch.equal(seeded(dropout, half), seeded(F.dropout, half))
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))


def test_ffn_state_dict_and_function_match_the_written_out_ffn():
    ffn = FeedForward(8, 16, dropout=0.2)
    assert set(ffn.state_dict()) == {
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
        "norm.weight",
        "norm.bias",
    }
    ffn.train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    results = []
    for in_place in (True, False):
        torch.manual_seed(0)
        if in_place:  # the module: ReLU + dropout in place in linear1's 2-d output
            out = ffn(x)
        else:  # written out: the same masks, nothing in place
            hidden = dropout(F.relu(ffn.linear1(x)), 0.2, True)
            out = ffn.norm(x + dropout(ffn.linear2(hidden), 0.2, True))
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *ffn.parameters()])))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ attention-weight dropout

TINY_P = 1e-9  # takes the native path but drops nothing: P(drop) = 4 / 2^32


@requires_native
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_matches_torch_sdpa(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    mask = {
        None: None,
        "bool": torch.rand(2, 1, 5, 7, generator=g) > 0.3,
        "float": torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64),
    }[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every query sees a key
    for scale in (None, 0.7):
        ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=TINY_P, scale=scale)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7)


@requires_native
def test_attention_drops_weights_with_probability_p():
    q, k = torch.randn(1, 8, 300, 32), torch.randn(1, 8, 300, 32)
    v = torch.eye(300).expand(1, 8, 300, 300)  # the output is the dropped weight matrix itself
    torch.manual_seed(0)
    weights = scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    kept = weights != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    expected = (q @ k.transpose(-2, -1) / 32**0.5).softmax(-1) / 0.75
    torch.testing.assert_close(weights[kept], expected[kept])


@requires_native
def test_multihead_attention_matches_torch_and_keeps_its_state_dict():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4, dropout=TINY_P).double()
    reference = torch.nn.MultiheadAttention(16, 4, dropout=0.0, batch_first=True).double()
    reference.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == reference.state_dict().keys()
    q, k = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    v = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    results = []
    for module in (ours.train(), reference.train()):
        out, weights = module(q, k, v, key_padding_mask=padding, need_weights=False)
        assert weights is None
        results.append((out, torch.autograd.grad(out.square().sum(), [v, *module.parameters()])))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-7, atol=1e-7)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_multihead_attention_at_inference_and_its_weights_match_torch():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4, dropout=0.1).eval()
    reference = torch.nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).eval()
    reference.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, -2:] = True
    out, weights = ours(q, k, v, key_padding_mask=padding, need_weights=True)
    out_ref, weights_ref = reference(q, k, v, key_padding_mask=padding, need_weights=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, weights_ref, rtol=1e-5, atol=1e-6)
    assert weights[0, :, -2:].eq(0).all()  # no weight on padding
    no_weights, none = ours(q, k, v, key_padding_mask=padding)
    assert none is None
    torch.testing.assert_close(no_weights, out, rtol=1e-5, atol=1e-6)
