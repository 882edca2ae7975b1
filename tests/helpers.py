"""Small builders shared by the tests."""

import torch
from detectron2.structures import Boxes, Instances


def image_input(h, w, boxes=(), classes=(), seed=0, with_instances=True):
    """A detectron2 model input with a random image and (optionally) GT instances."""
    g = torch.Generator().manual_seed(seed)
    x = {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "height": h, "width": w}
    if with_instances:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        x["instances"] = inst
    return x


def build_tiny(config_name, *overrides, seed=0, **model_fields):
    """The model of a packaged config (e.g. ``"detr/detr_r18_synthetic"``), seeded with ``seed``.

    ``overrides`` are command-line ``"key=value"`` strings (as ``tools/train_net.py`` takes);
    ``model_fields`` replace top-level ``cfg.model`` entries by objects, e.g. a ``LazyCall``.
    """
    from detectron2.config import instantiate

    from detr_variants.engine.lazy_train import apply_overrides
    from detr_variants.model_zoo import get_config

    cfg = apply_overrides(get_config(config_name), list(overrides))
    cfg.model.update(model_fields)
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def tiny_run_overrides(output_dir) -> list:
    """Overrides that shrink a *_r18_synthetic config to seconds on the tiny_shapes datasets."""
    return [
        "dataloader.train.dataset.names=tiny_shapes_train",
        "dataloader.test.dataset.names=tiny_shapes_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.min_sizes=[64]",
        "dataloader.train.mapper.augmentations.max_size=96",
        "dataloader.train.mapper.augmentations.crop_resize_sizes=[64]",
        "dataloader.train.mapper.augmentations.crop_size=[48,64]",
        "dataloader.test.mapper.augmentations.min_size=64",
        "dataloader.test.mapper.augmentations.max_size=96",
        f"train.output_dir={output_dir}",
        "train.max_iter=4",
        "train.log_period=1",
        "train.eval_period=-1",
        "train.checkpointer.period=2",
        "train.seed=0",
    ]


def train_and_evaluate_tiny(cfg, output_dir):
    """Two iterations through the engine, then COCO evaluation; checks both really happened."""
    import os

    from detr_variants.engine.lazy_train import train

    cfg.train.update(max_iter=2, eval_period=0)
    cfg.dataloader.evaluator.output_dir = os.path.join(str(output_dir), "inference")
    results = train(cfg)
    assert set(results["bbox"]) >= {"AP", "AP50", "APs", "APm", "APl"}
    assert os.path.isfile(os.path.join(str(output_dir), "model_final.pth"))
    assert os.path.isfile(os.path.join(str(output_dir), "inference", "coco_instances_results.json"))
    return results


def set_prediction_train_step(model, batch):
    """Runs one training step and checks the losses: class/L1/GIoU of the last decoder layer, of
    every auxiliary layer (``_0`` ...) and, for a two-stage model, of the proposals (``_enc``),
    all finite; backpropagates their sum. Returns the losses."""
    model.train()
    losses = model(batch)
    n = len(model.decoder.layers)
    names = ("loss_class", "loss_bbox", "loss_giou")
    suffixes = ["", *(f"_{i}" for i in range(n - 1))]
    suffixes += ["_enc"] if getattr(model, "two_stage", False) else []
    assert {name + suffix for name in names for suffix in suffixes} == set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    model.zero_grad()
    total.backward()
    return losses


def to_official_detr_names(state_dict, rules, class_rows=91, class_copies=("",)):
    """Our names → a DETR-family release's (a converter's inverse), to test the converter with.

    The ResNet goes under ``backbone.0.body.`` with torchvision names; other names go through
    ``rules`` ((pattern, replacement), the first match wins); class heads are spread over
    ``class_rows`` rows indexed by COCO id (random in the unused rows) and stored under each prefix
    of ``class_copies`` (Deformable DETR also keeps one in ``transformer.decoder.``).
    """
    import re

    import torchvision

    from detr_variants.checkpoint import COCO_THING_IDS
    from detr_variants.checkpoint.convert import torchvision_resnet_name

    tv = {
        torchvision_resnet_name(k): k
        for k in torchvision.models.resnet50().state_dict()
        if not k.startswith("fc.")
    }
    out = {}
    for name, value in state_dict.items():
        if name.startswith("backbone."):
            out["backbone.0.body." + tv[name[len("backbone.") :]]] = value
        elif name.startswith("class_embed."):
            full = torch.randn(class_rows, *value.shape[1:])
            full[torch.as_tensor(COCO_THING_IDS)] = value
            out.update({prefix + name: full for prefix in class_copies})
        else:
            for pattern, repl in rules:
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            out[name] = value
    return out


def distinct_class_heads(state_dict, shared=False, seed=0):
    """Copy of a release's state dict whose class heads have a different score in every row.

    Every ``class_embed`` weight/bias (keys ``[prefix]class_embed[.<i>].weight|bias``) is replaced
    by random rows, so a converter that maps a wrong row (or a wrong layer's head) to a class
    changes that class's score, unlike a test that fills only the unused rows at random. Keys with
    the same head index (a duplicate such as Deformable DETR's ``transformer.decoder.class_embed``)
    get the same values; ``shared`` gives every index the same values (heads shared by the layers).
    Returns the new state dict and ``{index: (weight, bias)}`` (index None without one).
    """
    import re

    out, heads = dict(state_dict), {}
    for name in state_dict:
        m = re.fullmatch(r"(?:.+\.)?class_embed\.(?:(\d+)\.)?(weight|bias)", name)
        if not m:
            continue
        index = None if shared or m.group(1) is None else int(m.group(1))
        if index not in heads:
            g = torch.Generator().manual_seed(seed + (index or 0))
            rows, dim = state_dict[name[: -len(m.group(2))] + "weight"].shape
            heads[index] = (
                torch.randn(rows, dim, generator=g) / dim**0.5,
                torch.randn(rows, generator=g),
            )
        out[name] = heads[index][0 if m.group(2) == "weight" else 1].clone()
    return out, heads
