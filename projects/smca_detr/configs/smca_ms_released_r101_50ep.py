# The released multi-scale SMCA R101 (45.7 AP at 50 epochs, log
# 8_16_32_64_encoder_16_16_32_64_conv_batch8_with_fc_bidirectional_encoder_no_shared_cross_resnet101):
# the R50 recipe with a ResNet-101 (torchvision weights; see projects/conditional_detr/README.md for
# writing them) and, as the log's name says, one down and one up conv per pair of levels (the
# structure of the zip's models/transformer.py). Its n_parameters (60,010,618 trainable) is exactly
# that with 7x7 depthwise convs and 6 encoder layers.
from .smca_ms_released_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.encoder.layer.shared_cross_scale = False
train.init_checkpoint = "./pretrained/R-101-torchvision.pth"
train.output_dir = "./output/smca_ms_released_r101_50ep"
