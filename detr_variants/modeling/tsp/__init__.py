"""TSP-FCOS and TSP-RCNN (Sun et al. 2021): shared pieces, the FCOS variant, the R-CNN variant."""

from .common import TSPTopBlock, random_keep_count
from .fcos import TSPFCOS, FoIClassifier, TSPFCOSCriterion, fcos_assignment
from .rcnn import (
    TSPRCNN,
    TransformerROIHeads,
    TSPBoxHead,
    TSPFastRCNNOutputLayers,
    TSPRPNHead,
    roi_position_encoding,
)

__all__ = [
    "TSPTopBlock",
    "random_keep_count",
    "TSPFCOS",
    "FoIClassifier",
    "TSPFCOSCriterion",
    "fcos_assignment",
    "TSPRCNN",
    "TransformerROIHeads",
    "TSPBoxHead",
    "TSPFastRCNNOutputLayers",
    "TSPRPNHead",
    "roi_position_encoding",
]
