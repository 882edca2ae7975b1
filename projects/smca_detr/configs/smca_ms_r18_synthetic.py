# Multi-scale SMCA on synthetic_shapes with the shared CPU-sized settings of every *_r18_synthetic
# config (configs/common/synthetic.py). The encoder keeps the paper's shape (intra-scale blocks
# around one multi-scale block) with as many layers as the other synthetic configs (3).
from ....configs.common.synthetic import dataloader, lr_multiplier, make_cpu_sized
from .smca_ms_r50_50ep import model, optimizer, train

make_cpu_sized(model, train, output_dir="./output/smca_ms_r18_synthetic")
model.encoder.layout = "intra-multi-intra"
