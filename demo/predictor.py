"""Draws a predictor's detections on images and video frames with detectron2's ``Visualizer`` /
``VideoVisualizer`` (the role of detectron2's ``demo/predictor.py``, for LazyConfigs)."""

from typing import Dict, Iterator, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import VisImage, Visualizer

from detr_variants.engine import DefaultPredictor


def test_metadata(cfg):
    """The metadata (class names) of the config's first test dataset when it is registered;
    otherwise empty metadata, and the drawings name classes by their ids."""
    names = cfg.dataloader.test.dataset.names
    name = names if isinstance(names, str) else names[0]
    return MetadataCatalog.get(name if name in DatasetCatalog.list() else "__unused")


class VisualizationDemo:
    """Runs :class:`~detr_variants.engine.DefaultPredictor` (the config's test resize and device)
    and draws its detections scoring at least ``confidence_threshold``."""

    def __init__(self, cfg, *, confidence_threshold: float = 0.5):
        self.predictor = DefaultPredictor(cfg)
        self.metadata = test_metadata(cfg)
        self.confidence_threshold = confidence_threshold

    def _detections(self, image: np.ndarray) -> Dict:
        predictions = self.predictor(image, score_threshold=self.confidence_threshold)
        predictions["instances"] = predictions["instances"].to("cpu")
        return predictions

    def run_on_image(self, image: np.ndarray) -> Tuple[Dict, VisImage]:
        """``image``: HxWx3 BGR uint8. Returns the kept predictions and the drawing (RGB)."""
        predictions = self._detections(image)
        visualizer = Visualizer(image[:, :, ::-1], self.metadata)
        return predictions, visualizer.draw_instance_predictions(predictions["instances"])

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Yields each frame of ``video`` (a file or a camera) with its detections, BGR."""
        visualizer = VideoVisualizer(self.metadata)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            instances = self._detections(frame)["instances"]
            drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield cv2.cvtColor(drawn.get_image(), cv2.COLOR_RGB2BGR)
