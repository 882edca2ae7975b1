#!/usr/bin/env python
"""Speed, memory and GFLOPs of the papers' R50 models, ours next to HF ``transformers``'s
implementation with the same weights, measured side by side in one run.

    python tools/benchmark.py                              # every model, table + output/benchmark.json
    python tools/benchmark.py --models deformable_detr_r50 --repeat 3 --threads 2
    python tools/benchmark.py --onnx --output output/benchmark_onnx.json  # ONNX Runtime vs ours

For each model: GFLOPs (fvcore, one multiply-add = one flop, as the papers count) at 800x1216
beside the paper's number; inference latency (batch 1, 800x1216) and a training step (forward +
backward, batch 2, 512x512, 5 boxes per image), each the median of --repeat runs after a warm-up,
ours and HF's runs interleaved (see ``measure``); the peak resident-memory increase of each
(sampled every 5 ms); and the share of one training step spent in matrix multiplies and
convolutions (torch.profiler). The HF model is random-initialised with the architecture of the
COCO checkpoint, converted with ``convert_checkpoint`` and loaded into ours, so both compute the
same function. Nothing here is asserted: it writes numbers.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import re
import statistics
import threading
import time
from typing import Callable, Dict, Optional

import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, ImageList, Instances

import detr_variants  # noqa: F401
from detr_variants.checkpoint import Checkpointer, convert_checkpoint
from detr_variants.model_zoo import get_config

# ------------------------------------------------------------------ HF peers
# the official models (and ours) drop out attention weights and FFN activations at 0.1; HF's
# defaults are 0, so the peers are configured to train the same computation
_OFFICIAL_DROPOUTS = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)


def _hf_resnet50(out_features):
    from transformers import ResNetConfig

    return ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=out_features,
    )


def hf_deformable_detr(**kwargs):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    cfg = DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=91,
        auxiliary_loss=True,  # as ours and the official recipe
        **_OFFICIAL_DROPOUTS,
        backbone_config=_hf_resnet50(["stage2", "stage3", "stage4"]),
        **kwargs,
    )
    return DeformableDetrForObjectDetection(cfg)


def hf_conditional_detr(**kwargs):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    cfg = ConditionalDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=91,
        auxiliary_loss=True,  # as ours and the official recipe
        **_OFFICIAL_DROPOUTS,
        backbone_config=_hf_resnet50(["stage4"]),
        **kwargs,
    )
    return ConditionalDetrForObjectDetection(cfg)


def train_backbone_like_official(hf) -> None:
    """Makes the HF model train ResNet stages 2-4 (HF ``stages.1``-``3``), as the official recipes
    and ours (``freeze_at=2``) do. HF means to, but with its own (non-timm) ResNet it looks for
    "stage.1" in names that read "stages.1" and so freezes the whole backbone, which would leave
    out the backbone's backward pass from its training step."""
    for name, param in hf.model.backbone.named_parameters():
        if re.search(r"\.stages\.[123]\.", name):
            param.requires_grad_(True)


def trainable_backbone_numel(backbone) -> int:
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)


# name: (config, HF builder or None, converter arch, paper GFLOPs)
MODELS: Dict[str, tuple] = {
    "deformable_detr_r50": (
        "deformable_detr/deformable_detr_r50_50ep",
        hf_deformable_detr,
        "deformable_detr",
        173,
    ),
    "deformable_detr_single_scale_r50": (
        "deformable_detr/deformable_detr_single_scale_r50_50ep",
        None,
        None,
        78,
    ),
    "deformable_detr_two_stage_r50": (
        "deformable_detr/deformable_detr_two_stage_r50_50ep",
        lambda: hf_deformable_detr(with_box_refine=True, two_stage=True),
        "deformable_detr",
        173,
    ),
    "conditional_detr_r50": (
        "conditional_detr/conditional_detr_r50_50ep",
        hf_conditional_detr,
        "conditional_detr",
        90,
    ),
    "detr_r50": ("detr/detr_r50_500ep", None, None, 86),
    "smca_r50": ("smca_detr/smca_r50_50ep", None, None, 86),
    "smca_ms_r50": ("smca_detr/smca_ms_r50_50ep", None, None, 152),
    "tsp_fcos_r50": ("tsp/tsp_fcos_r50_36ep", None, None, 189),
    "tsp_rcnn_r50": ("tsp/tsp_rcnn_r50_36ep", None, None, 188),
}


# ------------------------------------------------------------------ measurement helpers
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_increase_mb(fn: Callable[[], None]) -> float:
    """Runs ``fn`` once (its warm-up) and returns the peak resident-memory increase (MB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return (peak[0] - baseline) / 2**20


def measure(fns: Dict[str, Callable[[], None]], repeat: int) -> Dict[str, Dict[str, float]]:
    """Median seconds of each of ``fns`` over ``repeat`` rounds, after one warm-up each (which
    gives the peak memory). Each round runs every function twice in a row, timing the second run,
    the functions in alternating order: a change in the machine's speed during the run (other
    tenants, clock) affects all of them alike, and each timed run finds the allocator as a
    repeated run of the same model leaves it, as in training, not as the other model left it."""
    results = {name: {"peak_rss_increase_mb": peak_rss_increase_mb(fn)} for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for i in range(repeat):
        for name, fn in list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]:
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name in fns:
        results[name].update(
            seconds=statistics.median(times[name]), runs=[round(t, 3) for t in times[name]]
        )
    return results


def gflops(model, image: torch.Tensor) -> Optional[float]:
    from fvcore.nn import FlopCountAnalysis

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
            out = self.model.compute_outputs(ImageList(x, [tuple(x.shape[-2:])] * x.shape[0]), mask)
            return out["pred_logits"], out["pred_boxes"]

    def attention_flops(inputs, outputs):
        # q (..., L, E) @ k (..., S, E)^T, then (..., L, S) @ v (..., S, Ev): one MAC = one flop
        q, k, v = (i.type().sizes() for i in list(inputs)[:3])
        batch = math.prod(q[:-2])
        return batch * q[-2] * k[-2] * (q[-1] + v[-1])

    analysis = FlopCountAnalysis(Wrapper().eval(), (image,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", attention_flops)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total() / 1e9


def random_targets(n_images: int, h: int, w: int, num_classes: int, g: torch.Generator):
    batched = []
    for _ in range(n_images):
        xy = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (5,), generator=g)
        batched.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return batched


def hf_labels(batched, num_classes):
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    labels = []
    for x in batched:
        h, w = x["instances"].image_size
        b = x["instances"].gt_boxes.tensor / torch.tensor([w, h, w, h])
        cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
        labels.append(
            {
                "class_labels": torch.tensor([ids[c] for c in x["instances"].gt_classes]),
                "boxes": cxcywh,
            }
        )
    return labels


def normalized(model, batched):
    images, mask = model.preprocess_image(batched)
    return images.tensor, (~mask).long()


def gemm_conv_share(fn: Callable[[], None]) -> float:
    """Share of one run of ``fn``'s self CPU time (torch.profiler) spent in matrix multiplies and
    convolutions: work that ours and HF do alike, so it bounds what a faster attention can gain."""
    with torch.profiler.profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(
        e.self_cpu_time_total
        for e in events
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm") or "conv" in e.key
    )
    return dense / total


# ------------------------------------------------------------------ one model
def benchmark(name: str, repeat: int) -> Dict:
    config, hf_builder, arch, paper_gflops = MODELS[name]
    torch.manual_seed(0)
    ours = instantiate(get_config(config).model).eval()
    hf = None
    if hf_builder is not None:
        hf = hf_builder().eval()
        Checkpointer(ours, strict=True)._load_model(
            {"model": convert_checkpoint(hf.state_dict(), "hf", arch)}
        )
        train_backbone_like_official(hf)
        if trainable_backbone_numel(hf.model.backbone) != trainable_backbone_numel(ours.backbone):
            raise RuntimeError(f"{name}: ours and HF would not train the same backbone parameters")
    g = torch.Generator().manual_seed(0)
    row = {"model": name, "config": config, "paper_gflops": paper_gflops}
    image = torch.rand(1, 3, 800, 1216, generator=g)
    row["gflops"] = gflops(ours, image)

    infer = [{"image": image[0] * 255}]
    inference = {"ours": lambda: ours(infer)}
    if hf is not None:
        pixels, pixel_mask = normalized(ours, infer)
        inference["hf"] = lambda: hf(pixel_values=pixels, pixel_mask=pixel_mask)
    with torch.no_grad():
        for who, result in measure(inference, repeat).items():
            row[f"{who}_inference"] = result

    batched = random_targets(2, 512, 512, ours.num_classes, g)
    ours.train()

    def our_step():
        sum(ours(batched).values()).backward()
        ours.zero_grad(set_to_none=True)

    train_steps = {"ours": our_step}
    if hf is not None:
        hf.train()
        pixels, pixel_mask = normalized(ours, batched)
        labels = hf_labels(batched, ours.num_classes)

        def hf_step():
            hf(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss.backward()
            hf.zero_grad(set_to_none=True)

        train_steps["hf"] = hf_step
    for who, result in measure(train_steps, repeat).items():
        row[f"{who}_train_step"] = dict(result, gemm_conv_share=gemm_conv_share(train_steps[who]))
    if hf is not None:
        row["speedup_inference"] = row["hf_inference"]["seconds"] / row["ours_inference"]["seconds"]
        row["speedup_train_step"] = (
            row["hf_train_step"]["seconds"] / row["ours_train_step"]["seconds"]
        )
    return row


ONNX_MODELS = ("deformable_detr_r50", "conditional_detr_r50")


def onnx_benchmark(name: str, repeat: int, threads: int, onnx_dir: str) -> Dict:
    """ONNX Runtime (CPU) latency of the exported model next to our PyTorch path, batch 1,
    800x1216, both including the post-processing into ``Instances`` (the same random weights;
    deformable attention runs natively in PyTorch and through ``grid_sample`` in ONNX)."""
    import onnxruntime

    from detr_variants.engine.export import (
        ExportableDetector,
        export_meta,
        postprocess_exported,
        save_exported,
    )

    config = MODELS[name][0]
    torch.manual_seed(0)
    ours = instantiate(get_config(config).model).eval()
    wrapper, meta = ExportableDetector(ours), export_meta(ours)
    image = torch.rand(1, 3, 800, 1216, generator=torch.Generator().manual_seed(0)) * 255
    path = os.path.join(onnx_dir, f"{name}.onnx")
    os.makedirs(onnx_dir, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        save_exported(wrapper, image, path, "onnx")
    export_seconds = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    pixels = image.numpy()

    def onnx_inference():
        outputs = session.run(None, {"image": pixels})
        postprocess_exported([torch.from_numpy(o) for o in outputs], (800, 1216), meta)

    with torch.no_grad():
        diffs = [
            float(abs(torch.from_numpy(o) - e).max())
            for o, e in zip(session.run(None, {"image": pixels}), wrapper(image))
        ]
        fns = {"pytorch": lambda: ours([{"image": image[0]}]), "onnxruntime": onnx_inference}
        row = {"model": name, "config": config, "export_seconds": round(export_seconds, 1)}
        row.update(measure(fns, repeat), max_abs_diff_logits_boxes=diffs)
    row["onnx_over_pytorch"] = row["onnxruntime"]["seconds"] / row["pytorch"]["seconds"]
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="output/benchmark.json")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help=f"instead: ONNX Runtime vs PyTorch CPU latency of {', '.join(ONNX_MODELS)}",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.onnx:
        onnx_dir = os.path.join(os.path.dirname(args.output) or ".", "onnx")
        rows = [onnx_benchmark(n, args.repeat, args.threads, onnx_dir) for n in ONNX_MODELS]
        for row in rows:
            print(json.dumps(row, indent=1), flush=True)
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            meta = {"device": "cpu", "threads": args.threads, "torch": torch.__version__}
            json.dump({**meta, "onnxruntime": _onnxruntime_version(), "rows": rows}, f, indent=2)
        return
    rows = []
    for name in args.models:
        rows.append(benchmark(name, args.repeat))
        print(json.dumps(rows[-1], indent=1), flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "rows": rows},
            f,
            indent=2,
        )

    def cell(row, key):
        return (
            f"{row[key]['seconds']:.2f} s / {row[key]['peak_rss_increase_mb']:.0f} MB"
            if key in row
            else "-"
        )

    print(
        "\n| model | GFLOPs (paper) | inference ours | inference HF | train step ours | train step HF |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['gflops']:.0f} ({r['paper_gflops']}) | {cell(r, 'ours_inference')} | "
            f"{cell(r, 'hf_inference')} | {cell(r, 'ours_train_step')} | {cell(r, 'hf_train_step')} |"
        )


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
