# The released multi-scale SMCA R50 (Multi_scale_SMCA.zip, "New multi scale": 44.4 AP at 50 epochs,
# log 8_16_32_64_encoder_16_16_32_64_conv_batch8_with_fc_bidirectional_encoder), a different
# architecture from the paper's (smca_ms_r50_50ep): C3, C4, C5 and P6 (3x3 stride-2 conv on raw C5)
# projected to 256 without a norm; an encoder of depthwise convolutions with a cross-scale exchange
# (no self-attention), FFN 1024; a 3x3 stride-2 conv on the C3 memory; 6 decoder layers (FFN 1024)
# reading strides 16, 16, 32, 64 with per-level, per-head Gaussians (distance factors 0.5, 0.5, 1,
# 2) and scale-selection weights. Encoder shape: the log's n_parameters (40,763,514 trainable) is
# exactly models/transformer_44_dot_4.py (7x7 depthwise convs, one down and one up conv shared by
# all level pairs) with 6 encoder layers (main.py's default), not the zip README's --enc_layers 5
# with models/transformer.py (39,977,338). Recipe: --batch_size 1 on 8 GPUs (8 images per step)
# --lr_drop 40 --epochs 50 --num_queries 300 --dynamic_scale type3 --dim_feedforward 1024;
# AdamW 1e-4, backbone 1e-5, weight decay 1e-4, clip 0.1, DETR's augmentation.
# See projects/smca_detr/README.md.
from detectron2.config import LazyCall as L

from detr_variants.layers.smca_attention import SMCADecoder, SMCADecoderLayer
from detr_variants.layers.smca_conv_encoder import CrossScaleConvEncoder, CrossScaleConvEncoderLayer
from detr_variants.modeling.meta_arch.smca_detr import ReleasedMultiScaleSMCADETR

from .smca_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .smca_r50_50ep import model as _single

model = L(ReleasedMultiScaleSMCADETR)(
    backbone=_single.backbone,
    in_features=["res3", "res4", "res5"],
    num_feature_levels=4,  # strides 8, 16, 32, 64
    level_embed=True,
    extra_mask_source="previous",  # P6's padding mask is C5's, resized
    encoder=L(CrossScaleConvEncoder)(
        layer=L(CrossScaleConvEncoderLayer)(
            d_model=256,
            num_levels="${...num_feature_levels}",
            dim_feedforward=1024,
            dropout=0.1,
            kernel_size=7,
            shared_cross_scale=True,
        ),
        num_layers=6,
    ),
    decoder=L(SMCADecoder)(
        layer=L(SMCADecoderLayer)(
            d_model=256,
            nhead=8,
            dim_feedforward=1024,
            dropout=0.1,
            num_levels="${...num_feature_levels}",
            scale_type="independent",  # --dynamic_scale type3
            multi_head_modulation=True,
            beta=8.0,  # --smooth 8
            scale_selection=True,
            level_distance_factors=[0.5, 0.5, 1.0, 2.0],
        ),
        num_layers=6,
        norm=_single.decoder.norm,
    ),
    position_embedding=_single.position_embedding,
    num_queries=300,
    hidden_dim=256,
    num_classes=80,
    classification="sigmoid",
    test_topk=100,  # the released PostProcess keeps 500 (unsorted) of queries x 92 columns
    criterion=_single.criterion,
    pixel_mean=_single.pixel_mean,
    pixel_std=_single.pixel_std,
    input_format="RGB",
)
model.backbone.out_features = ["res3", "res4", "res5"]

dataloader.train.total_batch_size = 8  # 1 image per GPU x 8 GPUs ("batch8" in the log names)
train.output_dir = "./output/smca_ms_released_r50_50ep"
