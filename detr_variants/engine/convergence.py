"""A training hook that records COCO AP against iteration and training time (convergence curves).

Training time is counted per step, from just before the step (data loading included, when it
runs in the training process) to the end of its EMA and LR updates, so evaluation, checkpoints
and log writes are left out. It is counted twice: wall-clock seconds (``time.perf_counter``) and
the process's CPU seconds (``time.process_time``, all its threads), which a machine shared with
other work slows down much less than the wall clock. Both are cumulative and saved with the
checkpoint, so a resumed run continues the sums where the checkpoint left them.
"""

import copy
import math
import time
from typing import Callable, Dict, List, Optional

from detectron2.engine import HookBase

__all__ = ["AP_KEYS", "ConvergenceRecorder"]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class ConvergenceRecorder(HookBase):
    """Evaluates every ``period`` iterations and after the last one, and keeps one point each:
    ``iteration`` (iterations done), cumulative ``train_cpu_s`` / ``train_wall_s``,
    ``eval_wall_s`` and the COCO box metrics :data:`AP_KEYS` (percent; None where COCO gives NaN,
    e.g. no small objects). Each (re)start of training appends a ``segments`` entry: its first
    iteration and ``environment``.

    Register it before the periodic checkpointer with the same period
    (:func:`~detr_variants.engine.lazy_train.train`'s ``extra_hooks`` does), so every checkpoint
    holds the points up to its iteration and a resume continues them exactly.

    Args:
        evaluate: runs the evaluation; returns detectron2's results (``{"bbox": {"AP": ...}}``).
        period: iterations between evaluations.
        on_record: called with :meth:`record` when training starts or resumes and after every
            point, e.g. to write it to a file.
        environment: facts about this process to keep with its segment (versions, threads).
    """

    def __init__(
        self,
        evaluate: Callable[[], Dict],
        *,
        period: int,
        on_record: Callable[[Dict], None],
        environment: Optional[Dict] = None,
    ):
        if period <= 0:
            raise ValueError(f"period must be positive, got {period}")
        self._evaluate, self._period, self._on_record = evaluate, period, on_record
        self._environment = dict(environment or {})
        self.train_cpu_s = self.train_wall_s = 0.0
        self.points: List[Dict] = []
        self.segments: List[Dict] = []

    def record(self) -> Dict:
        """The points and segments so far, ``max_iter`` and whether the last point is its end."""
        max_iter = self.trainer.max_iter
        return {
            "max_iter": max_iter,
            "finished": bool(self.points) and self.points[-1]["iteration"] == max_iter,
            "points": copy.deepcopy(self.points),
            "segments": copy.deepcopy(self.segments),
        }

    def before_train(self):
        # a resume has already restored the sums and points of the checkpoint (load_state_dict)
        self.segments.append({"start_iteration": self.trainer.start_iter, **self._environment})
        self._on_record(self.record())

    def before_step(self):
        self._cpu_start, self._wall_start = time.process_time(), time.perf_counter()

    def after_step(self):
        self.train_cpu_s += time.process_time() - self._cpu_start
        self.train_wall_s += time.perf_counter() - self._wall_start
        done = self.trainer.iter + 1
        if done % self._period == 0 or done == self.trainer.max_iter:
            self._add_point(done)

    def _add_point(self, iteration: int) -> None:
        start = time.perf_counter()
        results = self._evaluate()
        if "bbox" not in results:
            raise RuntimeError(
                f"iteration {iteration}: the evaluation gave no box metrics ({list(results)}); "
                "check dataloader.test and dataloader.evaluator"
            )
        self.points.append(
            {
                "iteration": iteration,
                "train_cpu_s": self.train_cpu_s,
                "train_wall_s": self.train_wall_s,
                "eval_wall_s": time.perf_counter() - start,
                **{k: _finite_or_none(results["bbox"][k]) for k in AP_KEYS},
            }
        )
        self._on_record(self.record())

    def state_dict(self) -> Dict:
        return {
            "train_cpu_s": self.train_cpu_s,
            "train_wall_s": self.train_wall_s,
            "points": copy.deepcopy(self.points),
            "segments": copy.deepcopy(self.segments),
        }

    def load_state_dict(self, state: Dict) -> None:
        self.train_cpu_s = float(state["train_cpu_s"])
        self.train_wall_s = float(state["train_wall_s"])
        self.points = copy.deepcopy(list(state["points"]))
        self.segments = copy.deepcopy(list(state["segments"]))


def _finite_or_none(value) -> Optional[float]:
    return float(value) if math.isfinite(value) else None
