"""Dataset mapper for set-prediction training: read, validate, augment, convert to ``Instances``.

Every input ends in a correct sample, a logged skip or an error that names the file and the
problem:

- an unreadable image (missing, truncated, a mode with no 8-bit range) is skipped with a warning
  in training (detectron2's ``MapDataset`` then draws another image) and raises in evaluation; a
  missing image directory, or ``max_consecutive_failures`` unreadable images in a row, raise an
  ``IOError`` naming the directory (a wrong image root);
- a malformed annotation (no or non-numeric box, wrong length, NaN/inf, unknown or relative
  ``bbox_mode``, missing or non-integer category) raises a ``ValueError`` naming the file and the
  annotation's index; crowd regions are ignored, as the official DETR does;
- degenerate or out-of-image boxes are dropped with a warning, boxes that stick out are clipped,
  and boxes that augmentation shrinks below one pixel a side are dropped;
- the evaluation mapper throws annotations away without reading them.

Images without objects are kept: the set criterion handles them. ``segmentation`` and
``keypoints`` are dropped unless masks are asked for, as detectron2's ``DatasetMapper`` does
(transforming polygons through a crop needs ``shapely``).
"""

import copy
import logging
import math
import numbers
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_every_n_seconds

from .image_io import read_image

logger = logging.getLogger(__name__)

# Coordinates per box for each absolute mode (relative modes cannot be converted without the
# image size, and detectron2 refuses them).
_BOX_LENGTHS = {BoxMode.XYXY_ABS: 4, BoxMode.XYWH_ABS: 4, BoxMode.XYWHA_ABS: 5}


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _box_xyxy(ann: Dict) -> List[float]:
    """The annotation's box as four finite XYXY_ABS floats; raises ValueError saying why not."""
    if "bbox" not in ann or ann["bbox"] is None:
        raise ValueError("no 'bbox'")
    if "bbox_mode" not in ann:
        raise ValueError("no 'bbox_mode'")
    try:
        mode = BoxMode(ann["bbox_mode"])
    except (ValueError, TypeError):
        raise ValueError(f"unknown bbox_mode {ann['bbox_mode']!r}") from None
    if mode not in _BOX_LENGTHS:
        raise ValueError(f"relative bbox_mode {mode.name} is not supported")
    bbox = ann["bbox"]
    if isinstance(bbox, np.ndarray):
        if bbox.ndim != 1:
            raise ValueError(f"bbox must be a flat sequence, got an array of shape {bbox.shape}")
        bbox = bbox.tolist()
    if not isinstance(bbox, (list, tuple)):
        raise ValueError(f"bbox must be a list of numbers, got {type(bbox).__name__}")
    if len(bbox) != _BOX_LENGTHS[mode]:
        raise ValueError(
            f"bbox {bbox!r} has {len(bbox)} values, {mode.name} needs {_BOX_LENGTHS[mode]}"
        )
    if not all(_is_real(v) for v in bbox):
        raise ValueError(f"bbox {bbox!r} has non-numeric values")
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"bbox {bbox!r} has NaN or infinite values")
    return [float(v) for v in BoxMode.convert([float(v) for v in bbox], mode, BoxMode.XYXY_ABS)]


def _category(ann: Dict) -> int:
    """The annotation's category as a non-negative int; raises ValueError for anything else."""
    cls = ann.get("category_id")
    if not _is_real(cls) or not math.isfinite(cls) or cls != int(cls) or cls < 0:
        raise ValueError(f"category_id must be a non-negative integer, got {cls!r}")
    return int(cls)


def valid_annotations(
    annotations: List[Dict], image_hw, file_name: str = "", keep_masks: bool = False
) -> List[Dict]:
    """Validates a record's annotations and returns the usable ones, in XYXY_ABS.

    Crowd regions are ignored (the official DETR trains on ``iscrowd == 0`` only); boxes with
    non-positive size or no overlap with the image are dropped, and the rest are clipped to the
    image, with a warning for each change.

    Args:
        annotations: detectron2 annotation dicts.
        image_hw: ``(height, width)`` of the image as read.
        file_name: named in warnings and errors.
        keep_masks: keep ``segmentation`` (otherwise it and ``keypoints`` are dropped).

    Raises:
        ValueError: naming the file, the annotation's index and the problem, for a malformed
            annotation.
    """
    if not isinstance(annotations, (list, tuple)):
        raise ValueError(f"{file_name}: 'annotations' must be a list, got {type(annotations)}")
    h, w = image_hw
    kept = []
    for index, ann in enumerate(annotations):
        try:
            if not isinstance(ann, dict):
                raise ValueError(f"expected a dict, got {type(ann).__name__}")
            if ann.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = _box_xyxy(ann)
            out = {"bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS}
            out["category_id"] = _category(ann)
            if keep_masks:
                if "segmentation" not in ann:
                    raise ValueError("no 'segmentation' although masks are asked for")
                out["segmentation"] = ann["segmentation"]
        except ValueError as e:
            raise ValueError(f"{file_name}: annotation {index}: {e}") from None
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
            out["bbox"] = [cx0, cy0, cx1, cy1]
        kept.append(out)
    return kept


def _check_image_size(dataset_dict: Dict, image: np.ndarray, file_name) -> None:
    """Fills in a missing ``height`` / ``width`` and refuses ones that disagree with the image
    (detectron2's ``check_image_size`` raises a bare ``KeyError`` when only one is given)."""
    h, w = image.shape[:2]
    expected = (dataset_dict.get("height", h), dataset_dict.get("width", w))
    if expected != (h, w):
        raise ValueError(
            f"{file_name}: the record says height x width {expected[0]}x{expected[1]}, the image "
            f"is {h}x{w}"
        )
    dataset_dict["height"], dataset_dict["width"] = h, w


class DetrDatasetMapper:
    """Maps a detectron2 dataset dict to the model's input format.

    Args:
        is_train: keep and transform annotations (training) or drop them (inference).
        augmentations: detectron2 augmentations, e.g. :func:`detr_train_augmentations`.
        image_format: channel order handed to the model (``"RGB"`` or ``"BGR"``).
        use_instance_mask: keep ``segmentation`` and add ``gt_masks`` (detectron2's name).
        instance_mask_format: ``"polygon"`` or ``"bitmask"``, as detectron2's ``DatasetMapper``.
        max_consecutive_failures: training raises after this many unreadable images in a row.
    """

    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[T.Augmentation],
        image_format: str = "RGB",
        use_instance_mask: bool = False,
        instance_mask_format: str = "polygon",
        max_consecutive_failures: int = 16,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self.max_consecutive_failures = max_consecutive_failures
        self._failures = 0  # consecutive unreadable images (per data-loader worker)

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        file_name = dataset_dict.get("file_name")
        if not isinstance(file_name, (str, os.PathLike)):
            raise ValueError(
                f"dataset dict (image_id {dataset_dict.get('image_id')!r}) has no 'file_name'"
            )
        image = self._read_image(file_name)
        if image is None:
            return None
        annotations = dataset_dict.get("annotations", [])
        dataset_dict = copy.deepcopy({k: v for k, v in dataset_dict.items() if k != "annotations"})
        _check_image_size(dataset_dict, image, file_name)
        if self.is_train:
            annotations = valid_annotations(
                annotations, image.shape[:2], file_name, keep_masks=self.use_instance_mask
            )
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        if min(image.shape[:2]) < 1:
            raise ValueError(f"{file_name}: augmentation gave a {image.shape[:2]} image")
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            dataset_dict["instances"] = self._instances(annotations, transforms, image.shape[:2])
        return dataset_dict

    def _instances(self, annotations, transforms, image_hw):
        """Transforms the boxes (and masks) and drops those below one pixel a side."""
        annotations = [
            utils.transform_instance_annotations(copy.deepcopy(a), transforms, image_hw)
            for a in annotations
        ]
        instances = utils.annotations_to_instances(
            annotations, image_hw, mask_format=self.instance_mask_format
        )
        boxes = instances.gt_boxes
        boxes.clip(image_hw)
        wh = boxes.tensor[:, 2:] - boxes.tensor[:, :2]
        keep = (wh >= 1).all(dim=1)
        if self.use_instance_mask:
            keep &= utils.filter_empty_instances(instances, by_box=False, return_mask=True)[1]
        if not keep.all():
            log_every_n_seconds(
                logging.INFO,
                f"Dropped {int((~keep).sum())} boxes smaller than a pixel after augmentation",
                n=60,
                name=__name__,
            )
        return instances[keep]

    def _read_image(self, file_name) -> Optional[np.ndarray]:
        try:
            image = read_image(file_name, format=self.image_format)
        except IOError as e:
            if not self.is_train:
                raise
            root = os.path.dirname(os.path.abspath(file_name))
            if not os.path.isdir(root):
                raise IOError(
                    f"Image directory {root!r} does not exist ({e}); is the dataset's "
                    "image root right?"
                ) from e
            self._failures += 1
            if self._failures >= self.max_consecutive_failures:
                raise IOError(
                    f"{self._failures} images in a row could not be read, the last under "
                    f"{root!r}; is the dataset's image root right? Last error: {e}"
                ) from e
            logger.warning("Skipping unreadable image: %s", e)
            return None
        self._failures = 0
        return image
