"""A ``DetectionCheckpointer`` that can refuse partial loads."""

from detectron2.checkpoint import DetectionCheckpointer


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (e.g. it was trained for another class count)."""


class Checkpointer(DetectionCheckpointer):
    """detectron2's checkpointer; with ``strict=True`` a checkpoint whose tensors have other
    shapes than the model's (typically a class head trained for a different number of classes)
    or that lacks model weights raises instead of being skipped with a log line.

    Use ``strict=True`` for evaluation and inference, where skipped weights would stay random;
    training from an ``init_checkpoint`` (fine-tuning on new classes) keeps detectron2's
    logged skip.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.strict and (incompatible.incorrect_shapes or incompatible.missing_keys):
            lines = [
                f"  {k}: {tuple(c)} in the checkpoint, {tuple(m)} in the model"
                for k, c, m in incompatible.incorrect_shapes
            ]
            if incompatible.missing_keys:
                lines.append(
                    f"  missing from the checkpoint: {', '.join(incompatible.missing_keys[:10])}"
                    + (" ..." if len(incompatible.missing_keys) > 10 else "")
                )
            raise CheckpointMismatchError(
                "The checkpoint does not match the model:\n"
                + "\n".join(lines)
                + "\nA class head of "
                "another size means the checkpoint was trained for a different number of classes: set "
                "model.num_classes to match, or convert it with tools/convert_checkpoint.py."
            )
        return incompatible
