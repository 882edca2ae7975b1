#!/usr/bin/env python
"""Draw what a trained detector looked at for its detections on one image (the papers' figures).

    python tools/visualize_attention.py \\
        --config-file projects/deformable_detr/configs/deformable_detr_r18_synthetic.py \\
        --input image.jpg --output output/attention --top 3 \\
        --opts train.init_checkpoint=output/deformable_detr_r18_synthetic/model_final.pth

Per chosen detection (``--top K`` best, or ``--detections i j ...`` by score rank), from the
decoder layer ``--layer`` (default the last; ``--heads`` picks heads), one PNG
``<image>_<kind>_det<rank>.png``:

* Deformable DETR (``deformable``): the cross-attention's sampling points of the detection's query,
  one panel per feature level, coloured by attention weight (every head in one panel), with the
  reference point;
* Conditional DETR (``conditional``): per head, the spatial (p_qᵀp_k), the content (c_qᵀc_k) and the
  combined attention map of the cross-attention (the paper's Figure 1);
* SMCA (``smca``): per head (and per scale in multi-scale SMCA) the Gaussian prior G and the
  modulated attention softmax(q·kᵀ/√d + log G).

TSP-FCOS writes ``<image>_fois.png``: every selected feature of interest (dot, coloured by level) and
those behind the chosen detections; TSP-RCNN ``<image>_proposals.png``: the proposals the encoder
attends over and those behind the chosen detections. Coordinates are those of the input image
(the config's test-time resize is undone).
"""

import argparse
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import LazyConfig  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import detr_variants  # noqa: F401, E402  (registers the datasets and architectures)
from detr_variants.data.image_io import read_image  # noqa: E402
from detr_variants.engine import DefaultPredictor  # noqa: E402
from detr_variants.engine.lazy_train import apply_overrides  # noqa: E402
from detr_variants.modeling.tsp import TSPFCOS, TSPRCNN  # noqa: E402
from detr_variants.utils.recorder import record_attention  # noqa: E402

logger = logging.getLogger("detr_variants")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig (.py)")
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", default="output/attention", help="folder for the PNGs")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--top", type=int, default=3, help="draw the K best detections")
    choice.add_argument(
        "--detections", type=int, nargs="+", help="draw these detections (0: the best)"
    )
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer (-1: the last)")
    parser.add_argument(
        "--heads", type=int, nargs="+", help="draw these attention heads (default: all)"
    )
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides, key=value")
    return parser.parse_args(argv)


class Frame:
    """Maps the model's (resized, padded) input pixels back to the original image."""

    def __init__(self, original_hw, resized_hw, size_divisibility: int):
        d = max(int(size_divisibility), 1)
        self.padded = tuple(math.ceil(s / d) * d for s in resized_hw)  # (H, W)
        self.sy, self.sx = (o / r for o, r in zip(original_hw, resized_hw))

    def stride(self, height: int, width: int) -> int:
        """The stride of a (height, width) feature map of the padded input: the power of 2 s
        with ``ceil(padded / s) == (height, width)`` (ResNet and FPN levels round up)."""
        fits = [
            2**k
            for k in range(1, 8)
            if (math.ceil(self.padded[0] / 2**k), math.ceil(self.padded[1] / 2**k))
            == (height, width)
        ]
        if not fits:
            raise ValueError(f"a {height}x{width} map is no feature level of a {self.padded} input")
        return min(fits, key=lambda s: abs(math.log2(s * width / self.padded[1])))

    def extent(self, height: int, width: int) -> Tuple[float, float, float, float]:
        """A feature map's cells as matplotlib's ``imshow`` extent in original pixels."""
        s = self.stride(height, width)
        return (0.0, width * s * self.sx, height * s * self.sy, 0.0)

    def grid(self, tokens: int) -> Tuple[int, int]:
        """The (h, w) of a flattened single-level memory of ``tokens`` cells."""
        for k in range(1, 8):
            h, w = (math.ceil(p / 2**k) for p in self.padded)
            if h * w == tokens:
                return h, w
        raise ValueError(f"{tokens} memory tokens match no feature map of a {self.padded} input")


# ---------------------------------------------------------------------------- drawing helpers
def _panel(ax, image, box=None, title=""):
    ax.imshow(image)
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _heatmap(ax, image, values, extent, box, title):
    _panel(ax, image, box, title)
    ax.imshow(values, extent=extent, cmap="jet", alpha=0.5, interpolation="bilinear")
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)


def _grid_figure(rows: int, cols: int):
    width = max(2.2 * cols, 6.0)  # room for the title
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.2 * rows), squeeze=False)
    return fig, axes


def _single_figure(image):
    """One panel, 6 inches wide, for the drawings over the whole image."""
    fig, axes = plt.subplots(1, 1, figsize=(6, 6 * image.shape[0] / image.shape[1] + 0.4))
    return fig, axes


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _heads(requested: Optional[Sequence[int]], total: int) -> List[int]:
    """The heads to draw (all without ``--heads``), or a ValueError naming the bad ones."""
    heads = list(range(total)) if requested is None else list(requested)
    bad = [h for h in heads if not 0 <= h < total]
    if bad:
        raise ValueError(f"heads {bad} do not exist: the layer has {total}")
    return heads


def _masked_softmax(logits: torch.Tensor, padding) -> torch.Tensor:
    if padding is not None:
        logits = logits.masked_fill(padding, float("-inf"))
    return logits.softmax(-1)


# ---------------------------------------------------------------------------- one per variant
def draw_deformable(image, det: Dict, rec: Dict, frame: Frame, path: str, heads=None) -> str:
    """Sampling points of the query's cross-attention per level, coloured by attention weight."""
    q, heads = det["query"], _heads(heads, rec["weights"].shape[2])
    locations = rec["locations"][0, q, heads].cpu()  # (M, L, P, 2)
    weights = rec["weights"][0, q, heads].cpu()  # (M, L, P)
    reference = rec["reference_points"][0, q].cpu()  # (L, 2 or 4)
    shapes = rec["spatial_shapes"].tolist()
    fig, axes = _grid_figure(1, len(shapes))
    vmax = float(weights.max())
    for lvl, (h, w) in enumerate(shapes):
        ax, s = axes[0, lvl], frame.stride(h, w)
        to_pixels = torch.tensor([w * s * frame.sx, h * s * frame.sy])
        _panel(ax, image, det["box"], f"level {lvl} (stride {s})")
        points = (locations[:, lvl].reshape(-1, 2) * to_pixels).numpy()
        ax.scatter(*points.T, c=weights[:, lvl].reshape(-1).numpy(), cmap="jet", vmin=0,
                   vmax=vmax, s=12, edgecolors="white", linewidths=0.3)  # fmt: skip
        ax.scatter(*(reference[lvl, :2] * to_pixels).numpy(), marker="+", c="white", s=60)
    fig.suptitle(f"{det['label']}: sampling points by attention weight", fontsize=9)
    return _save(fig, path)


def draw_conditional(image, det: Dict, rec: Dict, frame: Frame, path: str, heads=None) -> str:
    """Per head: spatial, content and combined cross-attention maps (paper Figure 1)."""
    q = det["query"]
    padding = None if rec["padding"] is None else rec["padding"][0]
    heads = _heads(heads, rec["weights"].shape[1])
    h, w = frame.grid(rec["weights"].shape[-1])
    rows = {
        "spatial": _masked_softmax(rec["spatial"][0, :, q], padding),
        "content": _masked_softmax(rec["content"][0, :, q], padding),
        "combined": rec["weights"][0, :, q],
    }
    fig, axes = _grid_figure(len(rows), len(heads))
    for r, (name, maps) in enumerate(rows.items()):
        for col, head in enumerate(heads):
            values = maps[head].view(h, w).cpu().numpy()
            _heatmap(axes[r, col], image, values, frame.extent(h, w), det["box"],
                     f"{name}, head {head}")  # fmt: skip
    fig.suptitle(f"{det['label']}: cross-attention maps", fontsize=9)
    return _save(fig, path)


def draw_smca(image, det: Dict, rec: Dict, frame: Frame, path: str, heads=None) -> str:
    """Per head and scale: the Gaussian prior G and the modulated co-attention."""
    q = det["query"]
    shapes = [(int(h), int(w)) for h, w in rec["spatial_shapes"]]
    heads = _heads(heads, rec["priors"][0].shape[1])
    fig, axes = _grid_figure(2 * len(shapes), len(heads))
    for lvl, (h, w) in enumerate(shapes):
        prior = rec["priors"][lvl][0, :, q].exp()
        attention = rec["weights"][lvl][0, :, q]
        for r, (name, maps) in enumerate((("prior G", prior), ("modulated", attention))):
            for col, head in enumerate(heads):
                values = maps[head].view(h, w).cpu().numpy()
                _heatmap(axes[2 * lvl + r, col], image, values, frame.extent(h, w), det["box"],
                         f"{name}, scale {lvl}, head {head}")  # fmt: skip
    fig.suptitle(f"{det['label']}: Gaussian priors and modulated co-attention", fontsize=9)
    return _save(fig, path)


def draw_fois(image, dets: List[Dict], fois: Dict, frame: Frame, path: str) -> str:
    """Every selected feature of interest (by level) and those behind the detections."""
    fig, ax = _single_figure(image)
    _panel(ax, image, None, "features of interest (dots, by level); x: behind a detection")
    xy = (fois["xy"].cpu() * torch.tensor([frame.sx, frame.sy])).numpy()
    levels = fois["levels"].cpu().numpy()
    ax.scatter(*xy.T, c=levels, cmap="viridis", s=10, edgecolors="white", linewidths=0.4)
    for det in dets:
        x0, y0, x1, y1 = det["box"]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
        ax.scatter(*xy[det["query"]], marker="x", c="red", s=120, linewidths=2.5)
    return _save(fig, path)


def draw_proposals(image, dets: List[Dict], proposals: torch.Tensor, frame: Frame, path) -> str:
    """The proposals the encoder attends over, and those behind the detections."""
    fig, ax = _single_figure(image)
    _panel(ax, image, None, "proposals (grey); red: behind a detection (green)")
    boxes = (proposals.cpu() * torch.tensor([frame.sx, frame.sy] * 2)).numpy()
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="grey", lw=0.3))
    for det in dets:
        for (x0, y0, x1, y1), color in ((boxes[det["query"]], "red"), (det["box"], "lime")):
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
    return _save(fig, path)


DRAW = {"deformable": draw_deformable, "conditional": draw_conditional, "smca": draw_smca}


# ---------------------------------------------------------------------------- running the model
def _capture_input(model, store: Dict):
    """Keeps the model's (resized) input, so that coordinates can be mapped back."""

    def hook(module, args):
        store["inputs"] = args[0]

    return model.register_forward_pre_hook(hook)


def predict_and_record(predictor: DefaultPredictor, image: np.ndarray, layer: int):
    """Runs the predictor on a BGR image; returns the instances, what was recorded, the
    resized input size and the kind of drawing."""
    model, store = predictor.model, {}
    handles = [_capture_input(model, store)]
    try:
        if isinstance(model, TSPRCNN):
            handles.append(
                model.proposal_generator.register_forward_hook(
                    lambda m, args, out: store.update(proposals=out[0][0].proposal_boxes.tensor)
                )
            )
            instances, kind, recorded = predictor(image)["instances"], "proposals", store
        elif isinstance(model, TSPFCOS):
            instances, kind = predictor(image)["instances"], "fois"
            with torch.no_grad():  # the selection is deterministic in eval: the same FoIs
                images, _ = model.preprocess_image(store["inputs"])
                dense = model.dense_outputs(images)
                selected = model.select_fois(dense["scores"], dense["valid"])[0]
            recorded = {"xy": dense["locations"][selected], "levels": dense["levels"][selected]}
        else:
            with record_attention(model, layers=[layer]) as record:
                instances = predictor(image)["instances"]
            kind, recorded = record.kind, next(iter(record.layers.values()))
    finally:
        for handle in handles:
            handle.remove()
    return instances, recorded, tuple(store["inputs"][0]["image"].shape[-2:]), kind


def dataset_class_names(cfg) -> Sequence[str]:
    """``thing_classes`` of the config's first test dataset, empty when it has none."""
    names = cfg.dataloader.test.dataset.get("names", ()) if "dataloader" in cfg else ()
    first = names if isinstance(names, str) else next(iter(names), None)
    return MetadataCatalog.get(first).get("thing_classes", ()) if first else ()


def chosen_detections(
    instances, top: int, indices: Sequence[int] = None, class_names: Sequence[str] = ()
) -> List[Dict]:
    """The detections by score rank (0: the best), with their query, box and label (the class
    name where ``class_names`` has it, else its contiguous id)."""
    order = instances.scores.argsort(descending=True).tolist()
    ranks = list(range(min(top, len(order)))) if indices is None else list(indices)
    bad = [r for r in ranks if not 0 <= r < len(order)]
    if bad:
        raise ValueError(f"detections {bad} do not exist: the model made {len(order)}")
    dets = []
    for rank in ranks:
        i = order[rank]
        cls = int(instances.pred_classes[i])
        dets.append(
            {
                "rank": rank,
                "query": int(instances.query_indices[i]),
                "box": instances.pred_boxes.tensor[i].tolist(),
                "label": f"{class_names[cls] if cls < len(class_names) else f'class {cls}'}, "
                f"score {float(instances.scores[i]):.2f}, query {int(instances.query_indices[i])}",
            }
        )
    return dets


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    setup_logger(name="detr_variants")
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    predictor = DefaultPredictor(cfg)
    bgr = read_image(args.input, format="BGR")
    instances, recorded, resized, kind = predict_and_record(predictor, bgr, args.layer)
    model = predictor.model
    divisibility = getattr(model, "size_divisibility", None)
    if divisibility is None:  # GeneralizedRCNN pads to its backbone's
        divisibility = model.backbone.size_divisibility
    frame = Frame(bgr.shape[:2], resized, divisibility)
    dets = chosen_detections(instances, args.top, args.detections, dataset_class_names(cfg))
    if not dets:
        logger.warning(f"{args.input}: no detections to draw")
    os.makedirs(args.output, exist_ok=True)
    stem, rgb = os.path.splitext(os.path.basename(args.input))[0], bgr[:, :, ::-1]
    if kind == "fois":
        written = [draw_fois(rgb, dets, recorded, frame, f"{args.output}/{stem}_fois.png")]
    elif kind == "proposals":
        path = f"{args.output}/{stem}_proposals.png"
        written = [draw_proposals(rgb, dets, recorded["proposals"], frame, path)]
    else:
        written = [
            DRAW[kind](
                rgb,
                det,
                recorded,
                frame,
                f"{args.output}/{stem}_{kind}_det{det['rank']}.png",
                heads=args.heads,
            )
            for det in dets
        ]
    logger.info(f"Wrote {len(written)} images to {args.output}")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
