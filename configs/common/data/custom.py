# Your own COCO-format dataset (README "Your own dataset"). Set the json files and image
# directories (dataloader.{train,test}.dataset.names.{json_file,image_root}); they are registered
# as custom_train / custom_val wherever the config is instantiated (every DDP process, the tools),
# and loading checks that the json has model.num_classes categories (TSP-RCNN keeps its count in
# model.roi_heads.num_classes: point num_classes there). DETR's COCO sizes (shortest edge
# 480-800, longest 1333) are multiplied by dataloader.train.mapper.augmentations.scale (the test
# resize follows it): use about your images' shortest side / 800.
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from omegaconf import MISSING, OmegaConf

from detr_variants.data import (
    DetrDatasetMapper,
    register_coco_dataset,
    scaled_detr_test_augmentations,
    scaled_detr_train_augmentations,
)

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names=L(register_coco_dataset)(
            name="custom_train",
            json_file=MISSING,
            image_root=MISSING,
            num_classes="${model.num_classes}",
        ),
        filter_empty=False,  # DETR trains on images without objects too
    ),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(scaled_detr_train_augmentations)(scale=1.0),
        image_format="RGB",
    ),
    total_batch_size=32,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names=L(register_coco_dataset)(
            name="custom_val",
            json_file=MISSING,
            image_root=MISSING,
            num_classes="${model.num_classes}",
        ),
        filter_empty=False,
    ),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=L(scaled_detr_test_augmentations)(
            scale="${....train.mapper.augmentations.scale}"
        ),
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",  # registers it too (the evaluator is built first)
    use_fast_impl=False,  # the fast COCOeval needs detectron2's compiled _C
)
