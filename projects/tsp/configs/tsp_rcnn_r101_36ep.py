# TSP-RCNN R101: the R50 recipe with detectron2's MSRA R-101.
from .tsp_rcnn_r50_36ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
train.output_dir = "./output/tsp_rcnn_r101_36ep"
