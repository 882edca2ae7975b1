"""Your own COCO-format dataset (README "Your own dataset"): registration, the class-count
check, the scaled augmentation, and the README's config and commands followed literally on a small
dataset (gaps in category ids, a crowd region, an empty and a grayscale image), fine-tuning from a
checkpoint trained for another class count."""

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog

from detr_variants.checkpoint import Checkpointer
from detr_variants.data import (
    detr_test_augmentations,
    detr_train_augmentations,
    register_coco_dataset,
    scaled_detr_test_augmentations,
    scaled_detr_train_augmentations,
)
from detr_variants.engine.lazy_train import apply_overrides, build_train_loader, evaluate
from detr_variants.model_zoo import get_config
from helpers import tiny_config, write_small_coco


@pytest.fixture(scope="session")
def my_data_project(tmp_path_factory):
    """A directory holding datasets/my_data laid out as the README says (6 train, 3 val images)."""
    root = tmp_path_factory.mktemp("my_project")
    write_small_coco(str(root / "datasets" / "my_data"), "train", 6, seed=0)
    write_small_coco(str(root / "datasets" / "my_data"), "val", 3, seed=1)
    return root


def readme_block(repo_root, first_line):
    """The README's fenced code block that starts with ``first_line``."""
    text = open(os.path.join(repo_root, "README.md")).read()
    blocks = re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README has {len(found)} blocks starting with {first_line!r}"
    return found[0]


class SkippedParameters(logging.Handler):
    """Collects the names detectron2's checkpointer skips for their shape."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        m = re.search(r"Skip loading parameter '([^']+)'", record.getMessage())
        if m:
            self.names.append(m.group(1))


@pytest.fixture
def skipped_parameters():
    handler = SkippedParameters()
    logger = logging.getLogger("fvcore.common.checkpoint")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield handler.names
    logger.removeHandler(handler)
    logger.setLevel(level)


# Tiny shapes for the README's R50 Deformable DETR config, so that a step takes a fraction of
# a second (images 60-110 px, scale 0.1: shortest side 48-80).
TINY = [
    "model.backbone.depth=18",
    "model.backbone.norm=BN",
    "model.backbone.freeze_at=0",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=2",
    "model.num_queries=20",
    "dataloader.train.mapper.augmentations.scale=0.1",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "train.log_period=1",
    "train.seed=0",
]


def test_readme_section_trains_fine_tunes_and_evaluates(
    my_data_project, repo_root, monkeypatch, skipped_parameters
):
    """The README's experiment config, written to a file as a user would and loaded by
    LazyConfig from the directory holding datasets/my_data, with only size overrides: fine-tuning
    from a 5-class checkpoint skips exactly the per-layer class heads (logged), two iterations
    train, COCO evaluation runs and maps the contiguous ids back to the json's ids (2, 5, 9);
    the README's --eval-only step then loads the result strictly."""
    from helpers import train_and_evaluate_tiny

    monkeypatch.chdir(my_data_project)
    with open("my_deformable_detr.py", "w") as f:
        f.write(readme_block(repo_root, "# my_deformable_detr.py"))
    cfg = apply_overrides(LazyConfig.load("my_deformable_detr.py"), TINY)
    assert cfg.model.num_classes == 3

    # The "converted COCO checkpoint": the same model trained for another class count.
    other_cfg = apply_overrides(LazyConfig.load("my_deformable_detr.py"), TINY)
    other_cfg.model.num_classes = 5
    other = instantiate(other_cfg.model)
    os.makedirs("output", exist_ok=True)
    torch.save({"model": other.state_dict()}, cfg.train.init_checkpoint)

    results = train_and_evaluate_tiny(cfg, cfg.train.output_dir)
    assert sorted(skipped_parameters) == sorted(
        f"class_embed.{i}.{p}" for i in range(2) for p in ("weight", "bias")
    )
    assert 0 <= results["bbox"]["AP50"] <= 100
    dets = json.load(
        open(os.path.join(cfg.train.output_dir, "inference", "coco_instances_results.json"))
    )
    assert dets and {d["category_id"] for d in dets} <= {2, 5, 9}
    assert {d["image_id"] for d in dets} == {1, 2, 3}

    cfg.train.init_checkpoint = os.path.join(cfg.train.output_dir, "model_final.pth")
    assert set(evaluate(cfg)["bbox"]) >= {"AP", "AP50"}


def test_class_count_mismatch_is_a_clear_error(my_data_project, monkeypatch):
    monkeypatch.chdir(my_data_project)
    cfg = get_config("configs/common/data/custom.py")
    cfg.model = {"num_classes": 4}
    cfg.dataloader.train.dataset.names.update(
        name="my_data_4_classes",
        json_file="datasets/my_data/annotations/train.json",
        image_root="datasets/my_data/train",
    )
    with pytest.raises(ValueError, match=r"has 3 categories but the model predicts 4 classes"):
        build_train_loader(cfg)


def test_missing_paths_are_a_clear_error():
    cfg = get_config("configs/common/data/custom.py")
    cfg.model = {"num_classes": 3}
    with pytest.raises(Exception, match=r"dataloader.train.dataset.names.json_file"):
        instantiate(cfg.dataloader.train.dataset)
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        register_coco_dataset("nowhere", "/nonexistent/train.json", "/nonexistent")


def test_registration_is_idempotent_and_refuses_other_files(my_data_project):
    d = my_data_project / "datasets" / "my_data"
    train = (str(d / "annotations" / "train.json"), str(d / "train"))
    val = (str(d / "annotations" / "val.json"), str(d / "val"))
    assert register_coco_dataset("idempotent_check", *train) == "idempotent_check"
    assert register_coco_dataset("idempotent_check", *train) == "idempotent_check"
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset("idempotent_check", *val)
    dicts = DatasetCatalog.get("idempotent_check")
    assert len(dicts) == 6 and dicts[0]["file_name"].startswith(train[1])
    meta = MetadataCatalog.get("idempotent_check")
    assert meta.thing_classes == ["red", "green", "blue"]
    assert meta.thing_dataset_id_to_contiguous_id == {2: 0, 5: 1, 9: 2}


def _output_sizes(augmentations, h, w, draws, seed=0):
    """The distinct (h, w) of a blank h x w image after ``draws`` runs of the augmentations."""
    from detectron2.data import transforms as T

    np.random.seed(seed)
    sizes = set()
    for _ in range(draws):
        aug_input = T.AugInput(np.zeros((h, w, 3), np.uint8))
        T.AugmentationList(augmentations)(aug_input)
        sizes.add(aug_input.image.shape[:2])
    return sizes


def test_scaled_augmentation():
    """Scale 1 is DETR's recipe exactly (same augmentation objects and sizes); at scale 0.5 the
    shortest side after training augmentation is always one of 240, 256, ..., 400 (480-800 step
    32, halved) and the evaluation resize gives 400 (and at most 666 = 1333/2, rounded)."""
    assert repr(scaled_detr_train_augmentations(1.0)) == repr(detr_train_augmentations())
    assert repr(scaled_detr_test_augmentations(1.0)) == repr(detr_test_augmentations())
    sizes = _output_sizes(scaled_detr_train_augmentations(0.5), 1000, 1000, draws=60)
    sides = {min(s) for s in sizes}
    assert sides <= set(range(240, 401, 16)) and len(sides) >= 4
    assert _output_sizes(scaled_detr_test_augmentations(0.5), 1000, 1200, 1) == {(400, 480)}
    assert {max(s) for s in _output_sizes(scaled_detr_test_augmentations(0.5), 500, 2000, 1)} == {
        666
    }
    with pytest.raises(ValueError, match="scale must be positive"):
        scaled_detr_train_augmentations(0.0)


# Every variant: what changes shape with the class count, so that fine-tuning re-initialises it
# (the README's "Fine-tuning" list); everything else must load.
CLASS_DEPENDENT = {
    "detr/detr_r18_synthetic": ["class_embed"],
    "conditional_detr/conditional_detr_r18_synthetic": ["class_embed"],
    "smca_detr/smca_r18_synthetic": ["class_embed"],
    "smca_detr/smca_ms_r18_synthetic": ["class_embed"],
    # one head per decoder layer (3 here, shared without box refinement; 6 in the R50 configs)
    "deformable_detr/deformable_detr_r18_synthetic": [f"class_embed.{i}" for i in range(3)],
    "deformable_detr/deformable_detr_two_stage_r50_50ep": [f"class_embed.{i}" for i in range(6)],
    "tsp/tsp_fcos_r18_synthetic": ["class_embed", "foi_head.cls_score"],
    "tsp/tsp_rcnn_r18_synthetic": [
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred.layers.2",
    ],
}


@pytest.mark.parametrize("name", sorted(CLASS_DEPENDENT))
def test_fine_tuning_reinitialises_exactly_the_class_heads(name, tmp_path, skipped_parameters):
    """A 6-class checkpoint loaded (for training) into a 3-class model: the class-dependent
    tensors are skipped with detectron2's log line and keep the new model's initialisation, every
    other tensor (two-stage ``proposal_class_embed``, 1 logit, included) equals the checkpoint's
    exactly."""
    key = "model.roi_heads.num_classes" if "tsp_rcnn" in name else "model.num_classes"
    torch.manual_seed(0)

    def build(num_classes):
        cfg = get_config(name)
        if name.endswith("_r50_50ep"):
            cfg = tiny_config(cfg)
        return instantiate(apply_overrides(cfg, [f"{key}={num_classes}"]).model)

    source = build(6).state_dict()
    path = str(tmp_path / "six_classes.pth")
    torch.save({"model": source}, path)
    model = build(3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    Checkpointer(model).load(path)

    expected = {f"{p}.{t}" for p in CLASS_DEPENDENT[name] for t in ("weight", "bias")}
    assert set(skipped_parameters) == expected and expected
    for k, v in model.state_dict().items():
        if k in expected:
            assert torch.equal(v, fresh[k]), k
        else:
            assert torch.equal(v, source[k]), k
    if "two_stage" in name:
        assert model.state_dict()["proposal_class_embed.weight"].shape[0] == 1
