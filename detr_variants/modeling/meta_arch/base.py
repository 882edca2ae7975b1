"""What every set-prediction detector shares: input normalisation and padding, GT conversion,
the criterion call in training and top-k/argmax inference into detectron2 ``Instances``.

A variant subclasses :class:`SetPredictionDetector` and implements :meth:`compute_outputs`,
which maps padded images and their padding mask to per-layer class logits and boxes.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import Backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from ...layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..backbone import feature_masks
from ..classification import CLASSIFICATIONS, check_classification


def set_prediction_outputs(logits: Tensor, boxes: Tensor, aux_loss: bool = True) -> Dict:
    """Per-layer predictions (L, B, Q, ·) → the criterion's dict: the last layer plus, with
    ``aux_loss``, one ``aux_outputs`` entry per earlier layer."""
    out: Dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
        ]
    return out


def set_prediction_inference(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: List[Tuple[int, int]],
    classification: str = "sigmoid",
    topk: int = 100,
) -> List[Instances]:
    """(B, Q, C) logits and (B, Q, 4) normalised cxcywh boxes → per image ``Instances`` with
    absolute xyxy boxes in the (resized) input frame and ``query_indices`` (the query behind each
    detection): the top ``topk`` of queries × classes by sigmoid (focal-loss models), or the best
    class per query by softmax without "no object"."""
    if classification == "sigmoid":
        b, q, c = logits.shape
        scores, index = logits.sigmoid().flatten(1).topk(min(topk, q * c), dim=1)
        labels, queries = index % c, index // c
        boxes = boxes.gather(1, queries.unsqueeze(-1).expand(-1, -1, 4))
    else:
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        queries = torch.arange(logits.shape[1], device=logits.device).repeat(len(labels), 1)
    results = []
    for s, l, bx, qi, (h, w) in zip(scores, labels, boxes, queries, image_sizes):
        inst = Instances((h, w))
        xyxy = box_cxcywh_to_xyxy(bx.float()) * bx.new_tensor([w, h, w, h], dtype=torch.float32)
        inst.pred_boxes = Boxes(xyxy)
        inst.scores = s.float()
        inst.pred_classes = l
        inst.query_indices = qi
        results.append(inst)
    return results


class SetPredictionDetector(nn.Module):
    """Base class of the DETR-family meta-architectures.

    A variant lists the classifications its head supports in ``classifications``, its default
    first.

    Args:
        backbone: a detectron2 ``Backbone``.
        criterion: computes the (weighted) loss dict from outputs and targets.
        num_classes: foreground classes (detectron2 contiguous ids).
        pixel_mean, pixel_std: per-channel normalisation, in ``input_format`` channel order.
        input_format: ``"RGB"`` (torchvision weights) or ``"BGR"`` (MSRA weights).
        classification: ``"sigmoid"`` (focal-loss models: top-k over queries × classes) or
            ``"softmax"`` (DETR: the best class per query, without the no-object class); the
            criterion and matcher read the same setting (configs interpolate it). None: the
            variant's default.
        test_topk: detections kept per image with ``classification="sigmoid"``.
        size_divisibility: pad the batch to a multiple of this (0: to the largest image).
    """

    classifications: Sequence[str] = CLASSIFICATIONS
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        *,
        backbone: Backbone,
        criterion: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        classification: Optional[str] = None,
        test_topk: int = 100,
        size_divisibility: int = 0,
    ):
        super().__init__()
        if len(pixel_mean) != len(pixel_std):
            raise ValueError("pixel_mean and pixel_std must have the same length")
        self.backbone = backbone
        self.criterion = criterion
        self.num_classes = num_classes
        self.input_format = input_format
        self.classification = check_classification(
            classification or self.classifications[0], self.classifications
        )
        self.test_topk = test_topk
        self.size_divisibility = size_divisibility
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---------------------------------------------------------------- what a variant implements
    def compute_outputs(self, images: ImageList, padding_mask: Tensor) -> Dict:
        """Returns ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) normalised cxcywh, and
        optionally ``aux_outputs`` / ``enc_outputs`` (see :func:`set_prediction_outputs`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared machinery
    def forward(self, batched_inputs: List[Dict]):
        """detectron2 interface: a loss dict in training, ``[{"instances": Instances}]`` in eval."""
        if len(batched_inputs) == 0:
            raise ValueError("empty batch")
        images, padding_mask = self.preprocess_image(batched_inputs)
        if self.training:
            return self.losses(batched_inputs, images, padding_mask)
        return self.postprocess(self.predict(images, padding_mask), batched_inputs)

    def losses(
        self, batched_inputs: List[Dict], images: ImageList, padding_mask: Tensor
    ) -> Dict[str, Tensor]:
        """The training step's loss dict (a variant whose outputs depend on the GT overrides it)."""
        targets = self.prepare_targets(batched_inputs)
        return self.criterion(self.compute_outputs(images, padding_mask), targets)

    def predict(self, images: ImageList, padding_mask: Tensor) -> List[Instances]:
        """Detections in the padded-input frame, before rescaling to the original size."""
        outputs = self.compute_outputs(images, padding_mask)
        return self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, Tensor]:
        """Normalises and pads the images; the mask is True at padding (also in eval, so results
        do not depend on which images share a batch)."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        images = ImageList.from_tensors(images, self.size_divisibility)
        b, _, h, w = images.tensor.shape
        padding_mask = torch.ones((b, h, w), dtype=torch.bool, device=self.device)
        for i, (ih, iw) in enumerate(images.image_sizes):
            padding_mask[i, :ih, :iw] = False
        return images, padding_mask

    def backbone_features(
        self, images: ImageList, padding_mask: Tensor
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Backbone feature maps and their padding masks, keyed by feature name."""
        features = self.backbone(images.tensor)
        return features, feature_masks(padding_mask, features)

    def prepare_targets(self, batched_inputs: List[Dict]) -> List[Dict[str, Tensor]]:
        """GT ``Instances`` → ``labels`` and boxes as cxcywh normalised by the image size."""
        targets = []
        for x in batched_inputs:
            inst: Instances = x["instances"].to(self.device)
            h, w = inst.image_size
            labels = inst.gt_classes.long()
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"GT class ids must be in [0, {self.num_classes}); got "
                    f"{labels.unique().tolist()} (does num_classes match the dataset?)"
                )
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor.float() / scale)
            targets.append({"labels": labels, "boxes": boxes})
        return targets

    def inference(
        self, logits: Tensor, boxes: Tensor, image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """Scores and absolute xyxy boxes in the (resized) input image frame, and
        ``query_indices``: the decoder query behind each detection."""
        return set_prediction_inference(
            logits, boxes, image_sizes, self.classification, self.test_topk
        )

    @staticmethod
    def postprocess(
        results: List[Instances], batched_inputs: List[Dict]
    ) -> List[Dict[str, Instances]]:
        """Rescales to each input's original ``height``/``width`` (detectron2 convention)."""
        processed = []
        for inst, x in zip(results, batched_inputs):
            h = x.get("height", inst.image_size[0])
            w = x.get("width", inst.image_size[1])
            processed.append({"instances": detector_postprocess(inst, h, w)})
        return processed
