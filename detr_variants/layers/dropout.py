"""Dropout for the transformers, with a fast CPU training path.

PyTorch's CPU dropout draws one mt19937 Bernoulli sample per element on one thread (MKL's vector
sampler is used on Intel CPUs only): 100 ms for the (2, 5440, 1024) FFN activation of a Deformable
DETR encoder layer at 512x512 on the 2-core development machine; 14% of the training step went
to that sampling. On the CPU in training mode, :func:`dropout` and :func:`relu_dropout_` use the
native kernel of ``detr_variants._C`` instead (``ops/csrc/cpu/dropout_cpu.cpp``): element i is
kept when a hash of (seed, i) clears a threshold, so the mask is drawn in parallel and vectorised
(20 ms for that activation, ``tools/bench_dropout.py``). :func:`relu_dropout_` folds the FFN's
ReLU into the same mask, in place, and :func:`dropout` can add a residual in the same pass.

The distribution is dropout's: each element kept independently with probability 1 - p (p rounded
to a multiple of 2^-32) and scaled by 1 / (1 - p). The random stream differs from ``F.dropout``'s;
the seed is drawn from torch's default CPU generator, so ``torch.manual_seed`` makes it
reproducible, and the mask does not depend on the thread count. Elsewhere (CUDA, where PyTorch
fuses dropout already, other dtypes, inference, graph capture) both are plain ``F.dropout``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import Function, once_differentiable

from detr_variants._native import _C, graph_capture

__all__ = ["Dropout", "dropout", "native_dropout_applies", "relu_dropout_"]


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
        # in place: see relu_dropout_ (never with a residual, which passes `grad` on as it is)
        grad_x = _C.dropout_cpu_backward(
            grad, keep, ctx.scale, ctx.inplace and grad.is_contiguous()
        )
        return grad_x, grad_residual, None, None, None


def native_dropout_applies(x: Tensor, p: float, training: bool) -> bool:
    """Whether :func:`dropout` of ``x`` runs the native CPU kernel."""
    return (
        training
        and 0.0 < p < 1.0
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and _C is not None
        and hasattr(_C, "dropout_cpu_forward")
        and graph_capture() is None
    )


def dropout(x: Tensor, p: float, training: bool, residual: Optional[Tensor] = None) -> Tensor:
    """``F.dropout(x, p, training)``, plus ``residual`` if given (in the same pass when the native
    kernel runs: training on the CPU)."""
    if native_dropout_applies(x, p, training) and (
        residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)
    ):
        return _NativeDropout.apply(x, residual, p, False, False)
    out = F.dropout(x, p, training)
    return out if residual is None else residual + out


def relu_dropout_(x: Tensor, p: float, training: bool) -> Tensor:
    """``dropout(relu(x))`` computed in place in ``x``, with one fused mask when training on the
    CPU; the backward then also masks its incoming gradient in place.

    For the FFN's hidden activation, the largest tensor of an encoder layer. ``x`` must be
    contiguous and, under autograd, no view (use a 2-d Linear output: a 3-d one is a view) and
    not saved for the backward by the op that made it (a Linear's output is not). The result must
    feed only ops whose gradient for it is a fresh tensor, such as a Linear."""
    if native_dropout_applies(x, p, training):
        return _NativeDropout.apply(x, None, p, True, True)
    return F.dropout(F.relu_(x), p, training)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no parameters) that runs :func:`dropout`; called with a
    ``residual`` it returns ``residual + dropout(x)``."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.inplace:
            out = super().forward(x)
            return out if residual is None else residual + out
        return dropout(x, self.p, self.training, residual)
