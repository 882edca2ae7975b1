# Single-scale SMCA on synthetic_shapes with exactly the backbone, images, batch, iterations,
# schedule, layer counts, FFN size and query count of projects/detr/configs/detr_r18_synthetic.py,
# so the APs compare directly.
from ....projects.detr.configs.detr_r18_synthetic import dataloader, lr_multiplier
from ....projects.detr.configs.detr_r18_synthetic import model as _detr
from ....projects.detr.configs.detr_r18_synthetic import optimizer as _detr_optimizer
from ....projects.detr.configs.detr_r18_synthetic import train as _detr_train
from .smca_r50_50ep import model, optimizer, train

model.backbone.update(depth=_detr.backbone.depth, norm=_detr.backbone.norm, freeze_at=_detr.backbone.freeze_at)
model.encoder.num_layers = _detr.encoder.num_layers
model.encoder.layer.dim_feedforward = _detr.encoder.layer.dim_feedforward
model.decoder.num_layers = _detr.decoder.num_layers
model.decoder.layer.dim_feedforward = _detr.decoder.layer.dim_feedforward
model.num_queries = _detr.num_queries
model.num_classes = _detr.num_classes

optimizer.lr = _detr_optimizer.lr
train.update(_detr_train)
train.output_dir = "./output/smca_r18_synthetic"
