from typing import List, cast

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """A stack of Linear layers with ReLU between them (DETR's box head and friends)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims: List[int] = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    @property
    def output_layer(self) -> nn.Linear:
        """The last Linear (variants initialise it specially)."""
        return cast(nn.Linear, self.layers[-1])

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
