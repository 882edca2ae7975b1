"""tools/convergence.py on tiny shapes: points at fixed intervals with growing CPU time, skipping
a finished config, resuming a killed one exactly (from the checkpoint, even with the JSON lost),
the PNG, --plot-only and the refused inputs."""

import json
import os

import cv2
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from detr_variants.engine.trainer import SetPredictionTrainer
from helpers import load_script, tiny_run_overrides

CONFIG = "detr/detr_r18_synthetic"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def tiny_argv(output_dir, *extra):
    """One DETR config on the tiny datasets, 4 iterations, a point every 2."""
    own = ("train.output_dir", "train.eval_period", "train.checkpointer.period")
    opts = [o for o in tiny_run_overrides("unused") if not o.startswith(own)]
    opts += ["model.encoder.num_layers=1", "model.decoder.num_layers=1"]
    return [
        "--configs",
        CONFIG,
        "--eval-period",
        "2",
        "--output-dir",
        str(output_dir),
        *extra,
        *opts,
    ]


def weights(output_dir, checkpoint):
    path = os.path.join(output_dir, "detr", CONFIG[5:], checkpoint + ".pth")
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def convergence(repo_root):
    return load_script(repo_root, "tools", "convergence.py")


@pytest.fixture(scope="module")
def finished(convergence, tiny_shapes, tmp_path_factory):
    """An uninterrupted run: its output dir and the JSON it returned."""
    out = tmp_path_factory.mktemp("convergence")
    return out, convergence.main(tiny_argv(out))


def test_points_at_fixed_intervals_with_growing_training_time(finished):
    out, results = finished
    assert json.load(open(out / "convergence.json")) == results
    run = results["runs"][CONFIG]
    assert run["finished"] and run["max_iter"] == 4 and run["dataset"] == "tiny_shapes_val"
    points = run["points"]
    assert [p["iteration"] for p in points] == [2, 4]
    for key in ("train_cpu_s", "train_wall_s"):
        assert 0 < points[0][key] < points[1][key]
    for p in points:
        assert p["eval_wall_s"] > 0
        assert all(p[k] is None or 0 <= p[k] <= 100 for k in AP_KEYS)
        assert p["AP"] is not None
    (segment,) = run["segments"]
    assert segment["start_iteration"] == 0 and segment["threads"] == 1
    assert segment["torch"] and segment["device"] == "cpu"
    assert "dataloader.train.num_workers=0" in run["settings"]["overrides"]
    # a checkpoint per point (model_0000001 = after 2 iterations), and the final one
    assert {"model_0000001.pth", "model_final.pth"} <= set(os.listdir(out / "detr" / CONFIG[5:]))


def test_the_png_and_plot_only(finished, convergence):
    out, results = finished
    png = out / "convergence.png"
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    png.unlink()
    assert convergence.main(["--plot-only", "--output-dir", str(out)]) == results
    assert cv2.imread(str(png)).shape == image.shape


def test_a_finished_config_is_skipped(finished, convergence, monkeypatch):
    out, results = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished config was trained again")

    monkeypatch.setattr(convergence, "train", no_training)
    assert convergence.main(tiny_argv(out)) == results


def test_a_killed_run_resumes_exactly_from_its_last_checkpoint(
    finished, convergence, tmp_path, monkeypatch
):
    """Killed in iteration 4 (after the point at 2), JSON lost: the rerun trains iterations 3-4
    only, from the checkpoint at 2, which restores the point and its CPU time; its final weights are
    the uninterrupted run's (exact resume: equal to 1e-6 relative), and so are its metrics."""
    original = SetPredictionTrainer.run_step

    def killed(self):
        if self.iter == 3:
            raise RuntimeError("simulated kill")
        original(self)

    monkeypatch.setattr(SetPredictionTrainer, "run_step", killed)
    with pytest.raises(SystemExit, match="failed: " + CONFIG):
        convergence.main(tiny_argv(tmp_path))
    partial = json.load(open(tmp_path / "convergence.json"))["runs"][CONFIG]
    assert not partial["finished"] and [p["iteration"] for p in partial["points"]] == [2]
    os.unlink(tmp_path / "convergence.json")

    monkeypatch.setattr(SetPredictionTrainer, "run_step", original)
    run = convergence.main(tiny_argv(tmp_path))["runs"][CONFIG]
    assert run["finished"] and [s["start_iteration"] for s in run["segments"]] == [0, 2]
    assert run["points"][0] == partial["points"][0]
    assert run["points"][1]["train_cpu_s"] > run["points"][0]["train_cpu_s"]
    resumed, uninterrupted = (weights(d, "model_final") for d in (tmp_path, finished[0]))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in resumed.items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-6, atol=0, msg=name)
    # and the resumed iterations did train: the weights moved on from the checkpoint at 2
    at_2 = weights(tmp_path, "model_0000001")
    assert any(not torch.equal(v, at_2[k]) for k, v in resumed.items())
    for got, want in zip(run["points"], finished[1]["runs"][CONFIG]["points"]):
        for k in AP_KEYS:
            assert got[k] == pytest.approx(want[k], abs=1e-9)


def test_refused_inputs(finished, convergence, tmp_path):
    out, _ = finished
    with pytest.raises(SystemExit, match="other settings"):
        convergence.main(tiny_argv(out, "--val-images", "3"))
    with pytest.raises(SystemExit):  # argparse: the tool owns the output dir
        convergence.main(tiny_argv(out, "train.output_dir=elsewhere"))
    with pytest.raises(SystemExit, match="no .*convergence.json"):
        convergence.main(["--plot-only", "--output-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="available"):
        convergence.main(["--configs", "detr/no_such_config", "--output-dir", str(tmp_path)])


def test_val_images_scores_only_the_evaluated_images(convergence, tiny_shapes, tmp_path):
    """--val-images 3: the test loader gives the first 3 images, and predictions equal to their
    ground truth score AP 100 (exactly; the plain COCOEvaluator counts the 3 other images' objects
    as missed, so below 100)."""
    args = convergence.parse_args(tiny_argv(tmp_path, "--val-images", "3"))
    cfg = convergence.build_config(CONFIG, args.opts, args, str(tmp_path))
    dicts = instantiate(cfg.dataloader.test.dataset)
    assert dicts == DatasetCatalog.get("tiny_shapes_val")[:3]
    inputs, outputs = [], []
    for d in dicts:
        objects = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
        inst = Instances((d["height"], d["width"]))
        xywh = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        inst.scores = torch.ones(len(objects))
        inst.pred_classes = torch.tensor([a["category_id"] for a in objects], dtype=torch.long)
        inputs.append({"image_id": d["image_id"]})
        outputs.append({"instances": inst})
    assert sum(len(o["instances"]) for o in outputs) > 0
    subset = instantiate(cfg.dataloader.evaluator)
    plain = COCOEvaluator("tiny_shapes_val", output_dir=str(tmp_path), use_fast_impl=False)
    for evaluator in (subset, plain):
        evaluator.reset()
        evaluator.process(inputs, outputs)
    assert subset.evaluate()["bbox"]["AP"] == pytest.approx(100.0, abs=1e-9)
    assert plain.evaluate()["bbox"]["AP"] < 99
