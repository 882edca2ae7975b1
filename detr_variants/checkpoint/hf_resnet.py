"""HF ``transformers`` ResNet parameter names → detectron2 ``ResNet`` names.

HF DETR-family models built with ``use_timm_backbone=False`` hold a ``ResNetBackbone`` whose
stem and blocks are named ``embedder.embedder.*`` and ``encoder.stages.S.layers.I.*``. The
computation is detectron2's (7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem; stride in the 3x3
conv of a bottleneck, as ``downsample_in_bottleneck=False`` and ``stride_in_1x1=False``; 1x1
projection shortcuts), so only the names differ.
"""

import re
from typing import Optional

_CONV = re.compile(
    r"(?:^|\.)encoder\.stages\.(\d)\.layers\.(\d+)\.(?:layer\.(\d)|(shortcut))"
    r"\.(convolution|normalization)\.(\w+)$"
)
_STEM = re.compile(r"(?:^|\.)embedder\.embedder\.(convolution|normalization)\.(\w+)$")


def hf_resnet_name(name: str) -> Optional[str]:
    """HF ResNet parameter name → detectron2 name (relative to the ResNet); None if not one.

    Whatever precedes the ResNet's own names (``model.backbone.model.``, ``resnet.``) is ignored.

    ``embedder.embedder.convolution``/``.normalization`` → ``stem.conv1``/``stem.conv1.norm``;
    ``encoder.stages.S.layers.I.layer.J.*`` → ``res{S+2}.I.conv{J+1}[.norm]``;
    ``encoder.stages.S.layers.I.shortcut.*`` → ``res{S+2}.I.shortcut[.norm]``.
    """
    m = _STEM.search(name)
    if m:
        return "stem.conv1." + ("norm." if m.group(1) == "normalization" else "") + m.group(2)
    m = _CONV.search(name)
    if not m:
        return None
    stage, block, conv, shortcut, kind, leaf = m.groups()
    module = "shortcut" if shortcut else f"conv{int(conv) + 1}"
    return (
        f"res{int(stage) + 2}.{block}.{module}."
        + ("norm." if kind == "normalization" else "")
        + leaf
    )


HF_BACKBONE_PREFIXES = (
    "model.backbone.model.",
    "model.backbone.conv_encoder.model.",
)  # current, legacy


def hf_backbone_name(key: str) -> Optional[str]:
    """Our ``backbone.*`` name of an HF DETR-family backbone parameter, from either an HF ResNet
    (``use_timm_backbone=False``) or the timm ResNet of the hub checkpoints (torchvision names);
    None if ``key`` is not a backbone parameter."""
    from .convert import torchvision_resnet_name

    prefix = next((p for p in HF_BACKBONE_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    rest = key[len(prefix) :]
    name = hf_resnet_name(rest) or torchvision_resnet_name(rest)
    return None if name is None else "backbone." + name
