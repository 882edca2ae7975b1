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

    out = generate_synthetic_shapes(
        str(tmp_path_factory.mktemp("data") / "tiny"), num_train=16, num_val=6, seed=3
    )
    for split in ("train", "val"):
        name = f"tiny_shapes_{split}"
        if name not in DatasetCatalog:
            register_coco_instances(
                name,
                {},
                os.path.join(out, "annotations", f"{split}.json"),
                os.path.join(out, split),
            )
    return out


@pytest.fixture
def tiny_cfg(tiny_shapes, tmp_path):
    """detr_r18_synthetic shrunk to seconds per run on the tiny dataset."""
    from detr_variants.engine.lazy_train import apply_overrides
    from detr_variants.model_zoo import get_config

    cfg = get_config("detr/detr_r18_synthetic")
    from helpers import tiny_run_overrides

    return apply_overrides(
        cfg,
        ["model.encoder.num_layers=1", "model.decoder.num_layers=2", *tiny_run_overrides(tmp_path)],
    )
