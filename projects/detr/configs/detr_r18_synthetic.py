# DETR on the embedded synthetic_shapes dataset, sized for 2 CPU cores (configs/common/synthetic.py:
# R18 from scratch, 3+3 layers, FFN 1024, 50 queries, batch 8, 700 iterations). Every
# *_r18_synthetic config uses the same settings, so their COCO APs compare directly.
from ....configs.common.synthetic import dataloader, lr_multiplier, make_cpu_sized
from .detr_r50_500ep import model, optimizer, train

make_cpu_sized(model, train, output_dir="./output/detr_r18_synthetic")
