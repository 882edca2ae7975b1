"""``synthetic_shapes``: small, seed-generated detection datasets in COCO format.

A :class:`ShapesSpec` says what to generate (classes and their category ids, image counts and
sizes, object sizes and counts, clutter, the fractions of grayscale, crowd and empty images, the
seed); :data:`SYNTHETIC_SHAPES` is the default, small enough to train a DETR variant for a few
minutes on 2 CPU cores and hard enough that COCO AP separates a good detector from a poor one.
Its annotations carry what COCO's carry: a polygon ``segmentation`` per shape, some ``iscrowd``
regions with uncompressed RLE masks, category ids with gaps, images without objects, and some
grayscale JPEGs. Another dataset is a few lines, e.g.
``register_synthetic_shapes(spec=dataclasses.replace(SYNTHETIC_SHAPES, name="big", ...))``;
:data:`SHAPES_DEMO` (``shapes_demo``) is the easier level that ``make demo`` trains on.

The data is generated on first use (not at import or registration time) into
``$DETR_VARIANTS_DATASETS/<spec.name>`` (default root: ``~/.cache/detr_variants``)::

    <dir>/VERSION                  fingerprint of the generator and the spec
    <dir>/train/000000.jpg ...
    <dir>/val/000000.jpg ...
    <dir>/annotations/{train,val}.json

A changed fingerprint regenerates the directory (see :mod:`.dataset_cache`). The registered
metadata exposes ``json_file`` as a property that generates the data, so
``COCOEvaluator(name, ...)`` works even before the first ``DatasetCatalog.get(name)``.
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets.coco import load_coco_json

from . import shapes_render
from .dataset_cache import build_once
from .shapes_render import SHAPES, render_image

__all__ = [
    "ShapesSpec",
    "SYNTHETIC_SHAPES",
    "SYNTHETIC_CLASSES",
    "SHAPES_DEMO",
    "SPLITS",
    "dataset_dir",
    "mask_to_rle",
    "generate_synthetic_shapes",
    "ensure_generated",
    "register_synthetic_shapes",
]

logger = logging.getLogger(__name__)

# Bump whenever the rendering or the written files change, so cached datasets are regenerated.
_GENERATOR_VERSION = 2
_ENV_ROOT = "DETR_VARIANTS_DATASETS"
_DEFAULT_ROOT = os.path.join("~", ".cache", "detr_variants")
SPLITS = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}  # part of each image's RNG seed
_JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Everything that decides a generated dataset's content.

    Attributes:
        name: directory name, and the registered datasets ``<name>_train`` / ``<name>_val``.
        classes: shape names (from ``shapes_render.SHAPES``), one class each.
        category_ids: the COCO category id of each class, increasing (gaps allowed, as COCO's
            1..90: detectron2 maps them to contiguous ids and ``COCOEvaluator`` maps back).
        num_train, num_val: images per split.
        seed: generation seed.
        image_size: ``(lo, hi)``: width and height are each uniform in it, inclusive.
        min_objects, max_objects: shapes attempted per image (some are dropped when crowded).
        side_ranges: sqrt(box area) ranges of the size buckets, pixels.
        size_probs: sampling probability of each bucket.
        clutter: scales the number of non-object lines and blobs (0: none).
        max_overlap_iou: the most a shape's box may overlap an earlier one's (IoU; 0: disjoint).
        empty_fraction: probability of an image without objects.
        grayscale_fraction: probability of a grayscale (single-channel) JPEG.
        crowd_fraction: probability of a crowd region (a cluster of tiny shapes, ``iscrowd``).
    """

    name: str = "synthetic_shapes"
    classes: Tuple[str, ...] = SHAPES
    category_ids: Tuple[int, ...] = (1, 3, 4, 7, 9, 12)
    num_train: int = 2000
    num_val: int = 250
    seed: int = 0
    image_size: Tuple[int, int] = (224, 320)
    min_objects: int = 1
    max_objects: int = 8
    # COCO's small / medium / large buckets (32 and 96 px); large objects are dropped more
    # often when they do not fit, so they are over-sampled to end near 30/45/25 %.
    side_ranges: Tuple[Tuple[float, float], ...] = ((10, 31), (33, 95), (97, 150))
    size_probs: Tuple[float, ...] = (0.30, 0.45, 0.25)
    clutter: float = 1.0
    max_overlap_iou: float = 0.3
    empty_fraction: float = 0.02
    grayscale_fraction: float = 0.03
    crowd_fraction: float = 0.05

    def __post_init__(self):
        problems = []
        if not set(self.classes) <= set(SHAPES):
            problems.append(f"classes must be among {SHAPES}")
        if len(self.category_ids) != len(self.classes):
            problems.append("one category id per class")
        if list(self.category_ids) != sorted(set(self.category_ids)) or min(self.category_ids) < 1:
            problems.append("category ids must be increasing and positive")
        if len(self.side_ranges) != len(self.size_probs) or abs(sum(self.size_probs) - 1) > 1e-6:
            problems.append("size_probs: one per side range, summing to 1")
        if not 1 <= self.image_size[0] <= self.image_size[1]:
            problems.append("image_size must be (lo, hi) with 1 <= lo <= hi")
        if not 0 <= self.min_objects <= self.max_objects:
            problems.append("need 0 <= min_objects <= max_objects")
        fractions = ("max_overlap_iou", "empty_fraction", "grayscale_fraction", "crowd_fraction")
        for f, top in [("clutter", 10)] + [(f, 1) for f in fractions]:
            if not 0 <= getattr(self, f) <= top:
                problems.append(f"{f} out of range")
        if problems:
            raise ValueError(f"Invalid ShapesSpec {self.name!r}: " + "; ".join(problems))

    def fingerprint(self) -> str:
        """Hashes the spec, the generator version and the renderer's constants."""
        params = {
            "version": _GENERATOR_VERSION,
            "spec": dataclasses.asdict(self),
            "jpeg_quality": _JPEG_QUALITY,
            "render": {
                k: getattr(shapes_render, k)
                for k in dir(shapes_render)
                if k.isupper() and isinstance(getattr(shapes_render, k), (int, float, tuple))
            },
        }
        return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


SYNTHETIC_SHAPES = ShapesSpec()
SYNTHETIC_CLASSES = SYNTHETIC_SHAPES.classes

# The demo level (``make demo``): sized so that a detector trained from scratch for 10 minutes on
# 2 CPU cores finds the objects. Three classes, smaller images, at most 4 medium shapes (a few
# small ones, so COCO's small bucket exists) whose boxes do not overlap, a tenth of the clutter
# (disjoint shapes and less clutter took the 900-iteration run from AP 21.2 to 43.0: README "The
# demo"); the same generator, COCO format and real-data traits (polygons, crowd regions, id gaps,
# empty and grayscale images).
SHAPES_DEMO = ShapesSpec(
    name="shapes_demo",
    classes=("circle", "square", "triangle"),
    category_ids=(1, 3, 7),
    num_train=800,
    num_val=100,
    image_size=(128, 160),
    max_objects=4,
    side_ranges=((24, 40), (40, 64), (64, 96)),
    size_probs=(0.30, 0.45, 0.25),
    clutter=0.1,
    max_overlap_iou=0.0,
)


def dataset_dir(root: Optional[str] = None, spec: ShapesSpec = SYNTHETIC_SHAPES) -> str:
    """Returns the dataset directory of ``spec``.

    Args:
        root: datasets root; ``None`` means ``$DETR_VARIANTS_DATASETS`` or
            ``~/.cache/detr_variants`` (resolved now, not at registration).
    """
    if root is None:
        root = os.environ.get(_ENV_ROOT) or _DEFAULT_ROOT
    return os.path.join(os.path.abspath(os.path.expanduser(root)), spec.name)


def mask_to_rle(mask: np.ndarray) -> Dict:
    """COCO's uncompressed RLE of a bool mask (column-major runs, starting with zeros), as COCO
    stores crowd regions."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def _annotation(obj: Dict, spec: ShapesSpec, image_id: int, ann_id: int) -> Dict:
    x, y, bw, bh = obj["bbox"]
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": spec.category_ids[obj["category"]],
        "bbox": [x, y, bw, bh],
        # Box area: COCOeval buckets small/medium/large by this field, and the spec's side
        # ranges are box sizes.
        "area": bw * bh,
        "iscrowd": int("mask" in obj),
    }
    if "mask" in obj:
        ann["segmentation"] = mask_to_rle(obj["mask"])
    else:
        ann["segmentation"] = [np.round(obj["polygon"], 2).ravel().tolist()]
    return ann


def _write_split(out_dir: str, split: str, spec: ShapesSpec) -> int:
    """Renders and writes one split's images and COCO json; returns #annotations."""
    os.makedirs(os.path.join(out_dir, split))
    images, annotations = [], []
    for i in range(spec.num_train if split == "train" else spec.num_val):
        # One generator per image: the content of image i does not depend on
        # how many images there are or in which order they are rendered.
        rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], i])
        img, objects = render_image(spec, rng)
        file_name = f"{i:06d}.jpg"
        path = os.path.join(out_dir, split, file_name)
        if not cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]):
            raise OSError(f"Could not write {path}")
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]}
        )
        for obj in objects:
            annotations.append(_annotation(obj, spec, image_id, len(annotations) + 1))
    coco = {
        "info": {
            "description": f"{spec.name} {split}",
            "version": spec.fingerprint(),
            "seed": spec.seed,
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": n, "supercategory": "shape"}
            for cid, n in zip(spec.category_ids, spec.classes)
        ],
    }
    with open(os.path.join(out_dir, "annotations", f"{split}.json"), "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    return len(annotations)


def generate_synthetic_shapes(
    out_dir: str, spec: ShapesSpec = SYNTHETIC_SHAPES, **overrides
) -> str:
    """Generates ``spec``'s dataset into ``out_dir`` unless it is already there.

    Safe to call from several processes at once (see :func:`.dataset_cache.build_once`).

    Args:
        out_dir: dataset directory (see the module docstring for its layout).
        spec: what to generate.
        overrides: ``ShapesSpec`` fields replacing ``spec``'s, e.g. ``num_train=16``.

    Returns:
        ``out_dir`` as an absolute path.
    """
    spec = dataclasses.replace(spec, **overrides)
    out_dir = os.path.abspath(out_dir)
    start = time.perf_counter()

    def build(tmp_dir):
        os.makedirs(os.path.join(tmp_dir, "annotations"))
        num = sum(_write_split(tmp_dir, split, spec) for split in SPLITS)
        logger.info(
            f"Generated {spec.name} in {out_dir}: {spec.num_train} train + {spec.num_val} val "
            f"images, {num} annotations, seed {spec.seed}, in {time.perf_counter() - start:.1f} s."
        )

    build_once(out_dir, spec.fingerprint(), build)
    return out_dir


def ensure_generated(split: str, root: Optional[str] = None, spec=SYNTHETIC_SHAPES) -> str:
    """Generates ``spec``'s dataset if needed and returns the split's COCO json path."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    out_dir = generate_synthetic_shapes(dataset_dir(root, spec), spec)
    return os.path.join(out_dir, "annotations", f"{split}.json")


class _ShapesMetadata(Metadata):
    """Metadata whose paths resolve lazily; reading ``json_file`` generates the data.

    This lets ``COCOEvaluator`` (which opens ``json_file`` in its constructor) work before
    anything has called ``DatasetCatalog.get``. ``as_dict()`` does not list the two paths.
    """

    @property
    def json_file(self) -> str:
        return ensure_generated(self.split, self.dataset_root, self.spec)

    @property
    def image_root(self) -> str:
        return os.path.join(dataset_dir(self.dataset_root, self.spec), self.split)


def _load_split(name: str, split: str, root: Optional[str], spec: ShapesSpec) -> List[dict]:
    json_file = ensure_generated(split, root, spec)
    image_root = os.path.join(os.path.dirname(os.path.dirname(json_file)), split)
    return load_coco_json(json_file, image_root, name)


_registered: Dict[str, tuple] = {}  # dataset name -> (root, spec)


def register_synthetic_shapes(
    root: Optional[str] = None, spec: ShapesSpec = SYNTHETIC_SHAPES, **overrides
) -> None:
    """Registers ``<spec.name>_train`` / ``<spec.name>_val`` (COCO format, ``load_coco_json``).

    Cheap: nothing is generated until the data (or the metadata's ``json_file``) is first used.
    Calling it again with the same arguments is a no-op; with others it replaces the earlier
    registration.

    Args:
        root: datasets root; ``None`` resolves ``$DETR_VARIANTS_DATASETS`` (or
            ``~/.cache/detr_variants``) at use time.
        spec: the dataset; the default is ``synthetic_shapes``.
        overrides: ``ShapesSpec`` fields replacing ``spec``'s (tests use small datasets).
    """
    spec = dataclasses.replace(spec, **overrides)
    for split in SPLITS:
        name = f"{spec.name}_{split}"
        if _registered.get(name) == (root, spec) and name in DatasetCatalog:
            continue
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda n=name, s=split: _load_split(n, s, root, spec))
        MetadataCatalog[name] = _ShapesMetadata(name=name)
        MetadataCatalog.get(name).set(
            split=split,
            dataset_root=root,
            spec=spec,
            evaluator_type="coco",
            # Exactly as load_coco_json computes them (classes in category-id order), since
            # detectron2 metadata refuses to be set to a different value.
            thing_classes=list(spec.classes),
            thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(spec.category_ids)},
        )
        _registered[name] = (root, spec)
