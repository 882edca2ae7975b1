# Conditional DETR on synthetic_shapes with the shared CPU-sized settings of every *_r18_synthetic
# config (configs/common/synthetic.py), so its AP compares directly with detr_r18_synthetic's.
from ....configs.common.synthetic import dataloader, lr_multiplier, make_cpu_sized
from .conditional_detr_r50_50ep import model, optimizer, train

make_cpu_sized(model, train, output_dir="./output/conditional_detr_r18_synthetic")
