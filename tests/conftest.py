import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def python():
    return sys.executable


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A 16/6-image synthetic dataset registered as tiny_shapes_{train,val} (COCO json files)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    from detr_variants.data.synthetic import generate_synthetic_shapes

    out = generate_synthetic_shapes(str(tmp_path_factory.mktemp("data") / "tiny"), num_train=16, num_val=6, seed=3)
    for split in ("train", "val"):
        name = f"tiny_shapes_{split}"
        if name not in DatasetCatalog:
            register_coco_instances(name, {}, os.path.join(out, "annotations", f"{split}.json"),
                                    os.path.join(out, split))
    return out


@pytest.fixture
def tiny_cfg(tiny_shapes, tmp_path):
    """detr_r18_synthetic shrunk to seconds per run on the tiny dataset."""
    from detr_variants.engine.train_loop import apply_overrides
    from detr_variants.model_zoo import get_config

    cfg = get_config("detr/detr_r18_synthetic")
    return apply_overrides(cfg, [
        "model.encoder.num_layers=1", "model.decoder.num_layers=2",
        "dataloader.train.dataset.names=tiny_shapes_train", "dataloader.test.dataset.names=tiny_shapes_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.min_sizes=[64]", "dataloader.train.mapper.augmentations.max_size=96",
        "dataloader.train.mapper.augmentations.crop_resize_sizes=[64]",
        "dataloader.train.mapper.augmentations.crop_size=[48,64]",
        "dataloader.test.mapper.augmentations.min_size=64", "dataloader.test.mapper.augmentations.max_size=96",
        f"train.output_dir={tmp_path}", "train.max_iter=4", "train.log_period=1", "train.eval_period=-1",
        "train.checkpointer.period=2", "train.seed=0",
    ])
