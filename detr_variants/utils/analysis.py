"""FLOP and activation counts of detectron2-style models, with handles for the attention ops
fvcore does not know.

fvcore counts one multiply-add as one flop (as the papers do) and skips elementwise ops. Two ops
of this project need a handle:

* ``aten::scaled_dot_product_attention`` (every dense attention): ``q @ k^T`` and ``attn @ v``.
* the multi-scale deformable attention op. Tracing always takes its PyTorch path
  (:func:`~detr_variants.layers.ms_deform_attn.ms_deform_attn_pytorch`: the native kernels cannot
  be traced), one ``aten::grid_sampler`` per level, so its cost is counted there: a bilinear sample
  of D channels at each (query, head, level, point) is 4 multiply-adds per channel, fvcore's own
  convention for ``grid_sampler``, which the GFLOPs of the project READMEs use. The weighting by
  the attention weights (one multiply-add per sampled channel, an elementwise ``mul`` and ``sum``)
  is not counted, like every elementwise op.
"""

import math
from typing import Dict, List

from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators
from fvcore.nn.jit_handles import generic_activation_jit, get_shape

# grid_sampler's interpolation_mode argument -> multiply-adds per output element
_GRID_SAMPLE_MACS = {0: 4, 1: 1, 2: 16}  # bilinear, nearest, bicubic


def attention_flops(inputs, outputs) -> int:
    """``aten::scaled_dot_product_attention``: q (..., L, E) @ k (..., S, E)^T, then the
    (..., L, S) weights @ v (..., S, Ev)."""
    q, k, v = (get_shape(i) for i in list(inputs)[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def grid_sample_flops(inputs, outputs) -> int:
    """``aten::grid_sampler`` (input, grid, interpolation_mode, ...): per output element, 4
    multiply-adds for bilinear interpolation (the deformable attention op's sampling), 1 for nearest,
    16 for bicubic."""
    mode = list(inputs)[2].toIValue()
    return math.prod(get_shape(outputs[0])) * _GRID_SAMPLE_MACS[mode]


FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": attention_flops,
    "aten::grid_sampler": grid_sample_flops,
}
ACTIVATION_HANDLES = {name: generic_activation_jit() for name in FLOP_HANDLES}


def flop_count_analysis(model, inputs: List[Dict]) -> FlopCountAnalysis:
    """detectron2's :class:`FlopCountAnalysis` (a model taking ``list[dict]``) with this module's
    handles. Put the model in eval mode first to count inference."""
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**FLOP_HANDLES)
    return analysis


def activation_counts(model, inputs: List[Dict]) -> Dict[str, float]:
    """Millions of activations (output elements) per operator, detectron2's
    ``activation_count_operators`` with this module's handles; ``inputs`` holds one image."""
    return activation_count_operators(model, inputs, supported_ops=ACTIVATION_HANDLES)
