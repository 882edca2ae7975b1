# SMCA R50 without multi-scale features (Gao et al. 2021, Table 1 "SMCA w/o multi-scale"), the
# released single-scale recipe: DETR's (backbone, 6-layer post-norm encoder, position encoding,
# AdamW 1e-4 with the backbone at 1e-5, weight decay 1e-4, clip 0.1) with 300 queries and a
# 6-layer decoder (FFN 2048) whose co-attention is modulated by per-head Gaussian priors with
# independent width/height scales (released --dynamic_scale type3), beta 8; sigmoid focal loss
# (alpha 0.25, gamma 2) with matcher and loss class/L1/GIoU = 2/5/2 and auxiliary losses,
# 50 epochs with a drop at 40, batch 16 (2 per GPU x 8, the released command).
from detectron2.config import LazyCall as L

from detr_variants.layers.smca_attention import SMCADecoder, SMCADecoderLayer
from detr_variants.modeling.meta_arch.smca_detr import SMCADETR

from ....configs.common.focal_detr import focal_detr_recipe
from ...detr.configs.detr_r50_500ep import dataloader, model, optimizer, train

model.update(
    _target_=SMCADETR,
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
        norm=model.decoder.norm,
    ),
)
lr_multiplier = focal_detr_recipe(model, dataloader, train)
train.output_dir = "./output/smca_r50_50ep"
