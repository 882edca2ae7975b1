# The embedded synthetic_shapes dataset (generated on first use), with DETR's augmentation
# scaled from COCO's 800-pixel recipe by 224/800 (the images are 224-320 pixels a side).
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from detr_variants.data import (
    DetrDatasetMapper,
    build_resumable_train_loader,
    detr_test_augmentations,
    detr_train_augmentations,
)

dataloader = OmegaConf.create()

# build_detection_train_loader's arguments; the order continues exactly after --resume.
dataloader.train = L(build_resumable_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_shapes_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentations)(
            min_sizes=list(range(144, 225, 16)),
            max_size=373,
            crop_resize_sizes=[112, 140, 168],
            crop_size=[108, 168],
        ),
        image_format="RGB",
    ),
    total_batch_size=8,
    num_workers=2,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_shapes_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=L(detr_test_augmentations)(min_size=224, max_size=373),
        image_format="RGB",
    ),
    num_workers=2,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    use_fast_impl=False,  # the fast COCOeval needs detectron2's compiled _C
)
