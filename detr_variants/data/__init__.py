from .custom import (
    register_coco_dataset,
    scaled_detr_test_augmentations,
    scaled_detr_train_augmentations,
)
from .mapper import DetrDatasetMapper, valid_annotations
from .synthetic import SHAPES_DEMO, register_synthetic_shapes
from .train_loader import ResumableTrainLoader, build_resumable_train_loader
from .transforms import (
    RandomChoice,
    detr_test_augmentations,
    detr_train_augmentations,
    flip_resize_augmentations,
)

register_synthetic_shapes()
register_synthetic_shapes(spec=SHAPES_DEMO)

__all__ = [
    "DetrDatasetMapper",
    "valid_annotations",
    "register_synthetic_shapes",
    "register_coco_dataset",
    "scaled_detr_train_augmentations",
    "scaled_detr_test_augmentations",
    "RandomChoice",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "detr_test_augmentations",
    "detr_train_augmentations",
    "flip_resize_augmentations",
]
