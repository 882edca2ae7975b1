# DETR R101 (official release detr-r101): the R50 recipe with a ResNet-101 (torchvision weights;
# see projects/conditional_detr/README.md for writing them: detectron2's model zoo has R50 only).
from .detr_r50_500ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
train.init_checkpoint = "./pretrained/R-101-torchvision.pth"
train.output_dir = "./output/detr_r101_500ep"
