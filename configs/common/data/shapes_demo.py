# The demo level `shapes_demo` (detr_variants.data.synthetic.SHAPES_DEMO: 128-160 pixel images,
# 3 classes, at most 4 shapes). Training: flip and a multi-scale resize of the shortest edge to
# 112-144 (DETR's sizes scaled to these images), without DETR's random crops, which slowed
# learning in the demo's few epochs (README "The demo"); test: shortest edge 128.
from .detr_pipeline import detr_dataloader

dataloader = detr_dataloader(
    train_names="shapes_demo_train",
    test_names="shapes_demo_val",
    min_sizes=range(112, 145, 16),
    max_size=240,
    test_min_size=128,
    total_batch_size=4,
    num_workers=1,  # one loader process next to 2 training threads on a 2-core machine
)
