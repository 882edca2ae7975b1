"""Export (issue #15 §4): torch.export with dynamic H, W, ONNX in ONNX Runtime, TorchScript, the
post-processing of the raw outputs and tools/export_model.py, for every variant (tiny models,
random weights), and TSP-RCNN's fixed-size proposals against detectron2's RPN."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from detectron2.config import instantiate

from detr_variants.engine.export import (
    ExportableDetector,
    export_meta,
    export_program,
    exported_inputs,
    load_exported,
    pad_to_divisibility,
    postprocess_exported,
    save_exported,
    torchscript_module,
    trace_follows_input_size,
)
from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.layers.deformable_transformer import padding_or_none
from detr_variants.model_zoo import get_config
from detr_variants.modeling.tsp.common import unmask_empty_rows
from detr_variants.modeling.tsp.rcnn import fixed_size_rpn_proposals

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
    "tsp_rcnn": (  # 50 proposals after NMS: the RPN still ranks ~3000 boxes over 5 levels
        "tsp/tsp_rcnn_r18_synthetic",
        ["model.roi_heads.box_head.encoder.num_layers=1", "model.proposal_generator.post_nms_topk=[50,50]"],
        [(288, 320), (352, 256)],
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
    ONNX Runtime within 1e-4 on logits and normalised boxes (TSP-FCOS, TSP-RCNN: their pixel
    boxes divided by the image size, and the FoIs' levels and validity, the proposals'
    validity)."""
    model = tiny_model(variant)
    wrapper, meta = ExportableDetector(model), export_meta(model)
    raws = [raw_image(h, w, seed) for seed, (h, w) in enumerate(VARIANTS[variant][2])]
    if variant == "tsp_rcnn":  # padded by 8 and 20 px: its image_size input says where
        raws = [x[..., :-8, :-20] for x in raws]
    inputs = [exported_inputs(x, meta) for x in raws]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export_program(wrapper, inputs[0][0])
        path = str(tmp_path / "model.onnx")
        torch.onnx.export(program, dynamo=True, optimize=False, opset_version=18).save(path)
        expected = [wrapper(*x) for x in inputs]
        exported = [program.module()(*x) for x in inputs]
    run_onnx = load_exported(path, "onnx")
    for x, e, p in zip(inputs, expected, exported):
        image = x[0]
        assert len(p) == len(wrapper.output_names)
        assert max(max_diffs(e, p)) <= 1e-5, (image.shape, max_diffs(e, p))
        o = run_onnx(*x)
        assert [t.shape for t in o] == [t.shape for t in e]
        if variant.startswith("tsp"):  # absolute pixel boxes: compared normalised, as the others'
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32).repeat(e[1].shape[-1] // 4)
            e, o = (e[0], e[1] / scale, *e[2:]), (o[0], o[1] / scale, *o[2:])
        assert max(max_diffs(e, o)) <= 1e-4, (image.shape, max_diffs(e, o))
    assert inputs[0][0].shape != inputs[1][0].shape


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_postprocess_gives_the_models_own_detections(variant):
    """postprocess_exported on the wrapper's raw outputs (padded image for TSP-FCOS) gives the
    model's own detections for the original image, rescaled to its height/width: same classes,
    scores within 1e-5, boxes within 1e-3 px. TSP-RCNN's own detections come through
    detectron2's RPN and ROIPooler, the wrapper's through the fixed-size ones."""
    model = tiny_model(variant)
    wrapper, meta = ExportableDetector(model), json.loads(json.dumps(export_meta(model)))
    h, w = VARIANTS[variant][2][0]
    if meta["size_divisibility"] > 1:  # padded to 32: the same padding (hence ties) as the model's
        h, w = h - 8, w - 20
    image = raw_image(h, w, seed=3)
    original = (2 * h, 2 * w + 7)  # as if resized by the test-time augmentation
    with torch.no_grad():
        own = model([{"image": image[0], "height": original[0], "width": original[1]}])
        outputs = wrapper(*exported_inputs(image, meta))
    own = own[0]["instances"]
    got = postprocess_exported(outputs, (h, w), meta, output_size=original)
    assert got.image_size == own.image_size == original
    assert len(got) == len(own) > 0
    assert torch.equal(got.pred_classes, own.pred_classes)
    assert torch.allclose(got.scores, own.scores, atol=1e-5, rtol=0)
    assert torch.allclose(got.pred_boxes.tensor, own.pred_boxes.tensor, atol=1e-3, rtol=0)


@pytest.mark.parametrize("variant", ["detr", "conditional", "tsp_fcos"])
def test_torchscript_trace_follows_the_input_size(variant, tmp_path):
    """DETR, Conditional DETR and TSP-FCOS trace with sizes from tensors: the saved TorchScript
    module matches eager within 1e-5 at the trace size and at another."""
    model = tiny_model(variant)
    assert trace_follows_input_size(model)
    wrapper = ExportableDetector(model)
    images = [raw_image(h, w, seed) for seed, (h, w) in enumerate(VARIANTS[variant][2])]
    path = str(tmp_path / "model.pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_exported(wrapper, images[0], path, "torchscript")
        expected = [wrapper(x) for x in images]
    run = load_exported(path, "torchscript")
    for image, e in zip(images, expected):
        assert max(max_diffs(e, run(image))) <= 1e-5


@pytest.mark.parametrize("variant", ["deformable", "smca", "smca_ms"])
def test_fixed_size_torchscript_traces_refuse_other_sizes(variant, tmp_path):
    """Deformable DETR and SMCA (per-level loops on Python ints) trace at one size: the saved
    module matches eager within 1e-5 there and raises at another size, where the bare trace
    gives wrong outputs without an error (logits off by 0.06-0.12 at 150x100, measured)."""
    model = tiny_model(variant)
    assert not trace_follows_input_size(model)
    wrapper = ExportableDetector(model)
    image, other = (raw_image(h, w, seed) for seed, (h, w) in enumerate(VARIANTS[variant][2]))
    path = str(tmp_path / "model.pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_exported(wrapper, image, path, "torchscript")
        run = load_exported(path, "torchscript")
        assert max(max_diffs(wrapper(image), run(image))) <= 1e-5
        with pytest.raises(torch.jit.Error, match=r"traced at \(1, 3, \d+, \d+\)"):
            run(other)


# Writes fail past 1 MiB (RLIMIT_FSIZE, SIGXFSZ ignored), as on a full disk
FAILING_WRITE = """
import resource, signal, sys, torch
from detectron2.config import instantiate
from detr_variants.engine.export import ExportableDetector, save_exported
from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.model_zoo import get_config

model = instantiate(apply_overrides(get_config("detr/detr_r18_synthetic"), sys.argv[2:]).model)
wrapper = ExportableDetector(model.eval())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    with torch.no_grad():
        save_exported(wrapper, torch.zeros(1, 3, 96, 128), sys.argv[1], "torchscript")
except OSError as e:
    print("OSError:", e)
"""


def test_a_failed_write_is_an_error_not_a_crash(tmp_path):
    """A TorchScript file that cannot be written (a full disk) raises OSError and leaves nothing
    behind; given a path, torch's C++ writer aborts the whole process there instead."""
    path = tmp_path / "model.pt"
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_WRITE, str(path), *ONE_LAYER],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OSError: [Errno 27] File too large" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_torchscript_of_tsp_fcos_refuses_a_size_below_its_foi_count():
    """A trace fixes TSP-FCOS's FoI count min(num_fois, locations): tracing where there are
    fewer locations than FoIs is refused (96x96: 144 + 36 + 9 + 4 + 1 = 194 < 300)."""
    model = instantiate(get_config("tsp/tsp_fcos_r18_synthetic").model).eval()
    assert model.num_fois == 300
    with pytest.raises(ValueError, match="194 locations"):
        torchscript_module(ExportableDetector(model), raw_image(96, 96, 0))


def test_torchscript_of_tsp_rcnn_says_to_use_another_format():
    model = tiny_model("tsp_rcnn")
    with pytest.raises(NotImplementedError, match="--format export"):
        torchscript_module(ExportableDetector(model), raw_image(288, 320, 0))


def test_fixed_size_proposals_are_detectron2s_rpn_proposals():
    """fixed_size_rpn_proposals against detectron2's RPN on the same features, with a NaN
    objectness, an infinite box, boxes below min_box_size and fewer survivors than
    post_nms_topk: its valid rows are detectron2's proposals, exactly and in order, then
    padding (invalid, zero boxes)."""
    model = tiny_model("tsp_rcnn")
    rpn = model.proposal_generator
    rpn.min_box_size, rpn.post_nms_topk = 16.0, {False: 4000, True: 4000}

    def corrupt(module, inputs, outputs):
        logits, deltas = outputs
        logits[0][0, 0, 0, 0] = float("nan")
        deltas[1][0, 0, 1, 1] = float("inf")  # x offset of an anchor of P4
        return logits, deltas

    rpn.rpn_head.register_forward_hook(corrupt)
    image = raw_image(160, 224, seed=5)
    with torch.no_grad():
        images = model.preprocess_image([{"image": image[0]}])
        features = model.backbone(images.tensor)
        (theirs,), _ = rpn(images, features)
        boxes, valid = fixed_size_rpn_proposals(rpn, images, features)
    n = len(theirs)
    assert boxes.shape == (1, 4000, 4) and 0 < n < 4000
    assert valid[0, :n].all() and not valid[0, n:].any()
    assert torch.equal(boxes[0, :n], theirs.proposal_boxes.tensor)
    assert not boxes[0, n:].any()


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
