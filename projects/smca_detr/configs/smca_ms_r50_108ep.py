# Multi-scale SMCA R50, 108 epochs (Table 1/4: 45.6 AP). The drop epoch is not stated in the
# paper or the released code; we drop at 86 (80% of training, as 40/50).
from ....configs.common.schedule import step_schedule
from .smca_ms_r50_50ep import dataloader, model, optimizer, train

lr_multiplier = step_schedule(total_epochs=108, drop_epochs=[86])
train.epochs = 108
train.output_dir = "./output/smca_ms_r50_108ep"
