"""SMCA (Gao et al., ICCV 2021): DETR with spatially modulated co-attention, single- and multi-scale."""

from typing import List, Sequence, Tuple, cast

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from ...layers.deformable_transformer import flatten_levels
from ...layers.smca_attention import SMCADecoder, SMCADecoderLayer, SpatialModulation
from ..neck import MultiLevelNeck
from .base import set_prediction_outputs
from .detr import DETR


@META_ARCH_REGISTRY.register()
class SMCADETR(DETR):
    """Single-scale SMCA: DETR's encoder, the spatially modulated decoder and a sigmoid head.

    Differences from :class:`DETR`: the decoder (:class:`SMCADecoder`) modulates its
    co-attention with each query's Gaussian-like prior; the box head adds the prior centre's logit
    before the sigmoid, ``sigmoid(bbox_embed(f) + [logit(c), 0, 0])``, in every layer (paper
    eq. 12); one sigmoid focal-loss output per class (prior 0.01); 300 queries. Inference keeps
    the top ``test_topk`` of queries × classes.

    The Gaussian's centre is ``c·(W, H)/stride`` feature cells, with (W, H) each image's
    *unpadded* size (``images.image_sizes``), as in the released code.

    Args:
        decoder: an :class:`SMCADecoder` whose layers read one level.
        **kwargs: :class:`DETR` arguments.
    """

    classifications: Sequence[str] = ("sigmoid",)
    decoder: SMCADecoder  # checked in __init__

    def __init__(self, *, num_queries: int = 300, **kwargs):
        super().__init__(num_queries=num_queries, **kwargs)
        if not isinstance(self.decoder, SMCADecoder):
            raise TypeError(f"SMCA needs an SMCADecoder, got {type(self.decoder).__name__}")
        self._reset_modulation()

    def _reset_modulation(self) -> None:
        """Scales back to 1 after DETR's xavier init (the released code does the same)."""
        for m in self.decoder.modules():
            if isinstance(m, SpatialModulation):
                m.reset_parameters()

    def _check_levels(self, num_levels: int) -> None:
        built = cast(SMCADecoderLayer, self.decoder.layers[0]).num_levels
        if built != num_levels:
            raise ValueError(
                f"the decoder layers are built for {built} feature levels; the model has {num_levels}"
            )

    @property
    def strides(self) -> List[int]:
        """Stride of each feature level the decoder reads."""
        return [self.backbone.output_shape()[self.in_feature].stride]

    def encode_levels(
        self, images, padding_mask
    ) -> Tuple[Tensor, Tensor, Tensor, List[Tuple[int, int]]]:
        """Encoder memory (B, S, C), its position encoding and padding mask, and each level's
        padded (h, w)."""
        memory, pos, mask = self.encode(images, padding_mask)
        stride = self.strides[0]
        # detectron2's ResNet (and DC5) gives ceil(size / stride) cells for a padded size (no
        # floor division of negative sizes: ONNX's truncates)
        shape = tuple((s + stride - 1) // stride for s in images.tensor.shape[-2:])
        if shape[0] * shape[1] != memory.shape[1]:
            raise ValueError(
                f"{memory.shape[1]} feature cells do not form a {shape} map for stride {stride}"
            )
        return memory, pos, mask, [shape]

    def compute_outputs(self, images, padding_mask):
        memory, pos, mask, spatial_shapes = self.encode_levels(images, padding_mask)
        self._check_levels(len(spatial_shapes))
        sizes = torch.tensor(
            [[w, h] for h, w in images.image_sizes], dtype=torch.float32, device=memory.device
        )
        strides = torch.tensor(self.strides, dtype=torch.float32, device=memory.device)
        level_sizes = (
            sizes[:, None, :] / strides[None, :, None]
        )  # (B, L, 2): unpadded (w, h) in cells
        query_pos = self.query_positions(memory.shape[0])
        hs, center_logits = self.decoder(
            query_pos.new_zeros(query_pos.shape),
            memory,
            query_pos,
            pos,
            level_sizes,
            spatial_shapes,
            memory_key_padding_mask=mask,
        )
        delta = self.bbox_embed(hs)
        boxes = torch.cat(
            [delta[..., :2] + center_logits.to(delta.dtype), delta[..., 2:]], dim=-1
        ).sigmoid()
        return set_prediction_outputs(self.class_embed(hs), boxes, self.aux_loss)


@META_ARCH_REGISTRY.register()
class MultiScaleSMCADETR(SMCADETR):
    """Multi-scale SMCA as in the paper (Sec. 3.3): stride 16/32/64 features, no FPN, an encoder
    of intra-scale and multi-scale self-attention blocks, and a decoder with per-scale spatial
    modulation and scale-selection attention.

    Levels: each of ``in_features`` (C4, C5) through a 1×1 conv to ``hidden_dim``; each further
    level through a 3×3 stride-2 conv, the first on the raw last backbone feature (C5, as the
    released multi-scale code and Deformable DETR), later ones on the previous level. Each level
    has the sine position encoding of its own mask plus, with ``level_embed``, a learned level
    embedding (which the multi-scale self-attention and the co-attention keys need to tell the
    levels apart; the paper does not say, the released multi-scale code has one).

    Args:
        in_features: backbone outputs used as levels (``["res4", "res5"]``).
        num_feature_levels: levels in all (3: strides 16, 32, 64).
        level_embed: add a learned embedding per level to its position encoding.
        extra_mask_source: padding masks of the extra levels resized from the image's
            (``"image"``) or from the previous level's (``"previous"``, as released); see
            :class:`~detr_variants.modeling.neck.MultiLevelNeck`.
        encoder: a :class:`~detr_variants.layers.smca_attention.MultiScaleEncoder`.
        decoder: an :class:`SMCADecoder` whose layers have ``num_levels=num_feature_levels``.
        **kwargs: :class:`SMCADETR` / :class:`DETR` arguments.
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str] = ("res4", "res5"),
        num_feature_levels: int = 3,
        level_embed: bool = True,
        extra_mask_source: str = "image",
        hidden_dim: int = 256,
        **kwargs,
    ):
        super().__init__(in_feature=None, hidden_dim=hidden_dim, **kwargs)
        self.in_features = list(in_features)
        self.num_feature_levels = num_feature_levels
        self.neck = MultiLevelNeck(
            input_shapes=self.backbone.output_shape(),
            in_features=self.in_features,
            hidden_dim=hidden_dim,
            num_levels=num_feature_levels,
            position_embedding=self.position_embedding,
            level_embed=level_embed,
            extra_mask_source=extra_mask_source,
            xavier_init=False,
        )
        self._check_levels(num_feature_levels)

    @property
    def strides(self) -> List[int]:
        return list(self.neck.strides)

    def multi_level_features(
        self, images, padding_mask
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Projected maps of every level, their padding masks and position encodings."""
        return self.neck(*self.backbone_features(images, padding_mask), padding_mask)

    def encode_levels(self, images, padding_mask):
        srcs, masks, pos = self.multi_level_features(images, padding_mask)
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos, mask = flatten_levels(pos), flatten_levels(masks)
        memory = self.encoder(flatten_levels(srcs), pos, mask, [h * w for h, w in spatial_shapes])
        return memory, pos, mask, spatial_shapes

    def encode(self, images, padding_mask) -> Tuple[Tensor, Tensor, Tensor]:
        """Memory of all levels concatenated (B, S, C), its position encoding and padding mask."""
        return self.encode_levels(images, padding_mask)[:3]


@META_ARCH_REGISTRY.register()
class ReleasedMultiScaleSMCADETR(MultiScaleSMCADETR):
    """The released multi-scale SMCA (``Multi_scale_SMCA.zip``, "New multi scale": 44.4 AP R50,
    45.7 AP R101 at 50 epochs), a different architecture from the paper's
    (:class:`MultiScaleSMCADETR`).

    Differences from :class:`MultiScaleSMCADETR`:

    - levels C3, C4, C5 (1×1 convs) and P6 (3×3 stride-2 conv on raw C5), no norm; P6's padding
      mask is C5's resized (``extra_mask_source="previous"``);
    - the encoder is a :class:`~detr_variants.layers.smca_conv_encoder.CrossScaleConvEncoder`
      (depthwise convolutions with a cross-scale exchange, no self-attention);
    - before the decoder, ``memory_downsample`` (3×3 stride-2 conv, released ``transformer.conv``)
      takes the stride-8 memory to stride 16; the decoder reads the levels
      [conv'd C3, C4, C5, P6] at strides 16, 16, 32, 64, the conv'd level with C4's padding mask
      and position encoding (C4's level embedding included);
    - the decoder's Gaussians use distance factors 0.5, 0.5, 1, 2 per level (its config).

    Scale selection: every image uses its own weights ``softmax(point4(·))``. The released
    ``multi_head_attention_forward`` reads batch element 0's weights (``scale_attention[:, 0, l]``)
    for every image of the batch; with one image per device (the released runs:
    ``--batch_size 1``) the two are the same, above that the released code mixes images.
    """

    def __init__(self, *, in_features: Sequence[str] = ("res3", "res4", "res5"), **kwargs):
        if len(in_features) < 2:
            raise ValueError("the stride-2 conv on the finest memory needs a second backbone level")
        super().__init__(in_features=in_features, **kwargs)
        hidden_dim = self.query_embed.weight.shape[1]
        # PyTorch's default init: the release creates it after the transformer's xavier init
        self.memory_downsample = nn.Conv2d(hidden_dim, hidden_dim, 3, stride=2, padding=1)

    @property
    def strides(self) -> List[int]:
        """The decoder's level strides: the conv'd finest level takes the second's (16)."""
        strides = self.neck.strides
        return [strides[1]] + strides[1:]

    def encode_levels(self, images, padding_mask):
        srcs, masks, pos = self.multi_level_features(images, padding_mask)
        encoded = self.encoder(srcs, pos)
        memory = [self.memory_downsample(encoded[0])] + list(encoded[1:])
        if memory[0].shape[-2:] != memory[1].shape[-2:]:
            raise ValueError(
                f"the stride-2 conv of the finest memory gives {tuple(memory[0].shape[-2:])}, "
                f"the next level is {tuple(memory[1].shape[-2:])}"
            )
        masks, pos = [masks[1]] + masks[1:], [pos[1]] + pos[1:]
        spatial_shapes = [tuple(m.shape[-2:]) for m in memory]
        return flatten_levels(memory), flatten_levels(pos), flatten_levels(masks), spatial_shapes
