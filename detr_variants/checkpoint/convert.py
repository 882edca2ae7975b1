"""Converters from the papers' official checkpoints and from HF ``transformers`` state dicts to
this repository's models.

Each converter is registered for a (source, arch) pair and maps a state dict to one that
``DetectionCheckpointer`` loads into the matching config's model. Its renaming is a declared
:class:`~.names.NameTable` of ``(official, ours)`` name patterns, which the tests invert to build
released state dicts from our models. The pieces every converter needs live here:
torchvision-ResNet names → detectron2 names, the names of DETR's layout, and COCO class heads
indexed by the 91 raw category ids → detectron2's 80 contiguous classes.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .names import BATCHNORM_COUNTERS, NameTable, Row, module_rows, rename, same

StateDict = Dict[str, Tensor]
_CONVERTERS: Dict[tuple, Callable[[StateDict], StateDict]] = {}

# COCO category ids of detectron2's 80 contiguous classes, in order (ids 1..90 with 10 gaps).
COCO_THING_IDS: List[int] = [
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
]


def register_converter(source: str, arch: str):
    """Decorator registering ``fn(state_dict) -> state_dict`` for ``convert_checkpoint``."""

    def wrap(fn):
        _CONVERTERS[(source, arch)] = fn
        return fn

    return wrap


def known_converters() -> List[Tuple[str, str]]:
    """The registered ``(source, arch)`` pairs, sorted."""
    return sorted(_CONVERTERS)


def convert_checkpoint(state_dict: StateDict, source: str, arch: str) -> StateDict:
    """Converts ``state_dict`` from ``source`` (``"official"`` or ``"hf"``) for model ``arch``.

    Accepts a bare state dict or a checkpoint dict holding one under ``"model"``. The result
    loads into the model of the matching config (80 COCO classes).
    """
    if (source, arch) not in _CONVERTERS:
        known = ", ".join(f"{s}/{a}" for s, a in sorted(_CONVERTERS))
        raise KeyError(f"no converter for source={source!r}, arch={arch!r}; known: {known}")
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return _CONVERTERS[(source, arch)](dict(state_dict))


def coco_class_rows(weight: Tensor, extra_rows: int = 0) -> Tensor:
    """Keeps the rows of a class head indexed by raw COCO id (91 or 92 rows) that detectron2's 80
    contiguous classes use, in contiguous order, plus the last ``extra_rows`` rows (DETR's
    no-object)."""
    index = list(COCO_THING_IDS) + list(range(weight.shape[0] - extra_rows, weight.shape[0]))
    return weight[torch.as_tensor(index)]


def class_head_rows(weight: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """A released class head (weight or bias) → ``num_classes`` rows.

    91 or 92 rows indexed by raw COCO id become the 80 contiguous COCO classes (with
    ``num_classes`` None or 80); a head with ``num_classes`` rows is kept; one with
    ``num_classes + 1`` rows loses its last, never-positive (no-object) row; with
    ``num_classes`` None any other size is kept.
    """
    rows = weight.shape[0]
    if num_classes is None:
        return coco_class_rows(weight) if rows in (91, 92) else weight
    if rows == num_classes:
        return weight
    if rows in (91, 92) and num_classes == 80:
        return coco_class_rows(weight)
    if rows == num_classes + 1:
        return weight[:-1]
    raise ValueError(f"class head has {rows} rows; cannot make {num_classes} classes of it")


# torchvision ResNet names → detectron2 ``ResNet`` names: ``conv1``/``bn1`` → the stem,
# ``layerK.i.convJ``/``bnJ`` → ``res{K+1}.i.convJ``/``.convJ.norm``, ``downsample.0``/``.1`` →
# ``shortcut``/``shortcut.norm``.
TORCHVISION_RESNET = NameTable(
    [("conv1.{leaf}", "stem.conv1.{leaf}"), ("bn1.{leaf}", "stem.conv1.norm.{leaf}")]
    + [
        row
        for k in range(1, 5)
        for row in [
            (f"layer{k}.{{i}}.conv{{j}}.{{leaf}}", f"res{k + 1}.{{i}}.conv{{j}}.{{leaf}}"),
            (f"layer{k}.{{i}}.bn{{j}}.{{leaf}}", f"res{k + 1}.{{i}}.conv{{j}}.norm.{{leaf}}"),
            (f"layer{k}.{{i}}.downsample.0.{{leaf}}", f"res{k + 1}.{{i}}.shortcut.{{leaf}}"),
            (f"layer{k}.{{i}}.downsample.1.{{leaf}}", f"res{k + 1}.{{i}}.shortcut.norm.{{leaf}}"),
        ]
    ]
)


def torchvision_resnet_name(name: str) -> Optional[str]:
    """torchvision ResNet parameter name → detectron2 ``ResNet`` name (None if not a ResNet name;
    see :data:`TORCHVISION_RESNET`)."""
    return TORCHVISION_RESNET.to_ours(name)


# Module names inside the official DETR-family layers (DETR, Conditional DETR, SMCA and Deformable
# DETR all keep DETR's) → ours: the FFN lives in ``ffn`` and the encoder's norm1 is ``norm``.
OFFICIAL_FFN = {"linear1": "ffn.linear1", "linear2": "ffn.linear2"}
OFFICIAL_ENCODER_LAYER = {
    "self_attn": "self_attn",
    "norm1": "norm",
    "norm2": "ffn.norm",
    **OFFICIAL_FFN,
}
OFFICIAL_DECODER_FFN = {"norm3": "ffn.norm", **OFFICIAL_FFN}


def official_detr_layout(
    encoder: Dict[str, str], decoder: Dict[str, str], others: Sequence[Row]
) -> NameTable:
    """The names of DETR's checkpoint layout, which the releases built on its code share.

    A torchvision ResNet under ``backbone.0.body.`` (BatchNorm counters dropped), the modules of
    ``transformer.{encoder,decoder}.layers.<i>`` renamed by ``encoder`` / ``decoder``, the class
    head ``class_embed`` and the release's ``others`` rows.
    """
    return NameTable(
        BATCHNORM_COUNTERS
        + list(TORCHVISION_RESNET.prefixed("backbone.0.body.", "backbone.").rows)
        + module_rows("transformer.encoder.layers", "encoder.layers", encoder)
        + module_rows("transformer.decoder.layers", "decoder.layers", decoder)
        + same("class_embed")
        + list(others)
    )


def convert_with_class_heads(
    state_dict: StateDict, table: NameTable, head_rows: Callable[[Tensor], Tensor], what: str
) -> StateDict:
    """``state_dict`` renamed by ``table`` (see :func:`~.names.rename`), with our class heads
    (``class_embed.*``) through ``head_rows`` (e.g. :func:`class_head_rows`)."""
    out = rename(state_dict, table, what)
    return {k: head_rows(v) if k.startswith("class_embed.") else v for k, v in out.items()}


def convert_official_detr_layout(
    state_dict: StateDict, table: NameTable, what: str, num_classes: Optional[int] = None
) -> StateDict:
    """A release in DETR's layout (``table`` from :func:`official_detr_layout`) → ours, its class
    head indexed by COCO id (see :func:`class_head_rows`); unknown keys raise a ``KeyError``."""
    return convert_with_class_heads(
        state_dict, table, lambda head: class_head_rows(head, num_classes), what
    )
