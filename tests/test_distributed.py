import json
import os
import subprocess
import sys
import textwrap

import pytest

CONFIG = """
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from detr_variants.model_zoo import get_config

for _split in ("train", "val"):
    if f"tiny_shapes_{_split}" not in DatasetCatalog:
        register_coco_instances(f"tiny_shapes_{_split}", {}, "ROOT/annotations/" + _split + ".json",
                                "ROOT/" + _split)

_cfg = get_config("detr/detr_r18_synthetic")
model, dataloader, optimizer, lr_multiplier, train = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.lr_multiplier, _cfg.train)
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_training(tiny_shapes, tmp_path, repo_root):
    config = tmp_path / "ddp_config.py"
    config.write_text(textwrap.dedent(CONFIG.replace("ROOT", tiny_shapes)))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(repo_root, "tools", "train_net.py"),
        "--config-file",
        str(config),
        "--num-gpus",
        "2",
        "model.encoder.num_layers=1",
        "model.decoder.num_layers=1",
        "dataloader.train.dataset.names=tiny_shapes_train",
        "dataloader.train.total_batch_size=4",
        "dataloader.train.num_workers=0",
        "dataloader.train.mapper.augmentations.min_sizes=[64]",
        "dataloader.train.mapper.augmentations.max_size=96",
        "dataloader.train.mapper.augmentations.crop_resize_sizes=[64]",
        "dataloader.train.mapper.augmentations.crop_size=[48,64]",
        f"train.output_dir={out}",
        "train.max_iter=3",
        "train.log_period=1",
        "train.eval_period=-1",
        "train.device=cpu",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1, 2]
    assert (out / "model_final.pth").is_file()
