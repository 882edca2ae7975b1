"""detectron2's ``DetectionCheckpointer`` made safe to point at files from elsewhere and to
interrupt: allow-listed unpickling and verified downloads (:mod:`.safe_load`), optional strict
loads, atomic saves and a resume that survives a damaged last checkpoint."""

import logging
import os
import re
import zipfile
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .safe_load import (
    CorruptCheckpointError,
    is_url,
    load_pickle,
    load_torch,
    split_url,
    verified_local_copy,
)

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (e.g. it was trained for another class count)."""


class Checkpointer(DetectionCheckpointer):
    """detectron2's checkpointer, with:

    - safe reading: ``.pth`` through ``torch.load(weights_only=True)`` and ``.pkl`` through a
      restricted unpickler (see :mod:`.safe_load`); ``trust=True`` lifts the allow-list for
      trusted files. A URL is downloaded and checked against its SHA-256 (``?sha256=`` or a
      torch.hub file name) before it is read;
    - ``strict=True``: a checkpoint whose tensors have other shapes than the model's (typically
      a class head trained for a different number of classes) or that lacks model weights
      raises instead of being skipped with a log line. Use it for evaluation and inference,
      where skipped weights would stay random; fine-tuning from an ``init_checkpoint`` keeps
      detectron2's logged skip. Restoring training state (``resume``) is always strict about
      shapes, which the optimizer state must match;
    - atomic saves (temporary file in the same folder, fsync, rename), so a kill mid-write
      never leaves a truncated file under a checkpoint's name;
    - a resume that falls back, with a warning, to the newest intact ``model_*.pth`` when
      ``last_checkpoint`` is empty or names a missing or damaged file.
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        strict: bool = False,
        trust: bool = False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict
        self.trust = trust
        self._restoring_state = False

    # ------------------------------------------------------------------ reading
    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        if path and is_url(path):
            base, expected, query = split_url(path)
            path = verified_local_copy(base, expected)
            path += f"?{query}" if query else ""  # detectron2's ?matching_heuristics=True
        selected = self.checkpointables if checkpointables is None else checkpointables
        self._restoring_state = bool(selected)
        try:
            return super().load(path, checkpointables)
        finally:
            self._restoring_state = False

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # calls _torch_load
        data = load_pickle(filename, trust=self.trust)
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{filename} holds a {type(data).__name__}, not a dict")
        # detectron2's two .pkl layouts: its model zoo's, and Caffe2 / Detectron1 blobs
        if "model" in data and "__author__" in data:
            self.logger.info("Reading a file from '%s'", data["__author__"])
            return data
        blobs = data.get("blobs", data)
        blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return load_torch(f, trust=self.trust)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if not (incompatible.incorrect_shapes or incompatible.missing_keys):
            return incompatible
        if self._restoring_state:  # the optimizer state would not fit the parameters
            raise CheckpointMismatchError(
                _mismatch_lines(incompatible)
                + "\nThe run in this output folder was trained with another model config (e.g. "
                "model.num_classes); resume with that config, or start in a new train.output_dir."
            )
        if self.strict:
            raise CheckpointMismatchError(
                _mismatch_lines(incompatible) + "\nA class head of another size means the "
                "checkpoint was trained for a different number of classes: set "
                "model.num_classes to match, or convert it with tools/convert_checkpoint.py."
            )
        return incompatible

    # ------------------------------------------------------------------ writing
    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

    # ------------------------------------------------------------------ resuming
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            return self.load(self.resume_file())
        return self.load(path, checkpointables=[])

    def resume_file(self) -> str:
        """The checkpoint ``last_checkpoint`` names if it is intact, else the newest intact
        ``model_*.pth`` in ``save_dir`` (with a warning); raises ``CorruptCheckpointError``
        when there is none."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        named = self.get_checkpoint_file()
        basename = os.path.relpath(named, self.save_dir) if named else ""
        if basename in ("", "."):
            problem = "is empty"
        elif not os.path.isfile(named):
            problem = f"names {basename}, which does not exist"
        elif not is_intact(named):
            problem = f"names {named}, which is truncated or corrupt"
        else:
            return named
        intact = sorted(
            (
                f
                for f in self.get_all_checkpoint_files()
                if _iteration(f) is not None and is_intact(f)
            ),
            key=_iteration,
        )
        if not intact:
            raise CorruptCheckpointError(
                f"Cannot resume: {tag} {problem}, and {self.save_dir} holds no intact "
                "model_*.pth. Start without --resume (or in a new train.output_dir)."
            )
        logger.warning(
            "%s %s; resuming from %s, the newest intact checkpoint", tag, problem, intact[-1]
        )
        return intact[-1]


def is_intact(path: str) -> bool:
    """Whether a ``torch.save`` file is a complete zip archive whose members match their CRCs
    (every file ``torch.save`` has written since PyTorch 1.6 is one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _iteration(path: str) -> Optional[float]:
    """The iteration in a ``PeriodicCheckpointer`` file name; ``model_final`` is the last."""
    match = re.fullmatch(r"model_(\d+|final)\.pth", os.path.basename(path))
    if match is None:
        return None
    return float("inf") if match.group(1) == "final" else int(match.group(1))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str, write) -> None:
    """``write(binary file)`` into a temporary file next to ``path``, flushed to disk, then
    renamed over ``path``: readers see the old file or the complete new one, never a part.
    Writers that take a file object write through Python, so a full disk raises ``OSError``
    (torch's own C++ file writer, given a path, aborts the process there instead)."""
    folder, basename = os.path.split(path)
    tmp = os.path.join(folder, f".{basename}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _mismatch_lines(incompatible) -> str:
    lines = [
        f"  {k}: {tuple(c)} in the checkpoint, {tuple(m)} in the model"
        for k, c, m in incompatible.incorrect_shapes
    ]
    if incompatible.missing_keys:
        lines.append(
            f"  missing from the checkpoint: {', '.join(incompatible.missing_keys[:10])}"
            + (" ..." if len(incompatible.missing_keys) > 10 else "")
        )
    return "The checkpoint does not match the model:\n" + "\n".join(lines)


def load_inference_weights(
    model, path: str, *, trust: bool = False, allow_random_weights: bool = False
) -> None:
    """Loads ``path`` strictly into ``model`` for evaluation or inference. An empty ``path``
    raises (the results of random weights would look like a result) unless
    ``allow_random_weights``."""
    if not path:
        if not allow_random_weights:
            raise ValueError(
                "No checkpoint to evaluate or predict with: train.init_checkpoint is empty, so "
                "the model would keep its random initial weights. Set train.init_checkpoint to a "
                "trained or converted checkpoint (path or URL), or, to use random weights on "
                "purpose, train.allow_random_weights=True."
            )
        logger.warning("No checkpoint: using the model's random initial weights (as asked)")
        return
    Checkpointer(model, strict=True, trust=trust).load(path)
