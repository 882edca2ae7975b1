# TSP-FCOS on the embedded synthetic_shapes dataset, sized for 2 CPU cores, with exactly the
# backbone (R18 from scratch, BatchNorm), images, batch (8), iterations (700) and schedule of
# projects/detr/configs/detr_r18_synthetic.py, and its encoder's size (d 256, 3 layers, FFN
# 1024; pre-norm as TSP). The FPN is 128 channels wide (the FCOS towers would otherwise cost 3x
# the backbone) and 300 FoIs are selected (700 would be a third of a 256-px image's locations).
# The optimiser is TSP's (SGD 0.01 / AdamW 1e-4, clipping 0.01 on the transformer only).
from ....configs.common.pixels import TORCHVISION_RGB as _TORCHVISION_RGB
from ....projects.detr.configs.detr_r18_synthetic import dataloader, lr_multiplier, train
from ....projects.detr.configs.detr_r18_synthetic import model as _detr
from .tsp_fcos_r50_36ep import model, optimizer

model.backbone.bottom_up.update(
    depth=_detr.backbone.depth,
    norm=_detr.backbone.norm,
    freeze_at=_detr.backbone.freeze_at,
    stride_in_1x1=False,
)
model.backbone.out_channels = 128
model.backbone.top_block.norm = "BN"
model.hidden_dim = _detr.hidden_dim
model.encoder.num_layers = _detr.encoder.num_layers
model.encoder.layer.dim_feedforward = _detr.encoder.layer.dim_feedforward
model.num_fois = 300
model.num_classes = _detr.num_classes
model.update(**_TORCHVISION_RGB)  # as the from-scratch R18 of every *_r18_synthetic config

train.clip_grad = dict(enabled=True, max_norm=0.01, params="encoder.")
train.output_dir = "./output/tsp_fcos_r18_synthetic"
