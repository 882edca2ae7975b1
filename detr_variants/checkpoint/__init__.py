"""Checkpoint loading (strict where a mismatch would give silently wrong results) and
converters from official and HF-transformers checkpoints."""
from .loading import Checkpointer, CheckpointMismatchError

__all__ = ["Checkpointer", "CheckpointMismatchError"]
