"""Converters from the papers' official checkpoints and from HF ``transformers`` state dicts to
this repository's models.

Each converter is registered for a (source, arch) pair and maps a state dict to one that
``DetectionCheckpointer`` loads into the matching config's model. The pieces every converter
needs live here: torchvision-ResNet names → detectron2 names, and COCO class heads indexed by
the 91 raw category ids → detectron2's 80 contiguous classes.
"""

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

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


_TV_STAGE = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}


def torchvision_resnet_name(name: str) -> Optional[str]:
    """torchvision ResNet parameter name → detectron2 ``ResNet`` name (None if not a ResNet name).

    ``conv1``/``bn1`` → ``stem.conv1``/``stem.conv1.norm``; ``layerK.i.convJ``/``bnJ`` →
    ``res{K+1}.i.convJ``/``.convJ.norm``; ``downsample.0``/``.1`` → ``shortcut``/``shortcut.norm``.
    """
    m = re.fullmatch(r"(conv1|bn1)\.(.+)", name)
    if m:
        return "stem.conv1." + ("norm." if m.group(1) == "bn1" else "") + m.group(2)
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)", name)
    if not m:
        return None
    stage, block, part, leaf = m.groups()
    prefix = f"{_TV_STAGE['layer' + stage]}.{block}."
    if part.startswith("conv"):
        return prefix + f"{part}.{leaf}"
    if part.startswith("bn"):
        return prefix + f"conv{part[2:]}.norm.{leaf}"
    return prefix + ("shortcut." if part.endswith("0") else "shortcut.norm.") + leaf


def split_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def drop_batchnorm_counters(state_dict: StateDict) -> StateDict:
    """FrozenBatchNorm has no ``num_batches_tracked``."""
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


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

LayerTarget = Callable[[str, str, str], Optional[str]]


def layer_tables(encoder: Dict[str, str], decoder: Dict[str, str]) -> LayerTarget:
    """``(part, index, rest) -> our name`` renaming the first module of ``rest`` through the
    encoder's or the decoder's table (None for a module neither table knows)."""

    def target(part: str, index: str, rest: str) -> Optional[str]:
        module, _, leaf = rest.partition(".")
        table = encoder if part == "encoder" else decoder
        return f"{part}.layers.{index}.{table[module]}.{leaf}" if module in table else None

    return target


def neck_names(state_dict: StateDict) -> StateDict:
    """Multi-level models keep their level projections and level embedding in ``neck``
    (:class:`~detr_variants.modeling.neck.MultiLevelNeck`): ``input_proj.*`` and ``level_embed``
    → ``neck.input_proj.*`` and ``neck.level_embed``."""
    return {
        "neck." + k if k.startswith("input_proj.") or k == "level_embed" else k: v
        for k, v in state_dict.items()
    }


def raise_unknown(keys: Sequence[str], what: str) -> None:
    if keys:
        raise KeyError(
            f"{len(keys)} {what} keys not understood: {', '.join(sorted(keys)[:8])}"
            + (" ..." if len(keys) > 8 else "")
        )


def convert_official_detr_layout(
    state_dict: StateDict,
    layer_target: LayerTarget,
    keep: str,
    what: str,
    num_classes: Optional[int] = None,
    skip: tuple = (),
) -> StateDict:
    """The checkpoint layout of DETR and the releases built on its code.

    A torchvision ResNet under ``backbone.0.body.``, layers under
    ``transformer.{encoder,decoder}.layers.<i>.`` (renamed by ``layer_target``), the class head
    ``class_embed`` indexed by COCO id (see :func:`class_head_rows`), and other keys matching the
    regex ``keep``, kept with any leading ``transformer.`` removed. Keys starting with one of
    ``skip`` (duplicated modules) are dropped; any other key raises a ``KeyError``.
    """
    out: StateDict = {}
    unknown = []
    for key, value in drop_batchnorm_counters(state_dict).items():
        if key.startswith(skip):
            continue
        layer = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if key.startswith("backbone.0.body."):
            name = torchvision_resnet_name(key[len("backbone.0.body.") :])
            target = None if name is None else "backbone." + name
        elif layer:
            target = layer_target(*layer.groups())
        elif key.startswith("class_embed."):
            target, value = key, class_head_rows(value, num_classes)
        elif re.match(keep, key):
            target = key[len("transformer.") :] if key.startswith("transformer.") else key
        else:
            target = None
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    raise_unknown(unknown, what)
    return out
