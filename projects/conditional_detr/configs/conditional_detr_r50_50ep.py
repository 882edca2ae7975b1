# Conditional DETR R50 (Meng et al. 2021), the official COCO recipe: DETR's (backbone, 6-layer
# post-norm encoder, position encoding, AdamW 1e-4 with the backbone at 1e-5, weight decay 1e-4,
# clip 0.1) with the conditional decoder (6 layers, FFN 2048), 300 queries, sigmoid focal loss
# (alpha 0.25, gamma 2) with matcher and loss class/L1/GIoU = 2/5/2 and auxiliary losses,
# 50 epochs with a drop at 40, batch 16 (2 per GPU x 8).
from detectron2.config import LazyCall as L

from detr_variants.layers.conditional_attention import ConditionalDecoder, ConditionalDecoderLayer
from detr_variants.modeling.meta_arch.conditional_detr import ConditionalDETR

from ....configs.common.focal_detr import focal_detr_recipe
from ...detr.configs.detr_r50_500ep import dataloader, model, optimizer, train

model.update(
    _target_=ConditionalDETR,
    decoder=L(ConditionalDecoder)(
        layer=L(ConditionalDecoderLayer)(d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1),
        num_layers=6,
        norm=model.decoder.norm,
    ),
)
lr_multiplier = focal_detr_recipe(model, dataloader, train)
train.output_dir = "./output/conditional_detr_r50_50ep"
