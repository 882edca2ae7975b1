# Deformable DETR R50 (Zhu et al. 2021), the official recipe: C3-C5 + a stride-64 level, 6+6
# deformable layers (FFN 1024), 300 queries, sigmoid focal loss, class/L1/GIoU = 2/5/2 for the
# matcher and the loss, AdamW 2e-4 (backbone, sampling_offsets and reference_points x0.1),
# weight decay 1e-4, clip 0.1, 50 epochs with a drop at 40, total batch 32.
from detectron2.config import LazyCall as L

from detr_variants.layers import PositionEmbeddingSine
from detr_variants.layers.deformable_transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
)
from detr_variants.modeling import DeformableDETR, make_resnet

from ....configs.common.criterion import focal_criterion as _focal_criterion
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.pixels import TORCHVISION_RGB as _TORCHVISION_RGB
from ....configs.common.schedule import step_schedule
from ....configs.common.train import train

# encoder and decoder layers alike: 8 heads sampling 4 points on every level
_LAYER = dict(
    d_model=256,
    dim_feedforward=1024,
    dropout=0.1,
    num_levels="${...num_feature_levels}",
    num_heads=8,
    num_points=4,
)

model = L(DeformableDETR)(
    backbone=L(make_resnet)(
        depth=50, out_features=["res3", "res4", "res5"], norm="FrozenBN", freeze_at=2
    ),
    in_features=["res3", "res4", "res5"],
    num_feature_levels=4,
    encoder=L(DeformableEncoder)(
        layer=L(DeformableEncoderLayer)(**_LAYER),
        num_layers=6,
    ),
    decoder=L(DeformableDecoder)(
        layer=L(DeformableDecoderLayer)(**_LAYER),
        num_layers=6,
    ),
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128, normalize=True, offset=-0.5),
    num_queries=300,
    hidden_dim=256,
    with_box_refine=False,
    two_stage=False,
    num_classes=80,
    classification="sigmoid",
    criterion=_focal_criterion,
    test_topk=100,
    **_TORCHVISION_RGB,
)

optimizer.lr = 2e-4
optimizer.params.lr_multipliers = {
    "backbone": 0.1,
    "sampling_offsets": 0.1,
    "reference_points": 0.1,
}
lr_multiplier = step_schedule(total_epochs=50, drop_epochs=[40])

dataloader.train.total_batch_size = 32
train.epochs = 50
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/deformable_detr_r50_50ep"
