"""Small builders shared by the tests."""

import torch
from detectron2.structures import Boxes, Instances


def load_script(repo_root, *path):
    """A script of the repository (e.g. ``"tools", "benchmark.py"``) imported as a module."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(path[-1][:-3], os.path.join(repo_root, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def tiny_config(cfg):
    """Shrinks an experiment config's backbone so a CPU step takes well under a second."""
    from detr_variants.engine.lazy_train import apply_overrides

    return apply_overrides(
        cfg, ["model.backbone.depth=18", "model.backbone.norm=BN", "model.backbone.freeze_at=0"]
    )


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


def to_official_detr_names(state_dict, table, class_rows=91, class_copies=("",)):
    """Our names → a DETR-family release's, through the inverse of the converter's own name
    ``table`` (:func:`~detr_variants.checkpoint.names.rename_back`), to test the converter with.

    Class heads are spread over ``class_rows`` rows indexed by COCO id (random in the unused rows)
    and stored under each prefix of ``class_copies`` (Deformable DETR also keeps one in
    ``transformer.decoder.``). The names alone prove nothing about the table: each converter's
    literal names are checked in ``test_convert_common.py``.
    """
    from detr_variants.checkpoint import COCO_THING_IDS
    from detr_variants.checkpoint.names import rename_back

    heads = {k: v for k, v in state_dict.items() if k.startswith("class_embed.")}
    out = rename_back({k: v for k, v in state_dict.items() if k not in heads}, table)
    for name, value in heads.items():
        full = torch.randn(class_rows, *value.shape[1:])
        full[torch.as_tensor(COCO_THING_IDS)] = value
        out.update({prefix + name: full for prefix in class_copies})
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


def randomise_(state_dict, seed=1):
    """Fills a model's state dict in place with random weights of a sensible scale (HF's init
    leaves the box head near zero and frozen BatchNorms at identity, which would hide mapping
    mistakes): BatchNorm scales/variances in [0.5, 1.5), convolutions He-scaled, matrices
    1/sqrt(fan-in), LayerNorm scales around 1."""
    g = torch.Generator().manual_seed(seed)
    for key, v in state_dict.items():
        if not v.is_floating_point():
            continue
        if "normalization" in key or key.endswith(("running_mean", "running_var")):
            positive = key.endswith(("running_var", "weight"))
            v.copy_(
                torch.rand(v.shape, generator=g) + 0.5
                if positive
                else torch.randn(v.shape, generator=g) * 0.1
            )
        elif v.dim() == 4:
            v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
        elif "query_position_embeddings" in key:
            v.copy_(torch.randn(v.shape, generator=g))
        elif v.dim() == 2:
            v.copy_(torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5)
        else:
            offset = 1.0 if "norm" in key and key.endswith("weight") else 0.0
            v.copy_(torch.randn(v.shape, generator=g) * 0.2 + offset)


def official_coco_rows(no_object_row=None):
    """The row of a released COCO class head (indexed by raw category id) that holds each of
    detectron2's 80 contiguous classes, in order, taken from detectron2's own COCO metadata
    (not from the converters' table), then ``no_object_row`` (DETR's 91) if given."""
    from detectron2.data.datasets.builtin_meta import _get_coco_instances_meta

    to_contiguous = _get_coco_instances_meta()["thing_dataset_id_to_contiguous_id"]
    rows = sorted(to_contiguous, key=to_contiguous.get)
    return rows + ([] if no_object_row is None else [no_object_row])


def distinguishable_class_head(hidden_dim, rows, seed=0):
    """Weight and bias of a released class head in which every row scores differently: random
    rows, and biases 0.01 apart."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, hidden_dim, generator=g), 0.01 * torch.arange(float(rows))


def assert_class_scores_follow_official_rows(model, weight, bias, rows, score, atol=1e-5):
    """Checks that ``model`` (converted from a checkpoint whose class head is ``weight``/``bias``)
    scores class ``c`` as the released head's row ``rows[c]`` does.

    Runs a padded batch of two differently sized images, takes the decoder outputs that reach
    ``model.class_embed`` (every call, every layer) and compares our logits, and our ``score``
    (``"sigmoid"`` or ``"softmax"``), with the released head applied to the same features:
    ``ours[..., c] == theirs[..., rows[c]]`` to ``atol``. For a softmax the released probabilities
    are over all its rows, so they agree only where the rows not in ``rows`` carry no mass (set
    their bias to -1e4 to compare them).
    """
    from detectron2.structures import ImageList

    calls = []
    hook = model.class_embed.register_forward_hook(lambda m, a, out: calls.append((a[0], out)))
    g = torch.Generator().manual_seed(0)
    sizes = [(96, 128), (64, 160)]
    pixels = torch.zeros(2, 3, 96, 160)
    padding = torch.ones(2, 96, 160, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        padding[i, :h, :w] = False
    try:
        with torch.no_grad():
            model.eval().compute_outputs(ImageList(pixels, sizes), padding)
    finally:
        hook.remove()
    assert calls, "class_embed was never called"
    activate = {"sigmoid": torch.sigmoid, "softmax": lambda x: x.softmax(-1)}[score]
    index = torch.as_tensor(rows)
    for features, ours in calls:
        theirs = torch.nn.functional.linear(features, weight, bias)
        assert ours.shape[-1] == len(rows)
        assert theirs[..., index].std() > 0.1  # the rows are told apart
        torch.testing.assert_close(ours, theirs[..., index], atol=atol, rtol=0)
        torch.testing.assert_close(activate(ours), activate(theirs)[..., index], atol=atol, rtol=0)


def write_small_coco(root, split, num_images, seed=0):
    """A small COCO-format split as a user's dataset looks: ``<root>/annotations/<split>.json``
    and ``<root>/<split>/*.jpg``. Filled rectangles of three categories whose ids have gaps
    (2, 5, 9), polygon segmentations, a crowd region (RLE) in image 1, image 0 without objects,
    image 2 a grayscale JPEG. Returns (json path, image dir)."""
    import json
    import os

    import cv2
    import numpy as np

    from detr_variants.data.synthetic import mask_to_rle

    rng = np.random.default_rng(seed)
    categories = [{"id": 2, "name": "red"}, {"id": 5, "name": "green"}, {"id": 9, "name": "blue"}]
    colors = {2: (0, 0, 255), 5: (0, 255, 0), 9: (255, 0, 0)}  # BGR
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = int(rng.integers(60, 90)), int(rng.integers(70, 110))
        img = np.full((h, w, 3), 40, np.uint8)
        for _ in range(0 if i == 0 else int(rng.integers(1, 3))):
            cid = int(rng.choice(list(colors)))
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), colors[cid], -1)
            poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "bbox": [x, y, bw, bh],
                    "category_id": cid,
                    "iscrowd": 0,
                    "area": bw * bh,
                    "segmentation": [poly],
                }
            )
        if i == 1:  # a crowd region over the top-left corner, as COCO stores them (RLE)
            mask = np.zeros((h, w), bool)
            mask[:10, :10] = True
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "bbox": [0, 0, 10, 10],
                 "category_id": 5, "iscrowd": 1, "area": 100, "segmentation": mask_to_rle(mask)}
            )  # fmt: skip
        file_name = f"{split}_{i:03d}.jpg"
        out = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if i == 2 else img
        assert cv2.imwrite(os.path.join(root, split, file_name), out)
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
    json_file = os.path.join(root, "annotations", f"{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, os.path.join(root, split)


def small_hf_detr_config(config_class, *, d_model, heads, ffn, queries, num_labels, **kwargs):
    """A small HF DETR-family config (``DetrConfig``, ``ConditionalDetrConfig``) on an untrained
    ResNet-18-shaped HF ResNet: 2 encoder and 3 decoder layers of the given sizes."""
    import transformers

    backbone = transformers.ResNetConfig(
        depths=[2, 2, 2, 2],
        layer_type="basic",
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        out_features=["stage4"],
    )
    return config_class(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=3,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        num_queries=queries,
        num_labels=num_labels,
        **kwargs,
    )


def linear_shapes(prefix, i, o):
    """Official-layout parameter shapes of ``nn.Linear(i, o)`` named ``prefix``."""
    return {f"{prefix}.weight": (o, i), f"{prefix}.bias": (o,)}


def norm_shapes(prefix, d):
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def official_detr_layout_shapes(d, ffn, enc, queries, class_rows):
    """Shapes of what every DETR-family release shares in DETR's layout (R18 ``input_proj``, the
    queries, the class and box heads, the decoder's final norm and ``enc`` encoder layers); a
    release adds its decoder layers."""
    shapes = {
        "input_proj.weight": (d, 512, 1, 1),
        "input_proj.bias": (d,),
        "query_embed.weight": (queries, d),
        **linear_shapes("class_embed", d, class_rows),
        **linear_shapes("bbox_embed.layers.0", d, d),
        **linear_shapes("bbox_embed.layers.1", d, d),
        **linear_shapes("bbox_embed.layers.2", d, 4),
        **norm_shapes("transformer.decoder.norm", d),
    }
    for i in range(enc):
        p = f"transformer.encoder.layers.{i}"
        shapes.update(
            {
                f"{p}.self_attn.in_proj_weight": (3 * d, d),
                f"{p}.self_attn.in_proj_bias": (3 * d,),
                **linear_shapes(f"{p}.self_attn.out_proj", d, d),
                **linear_shapes(f"{p}.linear1", d, ffn),
                **linear_shapes(f"{p}.linear2", ffn, d),
                **norm_shapes(f"{p}.norm1", d),
                **norm_shapes(f"{p}.norm2", d),
            }
        )
    return shapes


def official_r18_state_dict(shapes, batch_counters=True, fan_in_scaled=True, seed=0):
    """A torchvision ResNet-18 under ``backbone.0.body.`` (with ``num_batches_tracked``, as the
    releases, unless ``batch_counters`` is False) plus random normal tensors of ``shapes``
    (divided by the square root of the last dimension if ``fan_in_scaled``)."""
    import torchvision

    sd = {
        f"backbone.0.body.{k}": v
        for k, v in torchvision.models.resnet18().state_dict().items()
        if not k.startswith("fc.") and (batch_counters or "num_batches_tracked" not in k)
    }
    g = torch.Generator().manual_seed(seed)
    for k, shape in shapes.items():
        sd[k] = torch.randn(shape, generator=g) / (shape[-1] ** 0.5 if fan_in_scaled else 1.0)
    return sd
