"""A LazyConfig-aware replacement for detectron2's ``DefaultPredictor`` (which takes a yacs
``CfgNode``)."""

from typing import Dict, Union

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..checkpoint import load_inference_weights
from .defaults import resolve_device


class DefaultPredictor:
    """Builds ``cfg.model``, loads ``cfg.train.init_checkpoint`` (strictly: a checkpoint for
    another class count raises; an empty one raises unless ``train.allow_random_weights``), and predicts one image at a time with the test-time resize of
    ``cfg.dataloader.test``.

    ``predictor(image)`` takes an HxWx3 uint8 array in BGR order (as ``cv2.imread`` gives) or a
    path to an image file, and returns ``{"instances": Instances}`` in original image coordinates.
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
    def __call__(self, image: Union[np.ndarray, str]) -> Dict:
        if isinstance(image, str):
            try:
                image = utils.read_image(image, format="BGR")
            except Exception as e:
                raise IOError(f"Cannot read image {image!r}: {e}") from e
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(
                f"expected an HxWx3 BGR image, got {getattr(image, 'shape', type(image))}"
            )
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return self.model([{"image": tensor, "height": height, "width": width}])[0]
