"""Checkpoint loading (strict where a mismatch would give silently wrong results) and
converters from official and HF-transformers checkpoints."""

from . import conditional_detr, deformable_detr, smca, tsp  # noqa: F401  (register their converters)
from .convert import COCO_THING_IDS, convert_checkpoint, known_converters, register_converter
from .loading import Checkpointer, CheckpointMismatchError

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "COCO_THING_IDS",
    "convert_checkpoint",
    "known_converters",
    "register_converter",
]
