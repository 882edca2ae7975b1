"""Your own COCO-format dataset: registration by name from its files, a class-count check, and
DETR's augmentation scaled to the images (``configs/common/data/custom.py`` uses all three).

:func:`register_coco_dataset` is a LazyCall target that returns the name it registered, so a
config that names its dataset through it registers the dataset wherever the config is
instantiated: in every DDP process, in ``--eval-only`` runs and in the tools. Registering a name
again with the same files is a no-op (instantiation happens more than once per process); with
other files it is an error rather than a silent switch of data.
"""

import logging
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets.coco import load_coco_json

from .transforms import detr_test_augmentations, detr_train_augmentations

__all__ = [
    "register_coco_dataset",
    "scaled_detr_train_augmentations",
    "scaled_detr_test_augmentations",
]

logger = logging.getLogger(__name__)

# name -> the model's class count to check the annotation file against (None: no check). Kept
# outside the catalog so that re-registering with another count updates the check.
_expected_classes: Dict[str, Optional[int]] = {}


def _load_checked(name: str, json_file: str, image_root: str) -> List[dict]:
    dicts = load_coco_json(json_file, image_root, name)
    expected = _expected_classes.get(name)
    found = len(MetadataCatalog.get(name).thing_classes)
    if expected is not None and found != expected:
        raise ValueError(
            f"Dataset {name!r} ({json_file}) has {found} categories but the model predicts "
            f"{expected} classes: set model.num_classes={found}."
        )
    return dicts


def register_coco_dataset(
    name: str, json_file: str, image_root: str, num_classes: Optional[int] = None
) -> str:
    """Registers a COCO-format detection dataset (``load_coco_json``, as detectron2's
    ``register_coco_instances``) and returns ``name``.

    Args:
        name: the dataset's name in ``DatasetCatalog`` / ``MetadataCatalog``.
        json_file: the COCO instances json (categories may have id gaps; they are mapped to
            contiguous ids, and back by ``COCOEvaluator``).
        image_root: the directory the images' ``file_name`` are relative to.
        num_classes: the model's class count; when set, loading the dataset raises unless the
            json has exactly that many categories.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist.
        ValueError: ``name`` is already registered with other files.
    """
    json_file = os.path.abspath(os.path.expanduser(str(json_file)))
    image_root = os.path.abspath(os.path.expanduser(str(image_root)))
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset {name!r}: no annotation file {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Dataset {name!r}: no image directory {image_root}")
    if name in DatasetCatalog:
        # as_dict() does not evaluate lazy metadata properties (synthetic_shapes').
        meta = MetadataCatalog.get(name).as_dict()
        registered = (meta.get("json_file"), meta.get("image_root"))
        if registered != (json_file, image_root):
            raise ValueError(
                f"Dataset {name!r} is already registered with json_file={registered[0]}, "
                f"image_root={registered[1]}; cannot register it again with "
                f"json_file={json_file}, image_root={image_root}: use another name."
            )
    else:
        DatasetCatalog.register(name, lambda: _load_checked(name, json_file, image_root))
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco"
        )
        logger.info(f"Registered dataset {name!r}: {json_file}, images in {image_root}")
    _expected_classes[name] = None if num_classes is None else int(num_classes)
    return name


def _scaled(sizes, scale: float) -> List[int]:
    """``sizes`` times ``scale``, rounded, without repeats (a small scale can merge sizes)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return sorted({max(1, round(s * scale)) for s in sizes})


def scaled_detr_train_augmentations(scale: float = 1.0) -> List[T.Augmentation]:
    """DETR's training augmentation (:func:`.detr_train_augmentations`, the official
    ``make_coco_transforms``) with every size of its COCO recipe times ``scale``: shortest
    edge 480..800 step 32, longest at most 1333, crop branch resize 400/500/600 and crop
    384..600. Choose ``scale`` ≈ your images' typical shortest side / 800 (scale 1 is COCO's)."""
    return detr_train_augmentations(
        min_sizes=_scaled(range(480, 801, 32), scale),
        max_size=_scaled([1333], scale)[0],
        crop_resize_sizes=_scaled([400, 500, 600], scale),
        crop_size=_scaled([384, 600], scale),
    )


def scaled_detr_test_augmentations(scale: float = 1.0) -> List[T.Augmentation]:
    """DETR's evaluation resize (shortest edge 800, longest at most 1333) times ``scale``."""
    return detr_test_augmentations(
        min_size=_scaled([800], scale)[0], max_size=_scaled([1333], scale)[0]
    )
