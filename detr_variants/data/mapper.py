"""Dataset mapper for set-prediction training: read, validate, augment, convert to ``Instances``.

Bad input never turns into a silently wrong sample: an unreadable image is skipped with a
warning in training (detectron2's ``MapDataset`` then draws another image) and raises in
evaluation; degenerate or out-of-image boxes are dropped with a warning; boxes that stick out
of the image are clipped to it. Images without objects are kept: the set criterion handles them.
"""

import copy
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_every_n_seconds

logger = logging.getLogger(__name__)


def valid_annotations(annotations: List[Dict], image_hw, file_name: str = "") -> List[Dict]:
    """Drops crowd regions and boxes with non-positive size or no overlap with the image, and
    clips the rest to the image, logging what it changed."""
    h, w = image_hw
    kept = []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        if not (x1 > x0 and y1 > y0):
            logger.warning(
                "Skipping a box with non-positive width or height %s in %s", ann["bbox"], file_name
            )
            continue
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
        if not (cx1 > cx0 and cy1 > cy0):
            logger.warning(
                "Skipping a box outside the %dx%d image %s in %s", w, h, ann["bbox"], file_name
            )
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            log_every_n_seconds(
                logging.WARNING,
                f"Clipping boxes that extend outside the image, e.g. "
                f"{ann['bbox']} in {file_name} ({w}x{h})",
                n=60,
                name=__name__,
            )
            ann = {**ann, "bbox": [cx0, cy0, cx1, cy1], "bbox_mode": BoxMode.XYXY_ABS}
        kept.append(ann)
    return kept


class DetrDatasetMapper:
    """Maps a detectron2 dataset dict to the model's input format.

    Args:
        is_train: keep and transform annotations (training) or drop them (inference).
        augmentations: detectron2 augmentations, e.g. :func:`detr_train_augmentations`.
        image_format: channel order handed to the model (``"RGB"`` or ``"BGR"``).
    """

    def __init__(
        self, *, is_train: bool, augmentations: Sequence[T.Augmentation], image_format: str = "RGB"
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict["file_name"])
        if image is None:
            return None
        utils.check_image_size(dataset_dict, image)
        annotations = valid_annotations(
            dataset_dict.pop("annotations", []), image.shape[:2], dataset_dict["file_name"]
        )
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            return dataset_dict
        annotations = [
            utils.transform_instance_annotations(a, transforms, image.shape[:2])
            for a in annotations
        ]
        instances = utils.annotations_to_instances(annotations, image.shape[:2])
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict

    def _read_image(self, file_name: str) -> Optional[np.ndarray]:
        try:
            return utils.read_image(file_name, format=self.image_format)
        except Exception as e:  # PIL raises several types for missing or corrupt files
            if not self.is_train:
                raise IOError(f"Cannot read image {file_name!r}: {e}") from e
            logger.warning("Skipping unreadable image %r: %s", file_name, e)
            return None
