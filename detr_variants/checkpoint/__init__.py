"""Checkpoint loading (strict where a mismatch would give silently wrong results) and
converters from official and HF-transformers checkpoints."""

from . import conditional_detr, deformable_detr, detr, smca, tsp  # noqa: F401  (register them)
from .convert import COCO_THING_IDS, convert_checkpoint, register_converter
from .loading import Checkpointer, CheckpointMismatchError

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "COCO_THING_IDS",
    "convert_checkpoint",
    "register_converter",
]
