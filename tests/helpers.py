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


def tiny_config(cfg):
    """Shrinks an experiment config's transformer so a CPU step takes well under a second."""
    from detr_variants.engine.train_loop import apply_overrides

    return apply_overrides(cfg, ["model.backbone.depth=18", "model.backbone.norm=BN", "model.backbone.freeze_at=0"])
