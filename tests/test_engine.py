import itertools
import json
import os
import sys

import cv2
import numpy as np
import pytest
import torch

from detr_variants.checkpoint import CheckpointMismatchError
from detr_variants.engine import DefaultPredictor, ModelEMA, lazy_train, param_groups
from detr_variants.engine import trainer as trainer_module
from detr_variants.engine.lazy_train import apply_overrides, resolve_max_iter, train
from detr_variants.engine.trainer import ReleaseFreedMemory, SetPredictionTrainer


def _metrics(output_dir):
    """Per-iteration training records (the crash leaves a record with only the ETA)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "lr" in r]


def test_unknown_config_key_is_an_error(tiny_cfg):
    with pytest.raises(KeyError, match="num_querys.*num_queries"):
        apply_overrides(tiny_cfg, ["model.num_querys=10"])
    with pytest.raises(KeyError, match="train"):
        apply_overrides(tiny_cfg, ["train.max_iters=10"])
    # an argument the model accepts but the config does not list is fine, and so is '+'
    apply_overrides(tiny_cfg, ["model.aux_loss=False", "+train.note=hello"])
    assert tiny_cfg.model.aux_loss is False and tiny_cfg.train.note == "hello"


def test_release_freed_memory_trims_once_the_resident_size_grew_past_the_limit(monkeypatch):
    rss = iter([1000, 1300, 1600, 1100, 1500, 1700, 1800])  # MiB after each step and each trim
    monkeypatch.setattr(trainer_module, "resident_mib", lambda: next(rss))
    hook = ReleaseFreedMemory(max_growth_mib=500)
    trims = []
    hook._trim = lambda pad: trims.append(hook.trainer.iter)
    hook.trainer = type("Trainer", (), {"iter": 0})()
    for it in range(5):
        hook.trainer.iter = it
        hook.after_step()
    # step 0 sets 1000; step 2 is 600 above it: trim (leaves 1100); step 4 is 600 above that
    assert trims == [2, 4]


@pytest.mark.parametrize("growth, expected", [(50, [1, 2, 3]), (0, [])])
def test_release_memory_growth_from_the_config(tiny_cfg, monkeypatch, growth, expected):
    trims = []

    class Recording(ReleaseFreedMemory):
        def __init__(self, max_growth_mib):
            super().__init__(max_growth_mib)
            self._trim = lambda pad: trims.append(self.trainer.iter)

    monkeypatch.setattr(lazy_train, "ReleaseFreedMemory", Recording)
    readings = itertools.count(100, 100)  # every reading 100 MiB above the one before
    monkeypatch.setattr(trainer_module, "resident_mib", lambda: next(readings))
    tiny_cfg.train.update(max_iter=4, release_memory_growth_mib=growth)
    train(tiny_cfg)
    assert trims == expected


def test_epochs_to_iterations():
    assert resolve_max_iter({"epochs": 50, "max_iter": None}, 117266, 32) == 183229
    assert resolve_max_iter({"epochs": 50, "max_iter": 7}, 117266, 32) == 7
    with pytest.raises(ValueError):
        resolve_max_iter({"epochs": None, "max_iter": None}, 10, 2)


def test_param_groups_multipliers():
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
    groups = param_groups(model, base_lr=1e-4, weight_decay=1e-4, lr_multipliers={"backbone": 0.1})
    by_lr = sorted((g["lr"], len(g["params"])) for g in groups)
    assert [n for _, n in by_lr] == [2, 2]
    assert [lr for lr, _ in by_lr] == pytest.approx([1e-5, 1e-4])


def test_train_checkpoint_and_resume_continue_at_the_same_iteration_and_lr(tiny_cfg, monkeypatch):
    """Interrupt a 6-iteration run after iteration 3; --resume continues at iteration 4 with the
    learning rate the uninterrupted schedule has there (x0.1 from 80% of training)."""
    tiny_cfg.train.max_iter = 6
    original = SetPredictionTrainer.run_step

    def interrupted(self):
        if self.iter == 4:
            raise RuntimeError("simulated crash")
        original(self)

    monkeypatch.setattr(SetPredictionTrainer, "run_step", interrupted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg)
    monkeypatch.setattr(SetPredictionTrainer, "run_step", original)
    assert os.path.isfile(os.path.join(tiny_cfg.train.output_dir, "model_0000003.pth"))
    first = _metrics(tiny_cfg.train.output_dir)
    assert [m["iteration"] for m in first] == [0, 1, 2, 3]

    train(tiny_cfg, resume=True)
    resumed = _metrics(tiny_cfg.train.output_dir)[len(first) :]
    assert [m["iteration"] for m in resumed] == [4, 5]
    base = tiny_cfg.optimizer.lr
    assert resumed[0]["lr"] == pytest.approx(base) and resumed[1]["lr"] == pytest.approx(base * 0.1)
    assert all(np.isfinite(m["total_loss"]) for m in first + resumed)
    assert os.path.isfile(os.path.join(tiny_cfg.train.output_dir, "model_final.pth"))


def test_training_with_ema_and_evaluation(tiny_cfg):
    tiny_cfg.train.update(max_iter=2, eval_period=0, ema=dict(enabled=True, decay=0.9, warmup=0.0))
    tiny_cfg.dataloader.evaluator.output_dir = os.path.join(tiny_cfg.train.output_dir, "inference")
    results = train(tiny_cfg)
    assert "bbox" in results and 0 <= results["bbox"]["AP"] <= 100


def test_ema_update_rule():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = ModelEMA(model, decay=0.5, warmup=0.0)
    torch.nn.init.constant_(model.weight, 1.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.5)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.75)


@pytest.fixture
def trained_checkpoint(tiny_cfg):
    tiny_cfg.train.max_iter = 1
    train(tiny_cfg)
    return os.path.join(tiny_cfg.train.output_dir, "model_final.pth")


def test_predictor_on_an_image_file(tiny_cfg, tiny_shapes, trained_checkpoint):
    tiny_cfg.train.init_checkpoint = trained_checkpoint
    predictor = DefaultPredictor(tiny_cfg)
    path = os.path.join(tiny_shapes, "val", sorted(os.listdir(os.path.join(tiny_shapes, "val")))[0])
    h, w = cv2.imread(path).shape[:2]
    out = predictor(path)["instances"]
    assert out.image_size == (h, w) and len(out) > 0
    assert (out.pred_boxes.tensor[:, 2] <= w).all() and (out.pred_boxes.tensor[:, 3] <= h).all()
    # the same image as a BGR array gives the same result
    again = predictor(cv2.imread(path))["instances"]
    assert torch.allclose(out.scores, again.scores)
    with pytest.raises(IOError):
        predictor(os.path.join(tiny_shapes, "missing.jpg"))


def test_checkpoint_with_another_class_count_is_refused(tiny_cfg, trained_checkpoint):
    tiny_cfg.train.init_checkpoint = trained_checkpoint
    tiny_cfg.model.num_classes = 3
    with pytest.raises(CheckpointMismatchError, match="class_embed.weight"):
        DefaultPredictor(tiny_cfg)


def test_demo_recipe_trains_and_evaluates_on_the_demo_level(tmp_path, monkeypatch, repo_root):
    """tools/train_demo.py end to end with its default config, the demo recipe, unchanged but for
    the iteration count, on a 16/8-image draw of the shapes_demo level: it trains, evaluates on
    the level's validation split twice (COCO ids 1, 3, 7), and writes the summary, the PNG and
    the checkpoint it points to."""
    from detr_variants.data.synthetic import SHAPES_DEMO, register_synthetic_shapes
    from helpers import load_script

    demo = load_script(repo_root, "tools", "train_demo.py")
    register_synthetic_shapes(
        root=str(tmp_path / "data"), spec=SHAPES_DEMO, num_train=16, num_val=8
    )
    monkeypatch.chdir(repo_root)
    out = tmp_path / "demo"
    argv = ["train_demo.py", "--output-dir", str(out), "--eval-period", "2", "train.max_iter=4"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        demo.main()
    finally:
        register_synthetic_shapes(spec=SHAPES_DEMO)  # the real level again, for later tests
    summary = json.load(open(out / "demo_summary.json"))
    assert summary["config"] == demo.DEFAULT_CONFIG and summary["iterations"] == 4
    assert [p["iteration"] for p in summary["points"]] == [2, 4]
    assert 0 < summary["points"][0]["train_cpu_s"] < summary["train_cpu_s"]
    assert all(0 <= p["AP"] <= 100 for p in summary["points"])
    assert summary["peak_rss_mib"]["main_process"] > 100
    results = json.load(open(out / "inference" / "coco_instances_results.json"))
    assert results and {r["category_id"] for r in results} <= {1, 3, 7}
    assert cv2.imread(str(out / "predictions.png")).shape == (640, 960, 3)
    assert (out / "model_final.pth").stat().st_size > 0
