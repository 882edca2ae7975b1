"""Checkpoint loading (allow-listed unpickling, verified downloads, strict where a mismatch would
give silently wrong results) and converters from official and HF-transformers checkpoints."""

from . import conditional_detr, deformable_detr, detr, smca, tsp  # noqa: F401  (register them)
from .convert import COCO_THING_IDS, convert_checkpoint, known_converters, register_converter
from .loading import (
    Checkpointer,
    CheckpointMismatchError,
    atomic_torch_save,
    atomic_write,
    load_inference_weights,
)
from .safe_load import (
    ChecksumError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_file,
)

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "ChecksumError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "COCO_THING_IDS",
    "atomic_torch_save",
    "atomic_write",
    "convert_checkpoint",
    "known_converters",
    "load_checkpoint_file",
    "load_inference_weights",
    "register_converter",
]
