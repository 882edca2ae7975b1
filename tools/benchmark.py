#!/usr/bin/env python
"""Speed, memory and GFLOPs of the papers' R50 models, ours next to HF ``transformers``'s
implementation with the same weights, measured side by side in one run.

    python tools/benchmark.py                              # every model, table + output/benchmark.json
    python tools/benchmark.py --models deformable_detr_r50 --repeat 3 --threads 2
    python tools/benchmark.py --models deformable_detr_r50 --device cuda --repeat 10
    python tools/benchmark.py --onnx --output output/benchmark_onnx.json  # ONNX Runtime vs ours

Sizes: --inference-size and --train-size. On ``--device cuda`` each timed run ends with
``torch.cuda.synchronize()``, memory is also the peak of allocated CUDA memory above what was
allocated before, and GFLOPs are counted on the CPU before the models move to the GPU.

For each model: GFLOPs (fvcore, one multiply-add = one flop, as the papers count) at 800x1216
beside the paper's number; inference latency (batch 1, 800x1216) and a training step (forward +
backward, batch 2, 512x512, 5 boxes per image), each the median of --repeat runs after a warm-up,
ours and HF's runs interleaved (see ``measure``); the peak resident-memory increase of each
(sampled every 5 ms); and the share of one training step spent in matrix multiplies and
convolutions (torch.profiler). The HF model is random-initialised with the architecture of the
COCO checkpoint, converted with ``convert_checkpoint`` and loaded into ours, so both compute the
same function. Nothing here is asserted: it writes numbers.

Any config, as detectron2's ``tools/benchmark.py`` (iterations per second, peak memory, JSON):

    python tools/benchmark.py --config-file projects/detr/configs/detr_r18_synthetic.py --task train
    python tools/benchmark.py --config-file CFG --task eval --iters 20 [key=value ...]

``--task train`` times training steps (``SetPredictionTrainer.run_step``: forward, backward,
clipping, optimiser) on the first batches of the training loader, cycled, so loading is not timed;
``eval`` times inference on the first test batches the same way; ``data`` times the training
loader alone. Peak memory: the resident-memory increase during the timed iterations (sampled
every 5 ms), the process's peak RSS, and on CUDA ``torch.cuda.max_memory_allocated``.
"""

import argparse
import ctypes
import gc
import itertools
import json
import os
import re
import resource
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import detr_variants  # noqa: F401
from detr_variants.checkpoint import Checkpointer, convert_checkpoint
from detr_variants.engine import SetPredictionTrainer, autocast_dtype
from detr_variants.engine.lazy_train import (
    apply_overrides,
    build_model,
    build_train_loader,
    clip_parameters,
)
from detr_variants.model_zoo import get_config
from detr_variants.utils.analysis import flop_count_analysis

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


def synchronized(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a wait for the work it queued on ``device``, so that wall-clock time
    counts the kernels, not only their launches."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def peak_memory_increase_mb(fn: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Runs ``fn`` once (its warm-up): the peak resident-memory increase and, on CUDA, the peak of
    allocated device memory above what was allocated before (MB)."""
    if device.type != "cuda":
        return {"peak_rss_increase_mb": peak_rss_increase_mb(fn)}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    rss = peak_rss_increase_mb(fn)
    cuda = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return {"peak_rss_increase_mb": rss, "peak_cuda_memory_increase_mb": cuda}


def measure(
    fns: Dict[str, Callable[[], None]], repeat: int, device: str = "cpu"
) -> Dict[str, Dict[str, float]]:
    """Median seconds of each of ``fns`` over ``repeat`` rounds, after one warm-up each (which
    gives the peak memory). Each round runs every function twice in a row, timing the second run,
    the functions in alternating order: a change in the machine's speed during the run (other
    tenants, clock) affects all of them alike, and each timed run finds the allocator as a
    repeated run of the same model leaves it, as in training, not as the other model left it."""
    device = torch.device(device)
    fns = {name: synchronized(fn, device) for name, fn in fns.items()}
    results = {name: peak_memory_increase_mb(fn, device) for name, fn in fns.items()}
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
    """GFLOPs of ``model``'s inference on ``image`` (1, 3, H, W), one multiply-add = one flop."""
    analysis = flop_count_analysis(model.eval(), [{"image": image[0]}])
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


def image_size(text: str) -> tuple[int, int]:
    """``HxW`` -> (H, W)."""
    h, w = text.lower().split("x")
    return int(h), int(w)


# ------------------------------------------------------------------ one model
def benchmark(
    name: str,
    repeat: int,
    device: str = "cpu",
    inference_size: tuple[int, int] = (800, 1216),
    train_size: tuple[int, int] = (512, 512),
) -> Dict:
    device = torch.device(device)
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
    row = {"model": name, "config": config, "paper_gflops": paper_gflops, "device": str(device)}
    row.update(inference_size=list(inference_size), train_size=list(train_size))
    image = torch.rand(1, 3, *inference_size, generator=g)
    row["gflops"] = gflops(ours, image)
    ours.to(device)
    if hf is not None:
        hf.to(device)

    infer = [{"image": image[0] * 255}]
    inference = {"ours": lambda: ours(infer)}
    if hf is not None:
        pixels, pixel_mask = normalized(ours, infer)
        inference["hf"] = lambda: hf(pixel_values=pixels, pixel_mask=pixel_mask)
    with torch.no_grad():
        for who, result in measure(inference, repeat, device).items():
            row[f"{who}_inference"] = result

    batched = random_targets(2, *train_size, ours.num_classes, g)
    ours.train()

    def our_step():
        sum(ours(batched).values()).backward()
        ours.zero_grad(set_to_none=True)

    train_steps = {"ours": our_step}
    if hf is not None:
        hf.train()
        pixels, pixel_mask = normalized(ours, batched)
        labels = [
            {k: v.to(device) for k, v in t.items()} for t in hf_labels(batched, ours.num_classes)
        ]

        def hf_step():
            hf(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss.backward()
            hf.zero_grad(set_to_none=True)

        train_steps["hf"] = hf_step
    for who, result in measure(train_steps, repeat, device).items():
        # the CPU profile's shares say nothing about where a GPU spends its time
        share = gemm_conv_share(train_steps[who]) if device.type == "cpu" else None
        row[f"{who}_train_step"] = dict(result, gemm_conv_share=share)
    if hf is not None:
        row["speedup_inference"] = row["hf_inference"]["seconds"] / row["ours_inference"]["seconds"]
        row["speedup_train_step"] = (
            row["hf_train_step"]["seconds"] / row["ours_train_step"]["seconds"]
        )
    return row


# ------------------------------------------------------------------ any config
def first_batches(loader, n: int) -> List:
    """The first ``n`` batches of ``loader`` (fewer when it is shorter)."""
    return list(itertools.islice(loader, n))


def build_trainer(cfg) -> SetPredictionTrainer:
    """The trainer ``tools/train_net.py`` runs (AMP, clipping, optimiser of the config), without
    hooks, on the first 10 batches of the training loader, cycled."""
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader, _ = build_train_loader(cfg)
    clip = cfg.train.clip_grad
    return SetPredictionTrainer(
        model,
        itertools.cycle(first_batches(loader, 10)),
        optimizer,
        amp_dtype=autocast_dtype(cfg.train.amp.enabled, cfg.train.amp.dtype, model.device.type),
        clip_max_norm=clip.max_norm if clip.enabled else 0.0,
        clip_params=clip_parameters(model, clip.get("params")),
    )


def task_step(cfg, task: str) -> Callable[[], None]:
    """One iteration of ``task``: a training step, a batch of inference, or a loaded batch."""
    if task == "train":
        return build_trainer(cfg).run_step
    if task == "eval":
        model = build_model(cfg).eval()
        batches = itertools.cycle(first_batches(instantiate(cfg.dataloader.test), 10))

        def step():
            with torch.no_grad():
                model(next(batches))

        return step
    loader = iter(build_train_loader(cfg)[0])
    return lambda: next(loader)


def benchmark_config(cfg, task: str, iters: int, warmup: int) -> Dict:
    """Iterations per second of ``task`` over ``iters`` iterations after ``warmup``, and the
    peak memory of the timed iterations."""
    with EventStorage(0):  # where a training step writes its metrics
        return _benchmark_step(task_step(cfg, task), cfg, task, iters, warmup)


def _benchmark_step(step: Callable[[], None], cfg, task: str, iters: int, warmup: int) -> Dict:
    cuda = torch.cuda.is_available() and str(cfg.train.device).startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []

    def timed():
        for _ in range(iters):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)

    row = {"task": task, "iters": iters, "warmup": warmup, "device": str(cfg.train.device)}
    row["peak_rss_increase_mb"] = peak_rss_increase_mb(timed)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    row["iters_per_second"] = iters / sum(seconds)
    row["seconds_median"] = statistics.median(seconds)
    if cuda:
        row["cuda_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def write_json(path: str, content: Dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GFLOPs are counted on CPU)")
    parser.add_argument("--inference-size", type=image_size, default=(800, 1216), metavar="HxW")
    parser.add_argument("--train-size", type=image_size, default=(512, 512), metavar="HxW")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", help="JSON file (default output/benchmark[_TASK].json)")
    parser.add_argument("--config-file", metavar="FILE", help="benchmark this config's --task")
    parser.add_argument("--task", choices=("train", "eval", "data"), default="train")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (--config-file)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first iterations")
    parser.add_argument("opts", nargs="*", help="config overrides (--config-file), key=value")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help=f"instead: ONNX Runtime vs PyTorch CPU latency of {', '.join(ONNX_MODELS)}",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.onnx:
        output = args.output or "output/benchmark_onnx.json"
        onnx_dir = os.path.join(os.path.dirname(output) or ".", "onnx")
        rows = [onnx_benchmark(n, args.repeat, args.threads, onnx_dir) for n in ONNX_MODELS]
        for row in rows:
            print(json.dumps(row, indent=1), flush=True)
        meta = {"device": "cpu", "threads": args.threads, "torch": torch.__version__}
        write_json(output, {**meta, "onnxruntime": _onnxruntime_version(), "rows": rows})
        return rows
    if args.config_file:
        cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
        row = dict(config=args.config_file, threads=args.threads, torch=torch.__version__)
        row.update(benchmark_config(cfg, args.task, args.iters, args.warmup))
        print(json.dumps(row, indent=1))
        write_json(args.output or f"output/benchmark_{args.task}.json", row)
        return row
    if args.opts:
        parser.error("config overrides need --config-file")
    rows = []
    for name in args.models:
        rows.append(benchmark(name, args.repeat, args.device, args.inference_size, args.train_size))
        print(json.dumps(rows[-1], indent=1), flush=True)
    write_json(
        args.output or "output/benchmark.json",
        {"device": args.device, "threads": args.threads, "torch": torch.__version__, "rows": rows},
    )

    def cell(row, key):
        return (
            f"{row[key]['seconds']:.2f} s / "
            f"{row[key].get('peak_cuda_memory_increase_mb', row[key]['peak_rss_increase_mb']):.0f} MB"
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
