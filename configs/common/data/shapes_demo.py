# The demo level `shapes_demo` (detr_variants.data.synthetic.SHAPES_DEMO: 128-160 pixel images,
# 3 classes, at most 4 shapes), with DETR's augmentation scaled from COCO's 800-pixel recipe to
# these images (shortest edge 112-144 for training, 128 at test).
from .detr_pipeline import detr_dataloader

dataloader = detr_dataloader(
    train_names="shapes_demo_train",
    test_names="shapes_demo_val",
    min_sizes=range(112, 145, 16),
    max_size=240,
    crop_resize_sizes=[84, 112],
    crop_size=[67, 112],
    test_min_size=128,
    total_batch_size=8,
    num_workers=1,  # one loader process next to 2 training threads on a 2-core machine
)
