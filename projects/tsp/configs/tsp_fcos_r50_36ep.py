# TSP-FCOS R50 (Sun et al. 2021), the released recipe (tsp_fcos.sh, configs/Base-FCOS-TSP.yaml):
# MSRA R-50 (BGR, stride in the 1x1 conv, frozen BN, stem and res2 frozen) + FPN P3-P7 (P6/P7 by
# Conv3x3/s2 + SyncBN from P5); FCOS towers (4 convs, GN) as the FoI classifier; top 700 FoIs,
# random drop to 70-100%; encoder-only transformer d 512, 8 heads, 6 pre-norm layers, FFN 2048;
# restricted matching -p·centerness + 2(1 - GIoU); class-wise NMS 0.6 at test.
# Optimiser: SGD (momentum 0.9) lr 0.01 for everything but the transformer encoder, which gets
# AdamW lr 1e-4 (0.01 x TRANSFORMER_MULTIPLIER 0.01) and gradient clipping 0.01; weight decay
# 1e-4 (0 on norm layers); 1000-iteration linear warmup; 36 epochs (270k iterations at batch
# 16, "3x") with drops at 24 and 32; multi-scale training, short side 640-800 step 32, flip.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.modeling.backbone import FPN
from detectron2.solver import WarmupParamScheduler
from torch import nn

from detr_variants.engine.optim import HybridOptimizer, hybrid_param_groups
from detr_variants.layers import TransformerEncoder, TransformerEncoderLayer
from detr_variants.modeling import RestrictedMatcher, make_resnet
from detr_variants.modeling.tsp import TSPFCOS, FoIClassifier, TSPFCOSCriterion, TSPTopBlock

from ....configs.common.data.coco_detr import dataloader
from ....configs.common.pixels import MSRA_BGR as _MSRA_BGR
from ....configs.common.schedule import step_schedule
from ....configs.common.train import train

model = L(TSPFCOS)(
    backbone=L(FPN)(
        bottom_up=L(make_resnet)(
            depth=50,
            out_features=["res3", "res4", "res5"],
            norm="FrozenBN",
            freeze_at=2,
            stride_in_1x1=True,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=L(TSPTopBlock)(channels="${..out_channels}", norm="SyncBN"),
    ),
    in_features=["p3", "p4", "p5", "p6", "p7"],
    foi_head=L(FoIClassifier)(
        in_channels="${..backbone.out_channels}",
        num_levels=5,
        num_classes="${..num_classes}",
        num_convs=4,
        norm="GN",
        prior_prob=0.01,
    ),
    hidden_dim=512,
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
    criterion=L(TSPFCOSCriterion)(
        num_classes="${..num_classes}",
        matcher=L(RestrictedMatcher)(cost_class=1.0, cost_giou=2.0),
        eos_coef=0.1,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_fois=700,
    random_drop=0.7,
    center_sampling_radius=1.5,
    test_score_thresh=0.0,
    test_topk_per_level=1000,
    test_nms_thresh=0.6,  # None: the top 100 without NMS
    test_topk=100,
    num_classes=80,
    **_MSRA_BGR,
)

optimizer = L(HybridOptimizer)(
    params=L(hybrid_param_groups)(
        lr="${..lr}",
        adamw_lr="${..adamw_lr}",
        weight_decay="${..weight_decay}",
        adamw_params=["encoder."],
        weight_decay_norm=0.0,
    ),
    lr=0.01,
    momentum=0.9,
    adamw_lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

# The released warmup, 1000 iterations at batch 16 on COCO train2017's 117,266 images with
# annotations, in epochs, so that it covers the same images whatever the batch size.
WARMUP_EPOCHS = 1000 * 16 / 117266


def tsp_schedule(total_epochs: int, drop_epochs):
    """detectron2's linear warmup (factor 0.001) over ``WARMUP_EPOCHS``, then the step drops;
    both are fractions of training, which ``train.epochs`` turns into iterations."""
    return L(WarmupParamScheduler)(
        scheduler=step_schedule(total_epochs=total_epochs, drop_epochs=drop_epochs),
        warmup_length=WARMUP_EPOCHS / total_epochs,
        warmup_factor=0.001,
    )


lr_multiplier = tsp_schedule(36, [24, 32])

# detectron2's standard training mapper as released: resize, flip, no crop; empty images dropped
dataloader.train.dataset.filter_empty = True
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=list(range(640, 801, 32)), max_size=1333, sample_style="choice"
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.image_format = _MSRA_BGR["input_format"]
dataloader.test.mapper.image_format = _MSRA_BGR["input_format"]  # test: short 800, long <= 1333
dataloader.train.total_batch_size = 16

train.epochs = 36
train.clip_grad = dict(enabled=True, max_norm=0.01, params="encoder.")  # the transformer only
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "./output/tsp_fcos_r50_36ep"
train.seed = 42
