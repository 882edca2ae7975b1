"""Export of the detectors to ``torch.export``, ONNX and TorchScript, and the post-processing
that turns the exported model's raw outputs into the detections of the PyTorch model.

:class:`ExportableDetector` takes one image (1, 3, H, W) of any height and width, float pixel
values in the model's ``input_format`` channel order, already resized as the test-time
augmentation does (``ResizeShortestEdge``). The pixel normalisation happens inside; one image
has no padding, so no mask is needed. A model with a ``size_divisibility`` (TSP-FCOS,
TSP-RCNN: 32) takes H and W multiples of it: :func:`pad_to_divisibility` pads with the pixel
mean, which normalises to the model's own zero padding. It returns the raw predictions
(:meth:`ExportableDetector.output_names`), and :func:`postprocess_exported` with the
:func:`export_meta` of the model reproduces its own inference (sigmoid top-k or softmax;
TSP-FCOS: per-level top-k and class-wise NMS; TSP-RCNN: detectron2's ``fast_rcnn_inference``).
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from ..checkpoint import atomic_write
from ..modeling.meta_arch.base import SetPredictionDetector, set_prediction_inference
from ..modeling.meta_arch.conditional_detr import ConditionalDETR
from ..modeling.meta_arch.detr import DETR
from ..modeling.tsp.fcos import TSPFCOS, tsp_fcos_detections
from ..modeling.tsp.rcnn import TSPRCNN

__all__ = [
    "ExportableDetector",
    "FixedSizeTrace",
    "export_meta",
    "exported_inputs",
    "pad_to_divisibility",
    "postprocess_exported",
    "torchscript_module",
    "trace_follows_input_size",
]


class ExportableDetector(nn.Module):
    """A detector's inference as a graph-capturable function of one image tensor.

    Args:
        model: a :class:`SetPredictionDetector` (DETR, Deformable DETR, Conditional DETR, SMCA,
            TSP-FCOS) or :class:`TSPRCNN` (through its fixed-size proposals,
            :func:`~detr_variants.modeling.tsp.rcnn.fixed_size_rpn_proposals`) in eval mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, (SetPredictionDetector, TSPRCNN)):
            raise TypeError(
                f"{type(model).__name__} cannot be exported: only SetPredictionDetector models "
                "(DETR, Deformable DETR, Conditional DETR, SMCA, TSP-FCOS) and TSP-RCNN are "
                "supported"
            )
        self.model = model
        self.eval()  # the wrapper too: the exporters read its mode

    @property
    def output_names(self) -> Tuple[str, ...]:
        """``logits`` (1, Q, C) and ``boxes`` (1, Q, 4), normalised cxcywh (TSP-FCOS: absolute
        xyxy in the padded input frame, and the FoIs' ``levels`` (1, Q) and ``valid`` (1, Q);
        TSP-RCNN: per proposal (Q = post-NMS top-k) ``logits`` (1, Q, K+1), class-specific
        absolute xyxy ``boxes`` (1, Q, 4K) and ``valid`` (1, Q))."""
        return tuple(name.removeprefix("pred_") for name in self._output_keys())

    @property
    def input_names(self) -> Tuple[str, ...]:
        """``image`` (1, 3, H, W); TSP-RCNN also ``image_size``: int64 (h, w) of the image
        before padding, to which detectron2 clips the proposals and by which the RoI encoding is
        normalised (the other models treat padding to ``size_divisibility`` as image)."""
        return ("image", "image_size") if isinstance(self.model, TSPRCNN) else ("image",)

    def example_inputs(self, image: Tensor) -> Tuple[Tensor, ...]:
        """The inputs to capture the graph with: ``image`` (and its own size, for TSP-RCNN)."""
        if isinstance(self.model, TSPRCNN):
            return image, torch.tensor(image.shape[-2:])
        return (image,)

    def forward(self, image: Tensor, image_size: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        model = self.model
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"expected one image (1, 3, H, W), got {tuple(image.shape)}")
        if image_size is not None and not isinstance(model, TSPRCNN):
            raise ValueError(f"{type(model).__name__} takes no image_size (padding is image)")
        h, w = image.shape[-2:]
        d = max(model.size_divisibility, 1)
        if h % d or w % d:
            raise ValueError(
                f"{type(model).__name__} needs H and W multiples of {d}, got {h}x{w}: pad the "
                "image with pad_to_divisibility first"
            )
        x = ((image.float() - model.pixel_mean) / model.pixel_std).contiguous()
        padding_mask = x.new_zeros((1, h, w), dtype=torch.bool)  # one image: no padding
        if image_size is not None:  # 0-d float tensors: the clipping and RoI encoding use them
            h, w = image_size.to(x.dtype).unbind()
        outputs = model.compute_outputs(ImageList(x, [(h, w)]), padding_mask)
        return tuple(outputs[name] for name in self._output_keys())

    def _output_keys(self) -> Tuple[str, ...]:
        keys = ("pred_logits", "pred_boxes")
        if isinstance(self.model, TSPFCOS):
            return keys + ("levels", "valid")
        return keys + ("valid",) if isinstance(self.model, TSPRCNN) else keys

    def dynamic_shapes(self) -> Tuple[Optional[Dict[int, object]], ...]:
        """``torch.export`` dynamic shapes of the inputs: any H and W (multiples of the
        model's ``size_divisibility``); ``image_size`` is static (2,)."""
        d = self.model.size_divisibility
        if d > 1:
            image = {2: torch.export.Dim("h_blocks") * d, 3: torch.export.Dim("w_blocks") * d}
        else:
            image = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
        return (image, None) if isinstance(self.model, TSPRCNN) else (image,)


def pad_to_divisibility(image: Tensor, meta: Dict) -> Tensor:
    """Pads (right and bottom) an image (1, 3, H, W) of raw pixel values to the model's
    ``size_divisibility`` with the pixel mean, which normalises to the zeros the model itself
    pads with (TSP-FCOS: 32). Other models take any size and get the image back unchanged."""
    d = max(meta["size_divisibility"], 1)
    h, w = image.shape[-2:]
    ph, pw = -(-h // d) * d, -(-w // d) * d
    if (ph, pw) == (h, w):
        return image
    mean = torch.tensor(meta["pixel_mean"], dtype=image.dtype, device=image.device)
    out = mean.view(1, -1, 1, 1).repeat(image.shape[0], 1, ph, pw)
    out[..., :h, :w] = image
    return out


def exported_inputs(image: Tensor, meta: Dict) -> Tuple[Tensor, ...]:
    """The exported model's inputs for an image (1, 3, h, w) of raw pixel values:
    :func:`pad_to_divisibility`, and for TSP-RCNN the int64 size (h, w) before padding."""
    padded = pad_to_divisibility(image, meta)
    if meta["architecture"] == "TSPRCNN":
        return padded, torch.tensor(image.shape[-2:])
    return (padded,)


def export_meta(model: nn.Module) -> Dict:
    """What :func:`postprocess_exported` needs to know about ``model`` (JSON-serialisable)."""
    meta = {
        "architecture": type(model).__name__,
        "input_format": model.input_format,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "size_divisibility": model.size_divisibility,
    }
    if isinstance(model, TSPRCNN):
        predictor = model.roi_heads.box_predictor
        return meta | {
            "test_score_thresh": predictor.test_score_thresh,
            "test_nms_thresh": predictor.test_nms_thresh,
            "test_topk_per_image": predictor.test_topk_per_image,
        }
    meta["test_topk"] = model.test_topk
    if isinstance(model, TSPFCOS):
        return meta | {
            "num_levels": len(model.in_features),
            "test_score_thresh": model.test_score_thresh,
            "test_topk_per_level": model.test_topk_per_level,
            "test_nms_thresh": model.test_nms_thresh,
        }
    return meta | {"classification": model.classification}


def postprocess_exported(
    outputs: Sequence[Tensor],
    image_size: Tuple[int, int],
    meta: Dict,
    output_size: Optional[Tuple[int, int]] = None,
) -> Instances:
    """The exported model's outputs → the detections the PyTorch model gives for the same image.

    Args:
        outputs: the exported model's outputs (:attr:`ExportableDetector.output_names`), as
            tensors (numpy arrays from ONNX Runtime: ``torch.from_numpy``).
        image_size: (h, w) of the image fed to the exported model.
        meta: :func:`export_meta` of the model (``tools/export_model.py`` writes it as JSON).
        output_size: (height, width) of the original image to rescale the boxes to, as
            detectron2's ``detector_postprocess`` (None: keep the input frame).

    Returns:
        ``Instances`` with ``pred_boxes`` (absolute xyxy), ``scores`` and ``pred_classes``.
    """
    outputs = [torch.as_tensor(o) for o in outputs]
    if meta["architecture"] == "TSPRCNN":  # detectron2's fast_rcnn_inference on the valid rows
        logits, boxes, valid = (o[0] for o in outputs)
        valid = valid.bool()
        (inst,), (kept,) = fast_rcnn_inference(
            [boxes[valid]],
            [logits[valid].softmax(-1)],
            [tuple(image_size)],
            meta["test_score_thresh"],
            meta["test_nms_thresh"],
            meta["test_topk_per_image"],
        )
        inst.query_indices = kept  # the proposal behind each detection (valid rows come first)
    elif "num_levels" in meta:  # TSP-FCOS
        logits, boxes, levels, valid = outputs
        (inst,) = tsp_fcos_detections(
            logits,
            boxes,
            levels,
            valid.bool(),
            [tuple(image_size)],
            num_levels=meta["num_levels"],
            score_thresh=meta["test_score_thresh"],
            topk_per_level=meta["test_topk_per_level"],
            nms_thresh=meta["test_nms_thresh"],
            topk=meta["test_topk"],
        )
    else:
        logits, boxes = outputs
        (inst,) = set_prediction_inference(
            logits, boxes, [tuple(image_size)], meta["classification"], meta["test_topk"]
        )
    return inst if output_size is None else detector_postprocess(inst, *output_size)


EXPORT_FORMATS = ("onnx", "torchscript", "export")


def save_exported(wrapper: ExportableDetector, example: Tensor, path: str, fmt: str) -> None:
    """Captures ``wrapper`` with dynamic H, W from ``example`` (1, 3, H, W) and saves it as
    ``fmt``: ``"export"`` (a ``torch.export`` program, ``.pt2``), ``"onnx"`` (the dynamo exporter,
    opset 18: deformable attention through its ``grid_sample`` path, which stock ONNX Runtime
    runs) or ``"torchscript"`` (a trace, see :func:`torchscript_module`). Written atomically:
    a failed write (a full disk) raises ``OSError`` and leaves no partial file."""
    if fmt == "export":
        program = export_program(wrapper, example)
        atomic_write(path, lambda f: torch.export.save(program, f))
    elif fmt == "onnx":
        program = torch.onnx.export(
            wrapper,
            wrapper.example_inputs(example),
            dynamo=True,
            dynamic_shapes=wrapper.dynamic_shapes(),
            input_names=list(wrapper.input_names),
            output_names=list(wrapper.output_names),
            opset_version=18,
            optimize=False,  # the onnxscript optimizer (0.7.2) drops a node of Deformable DETR
        )
        program.save(path)
    elif fmt == "torchscript":
        module = torchscript_module(wrapper, example)
        atomic_write(path, lambda f: torch.jit.save(module, f))
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")


def trace_follows_input_size(model: nn.Module) -> bool:
    """Whether a ``torch.jit.trace`` of ``model`` is right at every input size: DETR,
    Conditional DETR and TSP-FCOS compute their shapes from tensors (tested at two sizes).
    Deformable DETR and SMCA loop over levels on Python ints, which a trace fixes to the
    example's size. Exact types only: a subclass (SMCA is a DETR) may change that."""
    return type(model) in (DETR, ConditionalDETR, TSPFCOS)


class FixedSizeTrace(nn.Module):
    """A trace that is right at one input size only, refusing every other with an error
    (scripted around the trace, so the saved TorchScript module keeps the check)."""

    def __init__(self, traced: torch.jit.ScriptModule, height: int, width: int):
        super().__init__()
        self.traced = traced
        self.height = height
        self.width = width

    def forward(self, image: Tensor):
        if image.dim() != 4 or image.shape[2] != self.height or image.shape[3] != self.width:
            raise ValueError(
                "this TorchScript model was traced at (1, 3, {}, {}) and is right at that size "
                "only, got {}: resize or pad the image to it, or export with --format export "
                "or onnx (any size)".format(self.height, self.width, image.shape)
            )
        return self.traced(image)


def torchscript_module(wrapper: ExportableDetector, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``wrapper`` at ``example``'s size. Where the trace does not follow
    the input size (:func:`trace_follows_input_size`), it is wrapped in :class:`FixedSizeTrace`,
    which raises at any other size instead of giving wrong outputs."""
    model = wrapper.model
    if isinstance(model, TSPRCNN):
        raise NotImplementedError(
            "TSP-RCNN is not offered as TorchScript (a trace fixes its per-level proposal "
            "counts to the example's size, and its second input, image_size, does not fit the "
            "size-checked wrapper); export it with --format export or --format onnx"
        )
    if isinstance(model, TSPFCOS):  # a trace fixes the FoI count min(num_fois, locations)
        h, w = example.shape[-2:]
        locations = sum(-(-h // s) * -(-w // s) for s in model.strides)
        if locations < model.num_fois:
            raise ValueError(
                f"TSP-FCOS traced at {h}x{w} would fix its FoI count to the {locations} "
                f"locations there (< num_fois {model.num_fois}): trace at a larger size"
            )
    traced = torch.jit.trace(wrapper, wrapper.example_inputs(example), check_trace=False)
    if trace_follows_input_size(model):
        return traced
    return torch.jit.script(FixedSizeTrace(traced, *example.shape[-2:]))


def export_program(wrapper: ExportableDetector, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``wrapper`` with symbolic H and W."""
    return torch.export.export(
        wrapper, wrapper.example_inputs(example), dynamic_shapes=wrapper.dynamic_shapes()
    )


def load_exported(path: str, fmt: str):
    """The saved model as a function of its inputs (:attr:`ExportableDetector.input_names`: a
    (1, 3, H, W) tensor, for TSP-RCNN also its size) to a tuple of tensors."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*inputs: Tensor) -> Tuple[Tensor, ...]:
            feed = [inputs[0].detach().cpu().float().numpy(), *(x.numpy() for x in inputs[1:])]
            outputs = session.run(None, dict(zip(names, feed)))
            return tuple(torch.from_numpy(o) for o in outputs)

        return run
    module = torch.export.load(path).module() if fmt == "export" else torch.jit.load(path)

    def call(*inputs: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            return tuple(module(*inputs))

    return call
