# TSP-RCNN R50 (Sun et al. 2021), the released recipe (tsp_rcnn.sh, configs/Base-RCNN-TSP.yaml):
# detectron2's GeneralizedRCNN with MSRA R-50 + FPN P2-P7 (P6/P7 by Conv3x3/s2 + SyncBN from
# P5); RPN on P3-P7, 9 anchors per location (sizes 32·2^k·{1, 2^(1/3), 2^(2/3)}, ratios 0.5/1/2),
# separate objectness / delta towers of 2 convs with per-level SyncBN, box loss weight 2, 700
# proposals after NMS in training and test; 700 sampled RoIs (at most 25% foreground), random
# drop to 70-100%; RoIAlignV2 7x7 on P2-P5 → FC 512 + RoI position encoding → LayerNorm →
# encoder-only transformer (d 512, 8 heads, 6 pre-norm layers, FFN 2048); softmax over 80
# classes + background with TSP's focal-style weighting, class-specific box deltas from a
# 3-layer MLP (Box2BoxTransform (10, 10, 5, 5)), L1 + 2 GIoU; restricted matching over RoIs with
# IoU >= 0.5; class-wise NMS 0.7 at test. Optimiser: SGD lr 0.02 (momentum 0.9) and, for the
# transformer encoder, AdamW lr 1e-4 (0.02 x 0.005) with gradient clipping 0.01; otherwise as
# TSP-FCOS (same data, 36-epoch schedule).
from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN
from torch import nn

from detr_variants.layers import TransformerEncoder, TransformerEncoderLayer
from detr_variants.modeling import RestrictedMatcher, make_resnet
from detr_variants.modeling.tsp import (
    TSPRCNN,
    TransformerROIHeads,
    TSPBoxHead,
    TSPFastRCNNOutputLayers,
    TSPRPNHead,
    TSPTopBlock,
)

from ....configs.common.pixels import MSRA_BGR as _MSRA_BGR
from .tsp_fcos_r50_36ep import dataloader, lr_multiplier, optimizer, train

model = L(TSPRCNN)(
    backbone=L(FPN)(
        bottom_up=L(make_resnet)(
            depth=50,
            out_features=["res2", "res3", "res4", "res5"],
            norm="FrozenBN",
            freeze_at=2,
            stride_in_1x1=True,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=L(TSPTopBlock)(channels="${..out_channels}", norm="SyncBN"),
    ),
    proposal_generator=L(RPN)(
        in_features=["p3", "p4", "p5", "p6", "p7"],
        head=L(TSPRPNHead)(
            in_channels="${...backbone.out_channels}",
            num_anchors=9,
            num_convs=2,
            num_levels=5,
            norm="SyncBN",
        ),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[
                [32, 40.32, 51.80],
                [64, 80.63, 101.59],
                [128, 161.27, 203.19],
                [256, 322.54, 406.37],
                [512, 645.08, 812.75],
            ],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),  # per level
        post_nms_topk=(700, 700),
        nms_thresh=0.7,
        loss_weight={"loss_rpn_cls": 1.0, "loss_rpn_loc": 2.0},
    ),
    roi_heads=L(TransformerROIHeads)(
        num_classes=80,
        batch_size_per_image=700,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        proposal_append_gt=True,  # jittered GT, only for images where no proposal matches
        random_drop=0.7,
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(TSPBoxHead)(
            in_channels="${...backbone.out_channels}",
            pooler_resolution=7,
            hidden_dim=512,
            use_position_encoding=True,
            encoder=L(TransformerEncoder)(
                layer=L(TransformerEncoderLayer)(
                    d_model="${...hidden_dim}",
                    nhead=8,
                    dim_feedforward=2048,
                    dropout=0.1,
                    normalize_before=True,
                ),
                num_layers=6,
                norm=L(nn.LayerNorm)(normalized_shape="${...hidden_dim}"),
            ),
        ),
        box_predictor=L(TSPFastRCNNOutputLayers)(
            hidden_dim="${..box_head.hidden_dim}",
            num_classes="${..num_classes}",
            box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
            matcher=L(RestrictedMatcher)(cost_class=1.0, cost_giou=2.0),
            eos_coef=0.1,
            focal_gamma=2.0,
            l1_weight=1.0,
            giou_weight=2.0,
            test_score_thresh=0.0,
            test_nms_thresh=0.7,
            test_topk_per_image=100,
        ),
    ),
    **_MSRA_BGR,
)

optimizer.lr = 0.02
optimizer.adamw_lr = 1e-4
train.output_dir = "./output/tsp_rcnn_r50_36ep"
