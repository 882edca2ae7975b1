"""The transformers' dropout: native counter-based CPU kernel and its fallbacks."""
import pytest
import torch
import torch.nn.functional as F

from detr_variants._native import _C
from detr_variants.layers import Dropout, FeedForward, dropout, relu_dropout

requires_native = pytest.mark.skipif(_C is None or not hasattr(_C, "dropout_cpu_forward"),
                                     reason="detr_variants._C not built")


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


@requires_native
def test_relu_dropout_is_dropout_of_relu_with_the_same_mask():
    x = torch.randn(3, 257, 129, dtype=torch.float64)
    assert torch.equal(seeded(relu_dropout, x), seeded(dropout, F.relu(x)))


@requires_native
@pytest.mark.parametrize("fn", [dropout, relu_dropout])
def test_gradient_is_the_mask_times_the_scale(fn):
    x = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: seeded(fn, t), (x,))
    out = seeded(fn, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).double() / 0.7)


@requires_native
def test_nan_is_kept_as_torch_does():
    x = torch.full((64,), float("nan"))
    assert seeded(dropout, x).isnan().all()


def test_identity_at_inference_and_torch_elsewhere():
    x = torch.randn(2, 5, 8)
    assert torch.equal(dropout(x, 0.3, False), x)
    assert torch.equal(relu_dropout(x.clone(), 0.3, False), F.relu(x))
    half = x.to(torch.bfloat16)  # no native kernel for this dtype: F.dropout
    assert torch.equal(seeded(dropout, half), seeded(F.dropout, half))
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))


def test_dropout_module_and_ffn_state_dict_match_torch():
    module = Dropout(0.2)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.2 and not module.state_dict()
    ffn = FeedForward(8, 16, dropout=0.2)
    assert set(ffn.state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                                     "norm.weight", "norm.bias"}
    ffn.train()
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    out = ffn(x)
    torch.manual_seed(0)
    hidden = relu_dropout(ffn.linear1(x), 0.2, True)
    expected = ffn.norm(x + dropout(ffn.linear2(hidden), 0.2, True))
    torch.testing.assert_close(out, expected)
