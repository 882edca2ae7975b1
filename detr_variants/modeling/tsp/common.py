"""Pieces TSP-FCOS and TSP-RCNN share: the released FPN top block, the random proposal drop,
rank-averaged loss normalisers, the all-padding guard of the encoder and an event storage for
training outside a trainer."""

import contextlib
from typing import List

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, has_event_storage
from torch import Tensor, nn


class TSPTopBlock(nn.Module):
    """The released "v2" FPN top block (``LastLevelMaxPoolV2``, despite its name no pooling):
    P6 = Conv3x3/s2 + norm on P5, P7 = Conv3x3/s2 + norm on ReLU(P6). Plugs into detectron2's
    ``FPN(top_block=...)``."""

    def __init__(self, channels: int = 256, norm: str = "SyncBN", in_feature: str = "p5"):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6 = Conv2d(channels, channels, 3, stride=2, padding=1, norm=get_norm(norm, channels))
        self.p7 = Conv2d(channels, channels, 3, stride=2, padding=1, norm=get_norm(norm, channels))

    def forward(self, x: Tensor) -> List[Tensor]:
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))]


def random_keep_count(n: int, lower: float, upper: float = 1.0) -> int:
    """TSP's random proposal drop: keep ``int(n·u)`` of ``n`` inputs, ``u ~ U(lower, upper]``
    (at least one when ``n > 0``)."""
    if not 0 < lower <= upper <= 1:
        raise ValueError(f"need 0 < lower <= upper <= 1, got {lower}, {upper}")
    u = upper - torch.rand(()).item() * (upper - lower)
    return min(n, max(int(n * u), 1)) if n > 0 else 0


def event_storage():
    """The running trainer's ``EventStorage``, or a throwaway one so that detectron2 components
    that log (RPN, ROI heads) also train outside a trainer (tests, benchmarks)."""
    return contextlib.nullcontext() if has_event_storage() else EventStorage()


def mean_over_ranks(value: Tensor, minimum: float) -> float:
    """``value`` summed over the distributed ranks, divided by their number, at least ``minimum``
    (the released normalisers: positives per GPU)."""
    value = value.detach().float().clone()
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(value)
    return max(value.item() / comm.get_world_size(), minimum)


def unmask_empty_rows(key_padding_mask: Tensor) -> Tensor:
    """Lets a sequence that is all padding attend to its first (zero) token instead of producing
    NaN; its outputs are discarded."""
    if key_padding_mask.shape[1] == 0:
        return key_padding_mask
    # branch-free (no data-dependent test), so that it exports with any input
    first = key_padding_mask[:, :1] & ~key_padding_mask.all(dim=1, keepdim=True)
    return torch.cat([first, key_padding_mask[:, 1:]], dim=1)
