"""Detectron2 backbones for set prediction, plus the padding masks of their feature maps.

The backbones are detectron2's own ``ResNet`` (and ``FPN`` for TSP), held by the detectors as
``self.backbone``, so ``DetectionCheckpointer`` loads detectron2 model-zoo checkpoints
(e.g. ``detectron2://ImageNetPretrained/torchvision/R-50.pkl``) with no renaming.
"""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import Tensor, nn

_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def make_resnet(
    depth: int = 50,
    out_features: Sequence[str] = ("res5",),
    norm: str = "FrozenBN",
    freeze_at: int = 2,
    stride_in_1x1: bool = False,
    dc5: bool = False,
) -> ResNet:
    """A detectron2 ``ResNet`` as the DETR family uses it.

    Args:
        depth: 18, 34, 50, 101 or 152.
        out_features: stages to return, e.g. ``("res5",)`` or ``("res3", "res4", "res5")``.
        norm: ``"FrozenBN"`` for pretrained weights; ``"BN"`` or ``"GN"`` when training from scratch.
        freeze_at: 0 trains everything, 1 freezes the stem, 2 the stem and res2 (DETR's default).
        stride_in_1x1: False for torchvision weights (stride in the 3x3 conv), True for MSRA.
        dc5: dilate res5 instead of striding it (stride 16). As torchvision does, the first res5
            block keeps dilation 1 and the later ones use dilation 2.
    """
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"unsupported ResNet depth {depth}; use one of {sorted(_BLOCKS_PER_STAGE)}"
        )
    if dc5 and depth < 50:
        raise ValueError("DC5 needs bottleneck blocks (depth >= 50)")
    bottleneck = depth >= 50
    in_channels = [64, 256, 512, 1024] if bottleneck else [64, 64, 128, 256]
    out_channels = [256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512]
    stages = []
    for idx, (n, c_in, c_out) in enumerate(
        zip(_BLOCKS_PER_STAGE[depth], in_channels, out_channels)
    ):
        stride = 1 if idx == 0 or (dc5 and idx == 3) else 2
        kwargs = dict(
            block_class=BottleneckBlock if bottleneck else BasicBlock,
            num_blocks=n,
            in_channels=c_in,
            out_channels=c_out,
            norm=norm,
            stride_per_block=[stride] + [1] * (n - 1),
        )
        if bottleneck:
            kwargs.update(bottleneck_channels=c_out // 4, stride_in_1x1=stride_in_1x1)
            if dc5 and idx == 3:
                kwargs["dilation_per_block"] = [1] + [2] * (n - 1)
        stages.append(ResNet.make_stage(**kwargs))
    stem = BasicStem(in_channels=3, out_channels=64, norm=norm)
    resnet = ResNet(stem, stages, out_features=list(out_features), freeze_at=freeze_at)
    return fold_frozen_batchnorm(resnet)


class FrozenBNConv2d(Conv2d):
    """A detectron2 ``Conv2d`` whose norm is ``FrozenBatchNorm2d``, run as one convolution.

    The frozen affine y = x * s + t is folded into the convolution's weight (W * s) and bias on
    every call, so weights loaded or trained later are used as they are. That saves a pass over
    the feature map (two under autograd, where detectron2 computes x * s + t) and one in the
    backward. Parameters, buffers and state-dict keys are those of the ``Conv2d`` it replaces.
    """

    @classmethod
    def from_conv(cls, conv: Conv2d) -> "FrozenBNConv2d":
        """The same convolution, holding ``conv``'s parameters and norm."""
        folded = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            norm=conv.norm,
            activation=conv.activation,
            device="meta",  # the parameters are replaced by conv's below
        )
        folded.weight, folded.bias = conv.weight, conv.bias
        return folded

    def forward(self, x: Tensor) -> Tensor:
        bn = self.norm
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        x = F.conv2d(
            x,
            self.weight * scale.view(-1, 1, 1, 1).to(self.weight.dtype),
            shift.to(x.dtype),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return x if self.activation is None else self.activation(x)


def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every ``Conv2d`` + ``FrozenBatchNorm2d`` in ``module`` by a
    :class:`FrozenBNConv2d` (like detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``)."""
    for name, child in module.named_children():
        if type(child) is Conv2d and isinstance(child.norm, FrozenBatchNorm2d):
            setattr(module, name, FrozenBNConv2d.from_conv(child))
        else:
            fold_frozen_batchnorm(child)
    return module


def feature_masks(padding_mask: Tensor, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Padding masks (True at padding) of each feature map, by nearest resizing of the image mask.

    This is how the official DETR code derives them, so a feature cell is padding exactly when
    the image pixel it samples is.
    """
    return {
        name: F.interpolate(padding_mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        for name, x in features.items()
    }
