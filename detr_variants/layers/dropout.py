"""Dropout for the transformers, with a fast CPU training path.

PyTorch's CPU dropout draws one mt19937 Bernoulli sample per element on one thread (MKL's vector
sampler is used on Intel CPUs only): 100 ms for the (2, 5440, 1024) FFN activation of a Deformable
DETR encoder layer at 512x512 on the 2-core development machine; 14% of the training step went
to that sampling. When training on the CPU these functions use the native kernel of
``detr_variants._C`` instead (``ops/csrc/cpu/dropout_cpu.cpp``): element i is kept when a hash of
(seed, i) clears a threshold, so the mask is drawn in parallel and vectorised (20 ms for that
activation, ``tools/bench_dropout.py``), with the residual add or the FFN's ReLU fused into the
same pass. :func:`native_dropout_applies` is the one place that decides.

The distribution is dropout's: each element kept independently with probability 1 - p (p rounded
to a multiple of 2^-32) and scaled by 1 / (1 - p). The random stream differs from ``F.dropout``'s;
the seed is drawn from torch's default CPU generator, so ``torch.manual_seed`` makes it
reproducible, and the mask does not depend on the thread count. Elsewhere (CUDA, where PyTorch
fuses dropout already, other dtypes, inference, graph capture) they are plain ``F.dropout``.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import Function, once_differentiable

from detr_variants._native import _C, graph_capture

__all__ = ["dropout", "dropout_add", "ffn_hidden", "native_dropout_applies"]


class _NativeDropout(Function):
    """``residual + dropout(relu(x) if relu else x)``, the output in ``x`` itself if ``inplace``."""

    @staticmethod
    def forward(
        ctx, x: Tensor, residual: Optional[Tensor], p: float, relu: bool, inplace: bool
    ) -> Tensor:
        seed = int(torch.empty((), dtype=torch.int64).random_())
        out, keep = _C.dropout_cpu_forward(x, p, seed, relu, inplace, residual)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.inplace = inplace
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        grad_residual = grad if ctx.needs_input_grad[1] else None
        # in place: see ffn_hidden (never with a residual, which passes `grad` on as it is)
        grad_x = _C.dropout_cpu_backward(
            grad, keep, ctx.scale, ctx.inplace and grad.is_contiguous()
        )
        return grad_x, grad_residual, None, None, None


def native_dropout_applies(x: Tensor, p: float, training: bool) -> bool:
    """Whether dropout of ``x`` runs the native CPU kernel: training on the CPU, float32/64,
    0 < p < 1, the op built, and no graph capture in progress."""
    return (
        training
        and 0.0 < p < 1.0
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and _C is not None
        and hasattr(_C, "dropout_cpu_forward")
        and graph_capture() is None
    )


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``."""
    if native_dropout_applies(x, p, training):
        return _NativeDropout.apply(x, None, p, False, False)
    return F.dropout(x, p, training)


def dropout_add(x: Tensor, residual: Tensor, p: float, training: bool) -> Tensor:
    """``residual + F.dropout(x, p, training)``: every transformer layer's residual branch; in one
    pass when the native kernel runs."""
    if (
        native_dropout_applies(x, p, training)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
    ):
        return _NativeDropout.apply(x, residual, p, False, False)
    return residual + F.dropout(x, p, training)


def ffn_hidden(
    x: Tensor, linear: nn.Linear, activation: Callable[[Tensor], Tensor], p: float, training: bool
) -> Tensor:
    """``F.dropout(activation(linear(x)), p, training)``, the FFN's hidden activation (its widest
    tensor), computed in place in ``linear``'s output when the activation is a ReLU.

    ``linear`` runs on the 2-d view of ``x``, so its output is a fresh tensor (a 3-d Linear output
    is a view) that its backward does not need: the ReLU and dropout may overwrite it. Training on
    the CPU they do so with one fused mask, and the backward masks its incoming gradient in place,
    which is safe because the FFN feeds the result only to ``linear2`` (whose input gradient is a
    fresh tensor). Feed the result to a Linear only.
    """
    h = linear(x.reshape(-1, x.shape[-1]))
    if activation is not F.relu:
        h = F.dropout(activation(h), p, training)
    elif native_dropout_applies(h, p, training):
        h = _NativeDropout.apply(h, None, p, True, True)
    else:
        h = F.dropout(F.relu_(h), p, training)
    return h.view(*x.shape[:-1], h.shape[-1])
