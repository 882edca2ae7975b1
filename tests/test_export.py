"""Export (issue #15 §4): torch.export with dynamic H, W, ONNX in ONNX Runtime, TorchScript, the
post-processing of the raw outputs and tools/export_model.py, for every variant (tiny models,
random weights)."""

import json
import os
import sys
import warnings

import pytest
import torch
from detectron2.config import instantiate

from detr_variants.engine.export import (
    ExportableDetector,
    export_meta,
    export_program,
    load_exported,
    pad_to_divisibility,
    postprocess_exported,
    torchscript_module,
)
from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.layers.deformable_transformer import padding_or_none
from detr_variants.model_zoo import get_config
from detr_variants.modeling.tsp.common import unmask_empty_rows

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_LAYER = ["model.encoder.num_layers=1", "model.decoder.num_layers=1", "model.num_queries=10"]
# (config, overrides, two input sizes (h, w)); every level must have more than one cell at the
# example size (torch.export specialises size-1 dimensions): stride 64 (Deformable, multi-scale
# SMCA) needs 65 px, TSP-FCOS's P7 (stride 128) 129 px
VARIANTS = {
    "detr": ("detr/detr_r18_synthetic", ONE_LAYER, [(96, 128), (150, 100)]),
    "deformable": ("deformable_detr/deformable_detr_r18_synthetic", ONE_LAYER, [(96, 128), (150, 100)]),
    "deformable_two_stage_refine": (
        "deformable_detr/deformable_detr_r18_synthetic",
        ONE_LAYER + ["model.two_stage=True", "model.with_box_refine=True"],
        [(96, 128), (150, 100)],
    ),
    "conditional": ("conditional_detr/conditional_detr_r18_synthetic", ONE_LAYER, [(96, 128), (150, 100)]),
    "smca": ("smca_detr/smca_r18_synthetic", ONE_LAYER, [(96, 128), (150, 100)]),
    "smca_ms": ("smca_detr/smca_ms_r18_synthetic", ONE_LAYER[1:], [(96, 128), (150, 100)]),
    "tsp_fcos": (
        "tsp/tsp_fcos_r18_synthetic",
        ["model.encoder.num_layers=1", "model.num_fois=20"],
        [(288, 320), (352, 256)],  # multiples of 32 (padding makes tied scores, see below)
    ),
}  # fmt: skip


def tiny_model(variant):
    name, overrides, _ = VARIANTS[variant]
    torch.manual_seed(0)
    return instantiate(apply_overrides(get_config(name), overrides).model).eval()


def raw_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g).float()


def max_diffs(expected, got):
    return [(e.float() - g.float()).abs().max().item() for e, g in zip(expected, got)]


# plain Deformable DETR's export differs from two-stage + refine only in its query head: the
# export test runs the latter (its post-processing is tested for both)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "deformable"])
def test_torch_export_and_onnx_follow_the_input_size(variant, tmp_path):
    """One ``torch.export`` program with symbolic H, W (captured at the first size) and its ONNX
    translation in ONNX Runtime, against eager PyTorch at two sizes: the program within 1e-5,
    ONNX Runtime within 1e-4 on logits and normalised boxes (TSP-FCOS: its pixel boxes divided
    by the image size, and the FoIs' levels and validity)."""
    model = tiny_model(variant)
    wrapper, meta = ExportableDetector(model), export_meta(model)
    images = [
        pad_to_divisibility(raw_image(h, w, seed), meta)
        for seed, (h, w) in enumerate(VARIANTS[variant][2])
    ]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export_program(wrapper, images[0])
        path = str(tmp_path / "model.onnx")
        torch.onnx.export(program, dynamo=True, optimize=False, opset_version=18).save(path)
        expected = [wrapper(x) for x in images]
        exported = [program.module()(x) for x in images]
    run_onnx = load_exported(path, "onnx")
    for image, e, p in zip(images, expected, exported):
        assert len(p) == len(wrapper.output_names)
        assert max(max_diffs(e, p)) <= 1e-5, (image.shape, max_diffs(e, p))
        o = run_onnx(image)
        assert [t.shape for t in o] == [t.shape for t in e]
        if variant == "tsp_fcos":  # absolute pixel boxes: compared normalised, as the others'
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            e, o = (e[0], e[1] / scale, *e[2:]), (o[0], o[1] / scale, *o[2:])
        assert max(max_diffs(e, o)) <= 1e-4, (image.shape, max_diffs(e, o))
    assert images[0].shape != images[1].shape


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_postprocess_gives_the_models_own_detections(variant):
    """postprocess_exported on the wrapper's raw outputs (padded image for TSP-FCOS) gives the
    model's own detections for the original image, rescaled to its height/width: same classes,
    scores within 1e-5, boxes within 1e-3 px."""
    model = tiny_model(variant)
    wrapper, meta = ExportableDetector(model), json.loads(json.dumps(export_meta(model)))
    h, w = VARIANTS[variant][2][0]
    if variant == "tsp_fcos":  # padded to 32: the same padding (hence ties) as the model's own
        h, w = h - 8, w - 20
    image = raw_image(h, w, seed=3)
    original = (2 * h, 2 * w + 7)  # as if resized by the test-time augmentation
    with torch.no_grad():
        own = model([{"image": image[0], "height": original[0], "width": original[1]}])
        outputs = wrapper(pad_to_divisibility(image, meta))
    own = own[0]["instances"]
    got = postprocess_exported(outputs, (h, w), meta, output_size=original)
    assert got.image_size == own.image_size == original
    assert len(got) == len(own) > 0
    assert torch.equal(got.pred_classes, own.pred_classes)
    assert torch.allclose(got.scores, own.scores, atol=1e-5, rtol=0)
    assert torch.allclose(got.pred_boxes.tensor, own.pred_boxes.tensor, atol=1e-3, rtol=0)


@pytest.mark.parametrize("variant", ["detr", "conditional"])
def test_torchscript_trace_follows_the_input_size(variant, tmp_path):
    """DETR and Conditional DETR trace with symbolic sizes: the saved TorchScript module matches
    eager within 1e-5 at the trace size and at another."""
    model = tiny_model(variant)
    wrapper = ExportableDetector(model)
    images = [raw_image(h, w, seed) for seed, (h, w) in enumerate(VARIANTS[variant][2])]
    path = str(tmp_path / "model.pt")
    with torch.no_grad():
        torch.jit.save(torchscript_module(wrapper, images[0]), path)
        expected = [wrapper(x) for x in images]
    run = load_exported(path, "torchscript")
    for image, e in zip(images, expected):
        assert max(max_diffs(e, run(image))) <= 1e-5


@pytest.mark.parametrize("variant", ["deformable", "smca", "smca_ms"])
def test_torchscript_trace_of_multi_level_models_is_exact_at_the_traced_size(variant):
    """Deformable DETR and SMCA trace, but their per-level loops fix the sizes (documented):
    the trace matches eager within 1e-5 at the traced size."""
    model = tiny_model(variant)
    wrapper = ExportableDetector(model)
    image = raw_image(*VARIANTS[variant][2][0], seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torchscript_module(wrapper, image)
        assert max(max_diffs(wrapper(image), traced(image))) <= 1e-5


def test_torchscript_of_tsp_fcos_says_to_use_another_format():
    model = tiny_model("tsp_fcos")
    with pytest.raises(NotImplementedError, match="--format export"):
        torchscript_module(ExportableDetector(model), raw_image(288, 320, 0))


def test_bad_inputs_get_clear_errors():
    model = tiny_model("tsp_fcos")
    with pytest.raises(ValueError, match="multiples of 32"):
        ExportableDetector(model)(raw_image(280, 300, 0))
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        ExportableDetector(model)(raw_image(288, 320, 0)[0])
    with pytest.raises(TypeError, match="cannot be exported"):
        ExportableDetector(torch.nn.Linear(2, 2))


def test_pad_to_divisibility_pads_with_the_pixel_mean():
    meta = {"size_divisibility": 32, "pixel_mean": [1.0, 2.0, 3.0]}
    image = raw_image(40, 33, 0)
    padded = pad_to_divisibility(image, meta)
    assert padded.shape == (1, 3, 64, 64)
    assert torch.equal(padded[..., :40, :33], image)
    assert torch.equal(padded[0, :, 50, 60], torch.tensor([1.0, 2.0, 3.0]))
    assert pad_to_divisibility(image, {"size_divisibility": 0, "pixel_mean": [0.0] * 3}) is image


def test_padding_skip_stays_in_eager_and_empty_rows_unmask_without_branches():
    """Eager Deformable DETR still skips the value zeroing without padding (None); an
    all-padding row attends to its first token, other rows are unchanged."""
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert padding_or_none(mask) is None
    mask[1, 3] = True
    assert padding_or_none(mask) is mask
    rows = torch.tensor([[True, True, True], [False, True, True], [True, False, True]])
    expected = torch.tensor([[False, True, True], [False, True, True], [True, False, True]])
    assert torch.equal(unmask_empty_rows(rows), expected)


def test_export_model_tool_writes_and_checks_an_onnx_model(tmp_path):
    """tools/export_model.py --format onnx --check on a one-layer DETR: the model and its
    post-processing JSON are written; ONNX Runtime matches PyTorch within 1e-4 at two sizes."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import export_model
    finally:
        sys.path.pop(0)
    output = str(tmp_path / "detr.onnx")
    config = os.path.join(ROOT, "projects/detr/configs/detr_r18_synthetic.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model.main(
            ["--format", "onnx", "--config-file", config, "--output", output, "--size", "96", "128",
             "--check", *ONE_LAYER]
        )  # fmt: skip
    assert onnx.load(output).graph.input[0].name == "image"
    with open(output + ".json") as f:
        assert json.load(f)["classification"] == "softmax"
    diffs = [d for k, v in report.items() if k.startswith("max_abs_diff") for d in v]
    assert len(diffs) == 4 and max(diffs) <= 1e-4
