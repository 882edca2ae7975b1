# COCO 2017 with DETR's augmentation (detectron2's builtin registration: $DETECTRON2_DATASETS/coco).
from .detr_pipeline import detr_dataloader

dataloader = detr_dataloader(
    train_names="coco_2017_train",
    test_names="coco_2017_val",
    min_sizes=range(480, 801, 32),
    max_size=1333,
    crop_resize_sizes=[400, 500, 600],
    crop_size=[384, 600],
    test_min_size=800,
    total_batch_size=32,
    num_workers=4,
)
