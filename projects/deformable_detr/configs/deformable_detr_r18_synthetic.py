# Deformable DETR on synthetic_shapes with exactly the backbone, images, batch, iterations,
# layer counts, FFN size and query count of projects/detr/configs/detr_r18_synthetic.py.
from ....projects.detr.configs.detr_r18_synthetic import dataloader, lr_multiplier
from ....projects.detr.configs.detr_r18_synthetic import model as _detr
from ....projects.detr.configs.detr_r18_synthetic import train as _detr_train
from .deformable_detr_r50_50ep import model, optimizer, train

model.backbone.update(depth=18, norm="BN", freeze_at=0)
model.encoder.num_layers = _detr.encoder.num_layers
model.decoder.num_layers = _detr.decoder.num_layers
model.encoder.layer.dim_feedforward = _detr.encoder.layer.dim_feedforward
model.decoder.layer.dim_feedforward = _detr.decoder.layer.dim_feedforward
model.num_queries = _detr.num_queries
model.num_classes = _detr.num_classes

train.update(_detr_train)
train.output_dir = "./output/deformable_detr_r18_synthetic"
