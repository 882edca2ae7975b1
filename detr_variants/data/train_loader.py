"""A training loader that ``--resume`` continues exactly.

detectron2's ``build_detection_train_loader`` draws from a ``TrainingSampler`` seeded once and
from each worker's random state, so a resumed run restarts the data order and the augmentations.
Here both are functions of the sample's position in the stream: epoch e is the permutation
``randperm(n)`` seeded with (seed, e), and sample p is mapped with numpy's and Python's global
random state seeded with (seed, p). The loader's :meth:`state_dict` (the next position and the
positions waiting in the aspect-ratio groups) is saved with the trainer, so after a resume the
batches are those of an uninterrupted run, with any number of workers.
"""

import logging
import random
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

_MAX_RETRIES = 10


@contextmanager
def _seeded(*key: int):
    """numpy's and Python's global random state seeded with ``key``, restored afterwards (the
    detectron2 augmentations draw from ``np.random``)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed([k % 2**32 for k in key])
    random.seed(sum(k % 2**32 << (32 * i) for i, k in enumerate(key)))
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _Samples:
    """Sample p of one rank's stream: its dataset index and its mapped dict."""

    def __init__(self, dataset, mapper: Callable, seed: int, rank: int, world_size: int):
        self.dataset, self.mapper, self.seed = dataset, mapper, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._perm = -1, None

    def index(self, p: int) -> int:
        """Global position p * world_size + rank of the shuffled stream of epochs."""
        g = p * self.world_size + self.rank
        epoch, i = divmod(g, len(self.dataset))
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=gen)
        return int(self._perm[i])

    def mapped(self, p: int) -> Dict:
        """The mapper's dict for sample p; where the mapper skips an image (returns None),
        another image drawn with the same seeding, as detectron2's ``MapDataset`` does."""
        idx = self.index(p)
        for attempt in range(_MAX_RETRIES):
            with _seeded(self.seed, p, attempt):
                if attempt:
                    idx = random.randrange(len(self.dataset))
                out = self.mapper(self.dataset[idx])
            if out is not None:
                return out
            logger.warning(
                "Failed to map dataset index %d (attempt %d), trying another", idx, attempt
            )
        raise RuntimeError(f"the mapper skipped {_MAX_RETRIES} images in a row (position {p})")


class _Stream(IterableDataset):
    """(p, mapped dict) for p = start, start + 1, ...; worker w of W takes p = start + w (mod W),
    so the DataLoader's round-robin over workers yields the stream in order."""

    def __init__(self, samples: _Samples, start: int):
        self.samples, self.start = samples, start

    def __iter__(self) -> Iterator[Tuple[int, Dict]]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        p = self.start + w
        while True:
            yield p, self.samples.mapped(p)
            p += workers


class ResumableTrainLoader:
    """Infinite iterable of training batches (lists of mapped dicts) in a resumable order.

    Args:
        dataset: list of dataset dicts.
        mapper: dataset dict → model input dict (with "width" and "height" for the grouping),
            or None to skip the image.
        batch_size: images per batch in this process.
        seed: shuffling and augmentation seed, shared by all processes.
        aspect_ratio_grouping: batch wide and tall images separately (detectron2's grouping).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: List[Dict],
        mapper: Callable,
        *,
        batch_size: int,
        seed: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
    ):
        self.batch_size, self.seed = batch_size, seed
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self._dataset = DatasetFromList(dataset, copy=False)  # serialised: no copy-on-write growth
        self._mapper = mapper
        self.position = 0  # this rank's next stream position not yet in a batch or a group
        self.groups: List[List[int]] = [[], []]  # positions waiting in each aspect-ratio group

    def state_dict(self) -> Dict:
        """Where the consumed batches end (saved with the trainer's checkpoint)."""
        return {
            "seed": self.seed,
            "position": self.position,
            "groups": [list(g) for g in self.groups],
        }

    def load_state_dict(self, state: Dict) -> None:
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self.groups = [list(g) for g in state["groups"]]

    def __iter__(self) -> Iterator[List[Dict]]:
        samples = _Samples(
            self._dataset, self._mapper, self.seed, comm.get_rank(), comm.get_world_size()
        )
        waiting = [[(p, samples.mapped(p)) for p in group] for group in self.groups]
        stream = DataLoader(
            _Stream(samples, self.position),
            batch_size=None,
            num_workers=self.num_workers,
            # its own generator: creating the iterator must not draw from torch's global RNG,
            # which the model's dropout continues from after a resume
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False,
        )
        for p, d in stream:
            # detectron2's groups: wider than tall, or not
            group = waiting[int(d["width"] <= d["height"]) if self.aspect_ratio_grouping else 0]
            group.append((p, d))
            self.position = p + 1
            if len(group) == self.batch_size:
                batch = [x for _, x in group]
                group.clear()
                self.groups = [[q for q, _ in g] for g in waiting]
                yield batch
            else:
                self.groups = [[q for q, _ in g] for g in waiting]


def build_resumable_train_loader(
    dataset: List[Dict],
    *,
    mapper: Callable,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    seed: Optional[int] = None,
) -> ResumableTrainLoader:
    """``build_detection_train_loader``'s arguments, for a :class:`ResumableTrainLoader`.

    Args:
        seed: shuffling and augmentation seed; None draws one shared by all processes (from the
            global seed that ``train.seed`` sets).
    """
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world:
        raise ValueError(
            f"total_batch_size ({total_batch_size}) must be a positive multiple of the number of "
            f"processes ({world})"
        )
    return ResumableTrainLoader(
        dataset,
        mapper,
        batch_size=total_batch_size // world,
        seed=comm.shared_random_seed() if seed is None else seed,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
    )
