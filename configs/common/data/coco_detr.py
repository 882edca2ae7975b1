# COCO 2017 with DETR's augmentation (detectron2's builtin registration: $DETECTRON2_DATASETS/coco).
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
    # DETR trains on every image, including those without objects.
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentations)(
            min_sizes=list(range(480, 801, 32)),
            max_size=1333,
            crop_resize_sizes=[400, 500, 600],
            crop_size=[384, 600],
        ),
        image_format="RGB",
    ),
    total_batch_size=32,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=L(detr_test_augmentations)(min_size=800, max_size=1333),
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    use_fast_impl=False,  # the fast COCOeval needs detectron2's compiled _C
)
