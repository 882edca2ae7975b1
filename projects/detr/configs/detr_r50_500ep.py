# DETR R50 (Carion et al. 2020), the official COCO recipe: 100 queries, 6+6 post-norm layers,
# FFN 2048, softmax CE with no-object weight 0.1, matcher and loss class/L1/GIoU = 1/5/2,
# AdamW 1e-4 (backbone 1e-5), weight decay 1e-4, clip 0.1, 500 epochs with a drop at 400, batch 64.
from detectron2.config import LazyCall as L
from torch import nn

from detr_variants.layers import (
    PositionEmbeddingSine,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from detr_variants.modeling import DETR, HungarianMatcher, SetCriterion, make_resnet

from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.pixels import TORCHVISION_RGB as _TORCHVISION_RGB
from ....configs.common.schedule import step_schedule
from ....configs.common.train import train

model = L(DETR)(
    backbone=L(make_resnet)(depth=50, out_features=["res5"], norm="FrozenBN", freeze_at=2),
    encoder=L(TransformerEncoder)(
        layer=L(TransformerEncoderLayer)(d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1),
        num_layers=6,
    ),
    decoder=L(TransformerDecoder)(
        layer=L(TransformerDecoderLayer)(d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1),
        num_layers=6,
        norm=L(nn.LayerNorm)(normalized_shape=256),
    ),
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128, normalize=True),
    num_queries=100,
    hidden_dim=256,
    num_classes=80,
    classification="softmax",  # the head, the loss and the matching cost
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, classification="${..classification}"
        ),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        classification="${..classification}",
        eos_coef=0.1,
    ),
    **_TORCHVISION_RGB,
)

lr_multiplier = step_schedule(total_epochs=500, drop_epochs=[400])

dataloader.train.total_batch_size = 64
train.epochs = 500
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/detr_r50_500ep"
