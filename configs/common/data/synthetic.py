# The embedded synthetic_shapes dataset (generated on first use), with DETR's augmentation
# scaled from COCO's 800-pixel recipe by 224/800 (the images are 224-320 pixels a side).
from .detr_pipeline import detr_dataloader

dataloader = detr_dataloader(
    train_names="synthetic_shapes_train",
    test_names="synthetic_shapes_val",
    min_sizes=range(144, 225, 16),
    max_size=373,
    crop_resize_sizes=[112, 140, 168],
    crop_size=[108, 168],
    test_min_size=224,
    total_batch_size=8,
    num_workers=2,
)
