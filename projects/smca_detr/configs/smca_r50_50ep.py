# SMCA R50 without multi-scale features (Gao et al. 2021, Table 1 "SMCA w/o multi-scale"), the
# released single-scale recipe: DETR's 6+6 post-norm layers with FFN 2048, 300 queries, the
# decoder's co-attention modulated by per-head Gaussian priors with independent width/height scales
# (released --dynamic_scale type3), beta 8, sigmoid focal loss (alpha 0.25, gamma 2) with matcher
# and loss class/L1/GIoU = 2/5/2 and auxiliary losses, AdamW 1e-4 (backbone 1e-5), weight decay
# 1e-4, clip 0.1, 50 epochs with a drop at 40, batch 16 (2 per GPU x 8, the released command).
from detectron2.config import LazyCall as L

from detr_variants.layers.smca_attention import SMCADecoder, SMCADecoderLayer
from detr_variants.modeling.meta_arch.smca_detr import SMCADETR

from ....configs.common.criterion import focal_criterion as _focal_criterion
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.schedule import step_schedule
from ....configs.common.train import train
from ...detr.configs.detr_r50_500ep import model as _detr  # backbone, encoder, position encoding

model = L(SMCADETR)(
    backbone=_detr.backbone,
    encoder=_detr.encoder,
    decoder=L(SMCADecoder)(
        layer=L(SMCADecoderLayer)(
            d_model=256,
            nhead=8,
            dim_feedforward=2048,
            dropout=0.1,
            scale_type="independent",  # Table 2: "fixed" | "single" | "independent"
            multi_head_modulation=True,  # Table 2: False = head-shared modulation
            beta=8.0,
        ),
        num_layers=6,
        norm=_detr.decoder.norm,
    ),
    position_embedding=_detr.position_embedding,
    num_queries=300,
    hidden_dim=256,
    num_classes=80,
    classification="sigmoid",
    test_topk=100,
    criterion=_focal_criterion,
    pixel_mean=_detr.pixel_mean,
    pixel_std=_detr.pixel_std,
    input_format=_detr.input_format,
)

optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
lr_multiplier = step_schedule(total_epochs=50, drop_epochs=[40])

dataloader.train.total_batch_size = 16
train.epochs = 50
train.clip_grad.max_norm = 0.1
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/smca_r50_50ep"
