"""Side-by-side check of ``ReleasedMultiScaleSMCADETR`` against the released multi-scale SMCA code.

Usage (CPU; the official code is not part of this project and is not imported by it):

    git --git-dir=<SMCA-DETR mirror> show HEAD:Multi_scale_SMCA.zip > /tmp/ms.zip
    unzip -q /tmp/ms.zip -d /tmp/ms
    PYTHONPATH=. python tools/compare_official_smca_ms.py \\
        --official-root /tmp/ms/DMS-MH-GMCA-main_very_important

The official model is built with random weights (every weight and BatchNorm statistic
perturbed), its ``state_dict()`` goes through ``convert_checkpoint(sd, "official",
"smca_ms_released")`` into our model, and both run on the same images: one image at two sizes,
two images of one size, and two of different sizes (padded). It prints the largest logit and box
differences over all decoder layers, per image, in float64 and float32. Logits are compared
column ``COCO_THING_IDS[c]`` (official) against class ``c`` (ours).

Shims, applied at run time and only to the official code: its ``pdb.set_trace()`` in
``BackboneBase.forward`` does nothing, its ResNet is not downloaded, and its torchvision version
check (which fails for torchvision >= 0.10) is skipped. ``--per-image-shim`` also replaces its
reading of batch element 0's scale-selection weights by each image's own, to show that this is
the only difference for batches of several images.
"""

import argparse
import re
import sys
import types

import torch
from detectron2.config import instantiate

from detr_variants.checkpoint import COCO_THING_IDS, convert_checkpoint
from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.model_zoo import get_config

# official transformer module, --enc_layers, overrides of our R50 config
VARIANTS = {
    "r50": ("models.transformer_44_dot_4", 6, []),
    "transformer.py": (
        "models.transformer",
        5,
        [
            "model.encoder.num_layers=5",
            "model.encoder.layer.kernel_size=5",
            "model.encoder.layer.shared_cross_scale=False",
        ],
    ),
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def import_official(root: str):
    """The official ``main`` and ``models.detr`` modules, with the shims of the module docstring."""
    import pdb

    import torchvision

    sys.path.insert(0, root)
    pdb.set_trace = lambda *args, **kwargs: None
    version = torchvision.__version__
    torchvision.__version__ = "0.9"  # util/misc.py parses only its first 3 characters
    try:
        import main as official_main
        import models.backbone
        import models.detr
    finally:
        torchvision.__version__ = version
    models.backbone.is_main_process = lambda: False  # pretrained=False: no download
    return official_main, models.detr


def transformer_module(name: str, per_image: bool):
    """The official transformer module; with ``per_image`` a copy whose attention multiplies each
    image's per-level softmax by that image's scale-selection weights."""
    module = __import__(name, fromlist=["build_transformer"])
    if not per_image:
        return module
    source = open(module.__file__).read()
    source, n = re.subn(
        r"scale_attention\[:, 0, (\d)\]\.unsqueeze\(0\)\.unsqueeze\(-1\)",
        r"scale_attention[:, :, \1].t().repeat_interleave(num_heads, 0).unsqueeze(-1)",
        source,
    )
    if n < 4:
        raise RuntimeError(f"{module.__file__}: the batch-0 reading was not found")
    patched = types.ModuleType(name + "_per_image")
    exec(compile(source, module.__file__, "exec"), patched.__dict__)
    return patched


def official_model(official_main, official_detr, transformer, enc_layers: int):
    parser = argparse.ArgumentParser(parents=[official_main.get_args_parser()])
    args = parser.parse_args(
        [
            *("--num_queries", "300", "--dynamic_scale", "type3"),
            *("--enc_layers", str(enc_layers), "--dim_feedforward", "1024", "--device", "cpu"),
        ]
    )
    official_detr.build_transformer = transformer.build_transformer
    torch.manual_seed(0)
    model = official_detr.build(args)[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every entry perturbed, so that a wrong mapping cannot go unnoticed
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.mul_(1 + 0.1 * torch.randn(t.shape, generator=g))
                t.add_(0.02 * torch.randn(t.shape, generator=g))
    return model.eval()


def stacked(out):
    """(layers, B, Q, ·) logits and boxes of a DETR-style output dict."""
    layers = [*out["aux_outputs"], out]
    return (
        torch.stack([o["pred_logits"] for o in layers]),
        torch.stack([o["pred_boxes"] for o in layers]),
    )


def run_official(model, images, nested_tensor_from_tensor_list):
    normalised = [(x / 255 - MEAN.to(x)) / STD.to(x) for x in images]
    targets = [{"size": torch.tensor(x.shape[-2:])} for x in images]
    with torch.no_grad():
        logits, boxes = stacked(model([nested_tensor_from_tensor_list(normalised), targets]))
    return logits[..., COCO_THING_IDS], boxes


def run_ours(model, images):
    with torch.no_grad():
        return stacked(
            model.compute_outputs(*model.preprocess_image([{"image": x} for x in images]))
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-root", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--per-image-shim", action="store_true")
    args = parser.parse_args()
    official_main, official_detr = import_official(args.official_root)
    from util.misc import nested_tensor_from_tensor_list

    g = torch.Generator().manual_seed(2)

    def image(h, w):
        return torch.randint(0, 256, (3, h, w), generator=g).double()

    a, b = image(96, 128), image(96, 128)
    cases = {
        "one image 96x128": [a],
        "one image 150x101": [image(150, 101)],
        "two images 96x128": [a, b],
        "two images 96x128 + 64x90 (padded)": [a, image(64, 90)],
    }
    for variant in args.variants:
        module, enc_layers, overrides = VARIANTS[variant]
        transformer = transformer_module(module, args.per_image_shim)
        ref = official_model(official_main, official_detr, transformer, enc_layers)
        cfg = apply_overrides(get_config("smca_detr/smca_ms_released_r50_50ep"), overrides)
        ours = instantiate(cfg.model).eval()
        converted = convert_checkpoint(ref.state_dict(), "official", "smca_ms_released")
        ours.load_state_dict(converted, strict=True)
        print(f"== {variant} ({module}, {enc_layers} encoder layers): {len(converted)} keys")
        for dtype in (torch.float64, torch.float32):
            ref.to(dtype), ours.to(dtype)
            for name, images in cases.items():
                images = [x.to(dtype) for x in images]
                lo, bo = run_official(ref, images, nested_tensor_from_tensor_list)
                lm, bm = run_ours(ours, images)
                for i in range(len(images)):
                    dl = (lo[:, i] - lm[:, i]).abs().max().item()
                    db = (bo[:, i] - bm[:, i]).abs().max().item()
                    print(
                        f"  {str(dtype)[6:]} {name}, image {i}: max |logit diff| {dl:.2e}, "
                        f"max |box diff| {db:.2e}"
                    )


if __name__ == "__main__":
    main()
