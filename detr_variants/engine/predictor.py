"""A LazyConfig-aware replacement for detectron2's ``DefaultPredictor`` (which takes a yacs
``CfgNode``)."""

import os
from typing import Dict, Union

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T

from ..checkpoint import load_inference_weights
from ..data.image_io import SUPPORTED_FORMATS, read_image
from .devices import resolve_device


class DefaultPredictor:
    """Builds ``cfg.model``, loads ``cfg.train.init_checkpoint`` (strictly: a checkpoint for
    another class count raises; an empty one raises unless ``train.allow_random_weights``), and
    predicts one image at a time with the test-time resize of ``cfg.dataloader.test``.

    ``predictor(image)`` takes an HxWx3 uint8 array in BGR order (as ``cv2.imread`` gives; RGB
    with ``format="RGB"``) or a path to an image file, and returns ``{"instances": Instances}``
    in original image coordinates; anything else gets a TypeError or ValueError saying why.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = instantiate(cfg.model).to(resolve_device(cfg.train.get("device", "auto")))
        self.model.eval()
        load_inference_weights(
            self.model,
            cfg.train.get("init_checkpoint", ""),
            trust=cfg.train.get("trust_checkpoint", False),
            allow_random_weights=cfg.train.get("allow_random_weights", False),
        )
        self.augmentations = T.AugmentationList(
            list(instantiate(cfg.dataloader.test.mapper.augmentations))
        )
        self.input_format = self.model.input_format

    @torch.no_grad()
    def __call__(
        self,
        image: Union[np.ndarray, str, os.PathLike],
        *,
        format: str = "BGR",
        score_threshold: float = 0.0,
    ) -> Dict:
        """Predicts one image.

        Args:
            image: a path (``str`` or ``pathlib.Path``), or an HxWx3 ``uint8`` array in
                ``format``; an HxW (or HxWx1) ``uint8`` array is taken as grayscale and
                repeated to three channels.
            format: channel order of an array, ``"BGR"`` (as ``cv2.imread`` gives; detectron2's
                convention) or ``"RGB"``.
            score_threshold: keep only detections scoring at least this.

        Raises:
            IOError: an unreadable file. TypeError / ValueError: any other input, saying why.
        """
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image, format="BGR")
            format = "BGR"
        image = _checked_array(image, format)
        if format != self.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        out = self.model([{"image": tensor, "height": height, "width": width}])[0]
        if score_threshold > 0:
            instances = out["instances"]
            out["instances"] = instances[instances.scores >= score_threshold]
        return out


def _checked_array(image, format: str) -> np.ndarray:
    """An HxWx3 ``uint8`` array, or a TypeError / ValueError that says what is wrong."""
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"format must be one of {SUPPORTED_FORMATS}, got {format!r}")
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"expected a path or an HxWx3 uint8 numpy array, got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        hint = " (it contains NaN)" if image.dtype.kind == "f" and np.isnan(image).any() else ""
        raise ValueError(
            f"expected a uint8 image, got dtype {image.dtype}{hint}; a float image in 0..1 "
            "converts with (image * 255).round().astype(np.uint8)"
        )
    if image.ndim == 3 and image.shape[2] == 1 or image.ndim == 2:
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=2)  # grayscale
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected an HxWx3 image (or HxW grayscale), got shape {image.shape}; drop an "
            "alpha channel with image[..., :3]"
        )
    if image.size == 0:
        raise ValueError(f"the image is empty (shape {image.shape})")
    return image
