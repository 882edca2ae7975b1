"""Export of the detectors to ``torch.export``, ONNX and TorchScript, and the post-processing
that turns the exported model's raw outputs into the detections of the PyTorch model.

:class:`ExportableDetector` takes one image (1, 3, H, W) of any height and width, float pixel
values in the model's ``input_format`` channel order, already resized as the test-time
augmentation does (``ResizeShortestEdge``). The pixel normalisation happens inside; one image
has no padding, so no mask is needed. A model with a ``size_divisibility`` (TSP-FCOS: 32) takes
H and W multiples of it: :func:`pad_to_divisibility` pads with the pixel mean, which normalises
to the model's own zero padding. It returns the raw predictions (:meth:`ExportableDetector.output_names`), and
:func:`postprocess_exported` with the :func:`export_meta` of the model reproduces its own
inference (sigmoid top-k or softmax; TSP-FCOS: per-level top-k and class-wise NMS).
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from ..modeling.meta_arch.base import SetPredictionDetector, set_prediction_inference
from ..modeling.tsp.fcos import TSPFCOS, tsp_fcos_detections

__all__ = ["ExportableDetector", "export_meta", "pad_to_divisibility", "postprocess_exported"]


class ExportableDetector(nn.Module):
    """A detector's inference as a graph-capturable function of one image tensor.

    Args:
        model: a :class:`SetPredictionDetector` (DETR, Deformable DETR, Conditional DETR, SMCA,
            TSP-FCOS) in eval mode. TSP-RCNN (detectron2's RPN with data-dependent NMS) is not
            supported, see ``projects/tsp/README.md``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, SetPredictionDetector):
            raise TypeError(
                f"{type(model).__name__} cannot be exported: only SetPredictionDetector models "
                "(DETR, Deformable DETR, Conditional DETR, SMCA, TSP-FCOS) are supported"
            )
        self.model = model
        self.eval()  # the wrapper too: the exporters read its mode

    @property
    def output_names(self) -> Tuple[str, ...]:
        """``logits`` (1, Q, C) and ``boxes`` (1, Q, 4), normalised cxcywh (TSP-FCOS: absolute
        xyxy in the padded input frame, and the FoIs' ``levels`` (1, Q) and ``valid`` (1, Q))."""
        if isinstance(self.model, TSPFCOS):
            return ("logits", "boxes", "levels", "valid")
        return ("logits", "boxes")

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"expected one image (1, 3, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        d = max(model.size_divisibility, 1)
        if h % d or w % d:
            raise ValueError(
                f"{type(model).__name__} needs H and W multiples of {d}, got {h}x{w}: pad the "
                "image with pad_to_divisibility first"
            )
        x = ((image.float() - model.pixel_mean) / model.pixel_std).contiguous()
        padding_mask = x.new_zeros((1, h, w), dtype=torch.bool)  # one image: no padding
        outputs = model.compute_outputs(ImageList(x, [(h, w)]), padding_mask)
        return tuple(outputs[name] for name in self._output_keys())

    def _output_keys(self) -> Tuple[str, ...]:
        keys = ("pred_logits", "pred_boxes")
        return keys + ("levels", "valid") if isinstance(self.model, TSPFCOS) else keys

    def dynamic_shapes(self) -> Tuple[Dict[int, object]]:
        """``torch.export`` dynamic shapes of the input: any H and W (multiples of the
        model's ``size_divisibility``)."""
        d = self.model.size_divisibility
        if d > 1:
            return ({2: torch.export.Dim("h_blocks") * d, 3: torch.export.Dim("w_blocks") * d},)
        return ({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)


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


def export_meta(model: nn.Module) -> Dict:
    """What :func:`postprocess_exported` needs to know about ``model`` (JSON-serialisable)."""
    meta = {
        "architecture": type(model).__name__,
        "input_format": model.input_format,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "size_divisibility": model.size_divisibility,
        "test_topk": model.test_topk,
    }
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
    if "num_levels" in meta:  # TSP-FCOS
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
    runs) or ``"torchscript"`` (see :func:`torchscript_module`)."""
    if fmt == "export":
        torch.export.save(export_program(wrapper, example), path)
    elif fmt == "onnx":
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            dynamic_shapes=wrapper.dynamic_shapes(),
            input_names=["image"],
            output_names=list(wrapper.output_names),
            opset_version=18,
            optimize=False,  # the onnxscript optimizer (0.7.2) drops a node of Deformable DETR
        )
        program.save(path)
    elif fmt == "torchscript":
        torch.jit.save(torchscript_module(wrapper, example), path)
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")


def torchscript_module(wrapper: ExportableDetector, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``wrapper`` at ``example``'s size.

    The trace follows the input size for DETR and Conditional DETR only: the per-level loops of
    Deformable DETR and SMCA run on Python ints, which a trace fixes to the example's sizes (its
    outputs are exact at that size alone), and TSP-FCOS's FoI count does not trace. Use the
    ``"export"`` or ``"onnx"`` format for those (any size).
    """
    if isinstance(wrapper.model, TSPFCOS):
        raise NotImplementedError(
            "TSP-FCOS does not trace to TorchScript (its FoI count min(num_fois, locations) is "
            "symbolic); export it with --format export or --format onnx"
        )
    return torch.jit.trace(wrapper, (example,), check_trace=False)


def export_program(wrapper: ExportableDetector, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``wrapper`` with symbolic H and W."""
    return torch.export.export(wrapper, (example,), dynamic_shapes=wrapper.dynamic_shapes())


def load_exported(path: str, fmt: str):
    """The saved model as a function of a (1, 3, H, W) tensor to a tuple of tensors."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(image: Tensor) -> Tuple[Tensor, ...]:
            outputs = session.run(None, {name: image.detach().cpu().float().numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run
    module = torch.export.load(path).module() if fmt == "export" else torch.jit.load(path)

    def call(image: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            return tuple(module(image))

    return call
