"""The user-facing tools on tiny shapes: configs that detectron2's tools accept, the inference
demo (demo/demo.py), tools/analyze_model.py and tools/benchmark.py --config-file."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from fvcore.nn import FlopCountAnalysis

from detr_variants.engine import resolve_device
from detr_variants.layers.ms_deform_attn import MultiScaleDeformableAttention
from detr_variants.model_zoo import config_path
from detr_variants.utils.analysis import FLOP_HANDLES
from helpers import load_script, tiny_run_overrides

SYNTHETIC_CONFIGS = [
    "detr/detr_r18_synthetic",
    "deformable_detr/deformable_detr_r18_synthetic",
    "conditional_detr/conditional_detr_r18_synthetic",
    "smca_detr/smca_r18_synthetic",
    "smca_detr/smca_ms_r18_synthetic",
    "tsp/tsp_fcos_r18_synthetic",
    "tsp/tsp_rcnn_r18_synthetic",
]
# one transformer layer each (where the config has a layer count), so a trace takes about a second
_ONE = ["model.encoder.num_layers=1", "model.decoder.num_layers=1"]
ONE_LAYER = {name: _ONE for name in SYNTHETIC_CONFIGS[:4]}
ONE_LAYER.update({"smca_detr/smca_ms_r18_synthetic": _ONE[1:]})
ONE_LAYER.update({name: [] for name in SYNTHETIC_CONFIGS[5:]})


# ------------------------------------------------------------------ configs for detectron2's tools
def test_loaded_config_holds_a_concrete_device_for_detectron2_tools(tiny_shapes):
    """detectron2's analyze_model.py / visualize_json_results.py / detrex's demo do
    ``LazyConfig.load``, ``model.to(cfg.train.device)`` and ``instantiate(cfg.dataloader.test)``:
    the device must be a device string after loading, the one "auto" resolves to."""
    cfg = LazyConfig.load(config_path("detr/detr_r18_synthetic"))
    assert cfg.train.device == str(resolve_device("auto")) and cfg.train.device in ("cpu", "cuda")
    cfg = LazyConfig.apply_overrides(
        cfg, ["dataloader.test.dataset.names=tiny_shapes_val", "dataloader.test.num_workers=0"]
    )
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    assert model.device == torch.device(cfg.train.device)
    batch = next(iter(instantiate(cfg.dataloader.test)))
    assert len(batch) == 1 and batch[0]["image"].shape[0] == 3
    # "auto" is still accepted where the project resolves the device
    assert resolve_device("auto") == torch.device(cfg.train.device)


# ------------------------------------------------------------------ FLOP handles
def test_attention_and_deformable_flops_are_counted_from_the_shapes():
    """SDPA: (q @ k^T) + (weights @ v) = B*heads*L*S*(E+Ev) multiply-adds. Deformable attention
    (traced through its grid_sample path): 4 multiply-adds per (query, head, level, point, channel)
    bilinear sample, plus its four linear projections. Exact counts."""

    class SDPA(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.rand(2, 4, 5, 8), torch.rand(2, 4, 7, 8), torch.rand(2, 4, 7, 6)
    analysis = FlopCountAnalysis(SDPA(), (q, k, v)).set_op_handle(**FLOP_HANDLES)
    assert analysis.total() == 2 * 4 * 5 * 7 * (8 + 6)

    C, M, L, P, N, Lq = 16, 2, 2, 3, 2, 5
    shapes = torch.tensor([[4, 6], [2, 3]])
    S = int(shapes.prod(1).sum())
    attn = MultiScaleDeformableAttention(embed_dim=C, num_heads=M, num_levels=L, num_points=P)
    inputs = (
        torch.rand(N, Lq, C),
        torch.rand(N, Lq, L, 2),
        torch.rand(N, S, C),
        shapes,
        torch.tensor([0, 24]),
    )
    analysis = FlopCountAnalysis(attn.eval(), inputs).set_op_handle(**FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    by_operator = analysis.by_operator()
    assert by_operator["grid_sampler"] == N * Lq * M * L * P * (C // M) * 4
    projections = N * Lq * C * (M * L * P * 3 + C) + N * S * C * C  # offsets+weights+out, value
    assert by_operator["linear"] == projections


# ------------------------------------------------------------------ tools/analyze_model.py
@pytest.mark.parametrize("name", SYNTHETIC_CONFIGS)
def test_analyze_model_counts_flops_and_parameters_of_every_variant(name, repo_root, tmp_path):
    analyze = load_script(repo_root, "tools", "analyze_model.py")
    output = tmp_path / "analysis.json"
    overrides = ONE_LAYER[name]
    argv = ["--config-file", config_path(name), "--tasks", "flop", "parameter", "-n", "1"]
    argv += ["--input-size", "64", "96", "--output", str(output), *overrides]
    results = analyze.main(argv)
    assert json.load(open(output)) == json.loads(json.dumps(results))
    model = instantiate(
        analyze.apply_overrides(LazyConfig.load(config_path(name)), overrides).model
    )
    assert results["parameter"]["parameters"] == sum(p.numel() for p in model.parameters())
    flops = results["flop"]["gflops_by_operator"]
    assert results["flop"]["gflops_mean"] == pytest.approx(sum(flops.values()), rel=1e-9)
    assert flops["conv"] > 0 and flops["linear"] > 0
    if name.startswith("deformable"):
        # 64x96 -> levels of strides 8..64: 8x12, 4x6, 2x3, 1x2 = 128 encoder queries; 50 queries
        # in the decoder; 8 heads x 4 levels x 4 points x 32 channels, 4 multiply-adds each
        samples = (128 + 50) * 8 * 4 * 4 * 32
        assert flops["grid_sampler"] * 1e9 == pytest.approx(samples * 4, rel=1e-12)
    else:
        assert flops["scaled_dot_product_attention"] > 0


def test_analyze_model_on_the_test_set_all_tasks(tiny_shapes, repo_root, tmp_path):
    """Without --input-size: the config's test loader (resized by its mapper), averaged over 2
    images; activations and the structure too."""
    analyze = load_script(repo_root, "tools", "analyze_model.py")
    argv = ["--config-file", config_path("deformable_detr/deformable_detr_r18_synthetic")]
    argv += ["--tasks", "flop", "activation", "structure", "parameter", "-n", "2"]
    argv += [
        *ONE_LAYER["deformable_detr/deformable_detr_r18_synthetic"],
        *tiny_run_overrides(tmp_path),
    ]
    results = analyze.main(argv)
    assert results["flop"]["num_inputs"] == 2 and results["flop"]["gflops_mean"] > 0
    assert results["activation"]["mactivations_by_operator"]["grid_sampler"] > 0
    assert "DeformableDETR" in results["structure"]["structure"]
    # an unavailable dataset is a clear error that names the way out
    argv = ["--config-file", config_path("detr/detr_r18_synthetic"), "--tasks", "flop", "-n", "1"]
    with pytest.raises(SystemExit, match="--input-size"):
        analyze.main(argv + ["dataloader.test.dataset.names=no_such_dataset"])


# ------------------------------------------------------------------ demo/demo.py
@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random DETR model's weights as a checkpoint file (the demo needs one)."""
    torch.manual_seed(0)
    cfg = LazyConfig.load(config_path("detr/detr_r18_synthetic"))
    cfg = LazyConfig.apply_overrides(cfg, ONE_LAYER["detr/detr_r18_synthetic"])
    path = str(tmp_path / "model.pth")
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return path


@pytest.fixture
def demo_module(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(repo_root, "demo"))
    return load_script(repo_root, "demo", "demo.py")


def demo_argv(checkpoint, *args):
    opts = [
        *ONE_LAYER["detr/detr_r18_synthetic"],
        *tiny_run_overrides("/tmp/unused")[:11],
    ]  # data and test resize
    return [
        "--config-file",
        config_path("detr/detr_r18_synthetic"),
        *args,
        "--confidence-threshold",
        "0",
        "--opts",
        f"train.init_checkpoint={checkpoint}",
        *opts,
    ]


def test_demo_draws_a_folder_of_images(tiny_shapes, demo_module, tiny_checkpoint, tmp_path):
    """Colour images of two sizes, a grayscale one and an unreadable file (skipped with a
    warning): each readable image is drawn at its own size, with boxes on it."""
    folder, out = tmp_path / "images", tmp_path / "drawn"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {
        "a.png": rng.integers(0, 256, (60, 80, 3), dtype=np.uint8),
        "b.jpg": rng.integers(0, 256, (90, 70, 3), dtype=np.uint8),
        "gray.png": rng.integers(0, 256, (50, 64), dtype=np.uint8),
    }
    for name, image in images.items():
        cv2.imwrite(str(folder / name), image)
    (folder / "broken.jpg").write_bytes(b"not an image")
    argv = demo_argv(tiny_checkpoint, "--input", str(folder), "--output", str(out))
    assert demo_module.main(argv) == 3
    assert sorted(os.listdir(out)) == sorted(images)
    for name, image in images.items():
        drawn = cv2.imread(str(out / name))
        assert drawn.shape[:2] == image.shape[:2]
    # threshold 0 draws all 50 queries' boxes: the picture changes
    original = cv2.imread(str(folder / "a.png"))
    assert (
        np.abs(cv2.imread(str(out / "a.png")).astype(int) - original).max(-1) > 40
    ).mean() > 0.01


def test_demo_single_image_to_a_file_and_refuses_no_checkpoint(
    tiny_shapes, demo_module, tiny_checkpoint, tmp_path
):
    image = tmp_path / "one.png"
    cv2.imwrite(str(image), np.full((40, 56, 3), 127, np.uint8))
    out = tmp_path / "sub" / "drawn.png"
    assert demo_module.main(demo_argv(tiny_checkpoint, "--input", str(image), "--output", str(out)))
    assert cv2.imread(str(out)).shape == (40, 56, 3)
    with pytest.raises(SystemExit, match="no checkpoint"):
        demo_module.main(demo_argv("", "--input", str(image), "--output", str(out)))
    # an untrained model only on request
    out.unlink()
    assert demo_module.main(
        demo_argv("", "--random-weights", "--input", str(image), "--output", str(out))
    )
    assert cv2.imread(str(out)).shape == (40, 56, 3)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        demo_module.main(demo_argv(tiny_checkpoint, "--input", str(tmp_path / "*.bmp")))


def test_demo_draws_every_frame_of_a_video(tiny_shapes, demo_module, tiny_checkpoint, tmp_path):
    """A 5-frame 80x60 MJPG video -> an mp4 (mp4v) of 5 frames of 80x60 in the output folder."""
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (80, 60), True)
    rng = np.random.default_rng(1)
    for _ in range(5):
        writer.write(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "videos"
    argv = demo_argv(tiny_checkpoint, "--video-input", video, "--output", str(out) + os.sep)
    assert demo_module.main(argv) == 5
    drawn = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = drawn.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 5 and all(f.shape == (60, 80, 3) for f in frames)
    with pytest.raises(SystemExit, match="is not a file"):
        demo_module.main(demo_argv(tiny_checkpoint, "--video-input", str(tmp_path / "no.mp4")))


# ------------------------------------------------------------------ tools/benchmark.py
@pytest.mark.parametrize("task", ["train", "eval", "data"])
def test_benchmark_a_config(task, tiny_shapes, repo_root, tmp_path):
    benchmark = load_script(repo_root, "tools", "benchmark.py")
    output = tmp_path / "bench.json"
    argv = ["--config-file", config_path("detr/detr_r18_synthetic"), "--task", task]
    argv += ["--iters", "2", "--warmup", "1", "--threads", "1", "--output", str(output)]
    row = benchmark.main(
        argv + [*ONE_LAYER["detr/detr_r18_synthetic"], *tiny_run_overrides(tmp_path)]
    )
    assert json.load(open(output)) == row
    assert row["task"] == task and row["iters"] == 2 and row["iters_per_second"] > 0
    assert row["peak_rss_mb"] > 0 and row["peak_rss_increase_mb"] >= 0
