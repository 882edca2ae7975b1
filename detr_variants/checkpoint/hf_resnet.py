"""HF ``transformers`` ResNet parameter names → detectron2 ``ResNet`` names.

HF DETR-family models built with ``use_timm_backbone=False`` hold a ``ResNetBackbone`` whose
stem and blocks are named ``embedder.embedder.*`` and ``encoder.stages.S.layers.I.*``. The
computation is detectron2's (7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem; stride in the 3x3
conv of a bottleneck, as ``downsample_in_bottleneck=False`` and ``stride_in_1x1=False``; 1x1
projection shortcuts), so only the names differ.
"""

from typing import Optional

from .convert import TORCHVISION_RESNET
from .names import NameTable

_KINDS = {"convolution": "", "normalization": "norm."}

# HF ResNet names → detectron2 ``ResNet`` names: ``embedder.embedder.*`` → the stem,
# ``encoder.stages.S.layers.I.layer.J.*`` → ``res{S+2}.I.conv{J+1}``, ``....shortcut.*`` →
# ``res{S+2}.I.shortcut``; convolution / normalization → the conv / its ``norm``.
HF_RESNET = NameTable(
    [(f"embedder.embedder.{hf}.{{leaf}}", f"stem.conv1.{d2}{{leaf}}") for hf, d2 in _KINDS.items()]
    + [
        (
            f"encoder.stages.{s}.layers.{{i}}.{hf_module}.{hf}.{{leaf}}",
            f"res{s + 2}.{{i}}.{d2_module}.{d2}{{leaf}}",
        )
        for s in range(4)
        for hf_module, d2_module in [(f"layer.{j}", f"conv{j + 1}") for j in range(3)]
        + [("shortcut", "shortcut")]
        for hf, d2 in _KINDS.items()
    ]
)


def hf_resnet_name(name: str) -> Optional[str]:
    """HF ResNet parameter name (relative to the ResNet) → detectron2 name; None if not one (see
    :data:`HF_RESNET`)."""
    return HF_RESNET.to_ours(name)


HF_BACKBONE_PREFIXES = (
    "model.backbone.model.",
    "model.backbone.conv_encoder.model.",
)  # current, legacy

# The backbone of an HF DETR-family model: an HF ResNet (``use_timm_backbone=False``) or the timm
# ResNet of the hub checkpoints (torchvision names), under the current or the legacy prefix.
HF_BACKBONE = NameTable(
    row
    for prefix in HF_BACKBONE_PREFIXES
    for resnet in (HF_RESNET, TORCHVISION_RESNET)
    for row in resnet.prefixed(prefix, "backbone.").rows
)


def hf_backbone_name(key: str) -> Optional[str]:
    """Our ``backbone.*`` name of an HF DETR-family backbone parameter (see :data:`HF_BACKBONE`);
    None if ``key`` is not a backbone parameter."""
    return HF_BACKBONE.to_ours(key)
