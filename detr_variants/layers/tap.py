"""A hook point: an empty module a layer calls with the intermediate values worth seeing.

``Tap`` computes nothing and stores nothing; a forward hook registered with
``register_forward_hook(hook, with_kwargs=True)`` receives the values as keyword arguments.
Without hooks a call costs one Python call. :func:`detr_variants.utils.recorder.record_attention`
is its user.
"""

from torch import nn

__all__ = ["Tap"]


class Tap(nn.Module):
    """An empty module: its forward hooks see the ``**values`` it is called with; returns None."""

    def forward(self, **values) -> None:
        return None
