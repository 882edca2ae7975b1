from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from detr_variants.data import (
    DetrDatasetMapper,
    build_resumable_train_loader,
    detr_test_augmentations,
    detr_train_augmentations,
    flip_resize_augmentations,
)


def detr_dataloader(
    *,
    train_names: str,
    test_names: str,
    min_sizes,
    max_size: int,
    crop_resize_sizes=None,
    crop_size=None,
    test_min_size: int,
    total_batch_size: int,
    num_workers: int,
):
    """``dataloader.{train,test,evaluator}`` of DETR's data pipeline on registered datasets.

    Training uses every image, including those without objects (as DETR), with DETR's
    augmentation (:func:`detr_train_augmentations`: flip, multi-scale resize, or a resize + random
    crop + resize), or without its crop branch when no crop sizes are given
    (:func:`flip_resize_augmentations`); test resizes the short side to ``test_min_size``.
    Images are RGB.
    """
    if (crop_size is None) != (crop_resize_sizes is None):
        raise ValueError("give both crop_resize_sizes and crop_size (DETR's crops) or neither")
    if crop_size is None:
        augmentations = L(flip_resize_augmentations)(min_sizes=list(min_sizes), max_size=max_size)
    else:
        augmentations = L(detr_train_augmentations)(
            min_sizes=list(min_sizes),
            max_size=max_size,
            crop_resize_sizes=list(crop_resize_sizes),
            crop_size=list(crop_size),
        )
    dataloader = OmegaConf.create()
    # build_detection_train_loader's arguments; the order continues exactly after --resume.
    dataloader.train = L(build_resumable_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train_names, filter_empty=False),
        mapper=L(DetrDatasetMapper)(
            is_train=True,
            augmentations=augmentations,
            image_format="RGB",
        ),
        total_batch_size=total_batch_size,
        num_workers=num_workers,
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test_names, filter_empty=False),
        mapper=L(DetrDatasetMapper)(
            is_train=False,
            augmentations=L(detr_test_augmentations)(min_size=test_min_size, max_size=max_size),
            image_format="RGB",
        ),
        num_workers=num_workers,
    )
    dataloader.evaluator = L(COCOEvaluator)(
        dataset_name="${..test.dataset.names}",
        use_fast_impl=False,  # the fast COCOeval needs detectron2's compiled _C
    )
    return dataloader
