# SMCA R50 single-scale, 108 epochs (Table 1: 42.7 AP). Neither the paper nor the released code
# states the drop epoch of this schedule; we drop at 86, 80% of training like the 50-epoch recipe
# (40/50) and DETR's (400/500).
from ....configs.common.schedule import step_schedule
from .smca_r50_50ep import dataloader, model, optimizer, train

lr_multiplier = step_schedule(total_epochs=108, drop_epochs=[86])
train.epochs = 108
train.output_dir = "./output/smca_r50_108ep"
