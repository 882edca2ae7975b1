"""The one classification setting of a set-prediction detector, read by its head, criterion and
matcher alike.

``"sigmoid"``: one logit per class, sigmoid focal loss and focal matching cost (Deformable DETR,
Conditional DETR, SMCA, TSP), top-k over queries × classes at inference. ``"softmax"``: the classes
plus "no object", cross-entropy and matching cost ``-p(class)`` (DETR), the best class per query
at inference.
"""

from typing import Sequence

CLASSIFICATIONS = ("sigmoid", "softmax")


def check_classification(classification: str, supported: Sequence[str] = CLASSIFICATIONS) -> str:
    """Returns ``classification`` if it is one of ``supported``, else raises ``ValueError``."""
    if classification not in supported:
        raise ValueError(f"classification must be one of {list(supported)}, got {classification!r}")
    return classification
