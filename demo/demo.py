#!/usr/bin/env python
"""Inference demo: a config and its checkpoint on images, a folder, a video or a webcam, drawn
with detectron2's visualizers (the flags of detectron2's ``demo/demo.py``). To train a model
first, on the embedded dataset, see ``tools/train_demo.py`` (``make demo``).

    python demo/demo.py --config-file projects/deformable_detr/configs/deformable_detr_demo.py \\
        --input photos/ --output out/ --opts train.init_checkpoint=output/demo/model_final.pth
    python demo/demo.py --config-file CFG --input 'a/*.jpg' b.png --output out/ --opts ...
    python demo/demo.py --config-file CFG --video-input clip.mp4 --output out/ --opts ...
    python demo/demo.py --config-file CFG --webcam --opts ...

``--input`` takes files, globs and folders (their images). ``--output`` is a file for a single
input, otherwise a folder (created); without it, results are shown in a window. The test-time
resize and the device come from the config (``train.device``). Unreadable images are skipped
with a warning.
"""

import argparse
import glob
import logging
import os
import time
from typing import List

import cv2
import tqdm
from detectron2.config import LazyConfig
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from predictor import VisualizationDemo  # demo/predictor.py, next to this script

import detr_variants  # noqa: F401  (registers the meta-architectures and datasets)
from detr_variants.engine.lazy_train import apply_overrides

logger = logging.getLogger("detr_variants.demo")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "x264"}
WINDOW = "detr_variants"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, globs or folders")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="the first camera")
    parser.add_argument("--output", help="a file (single input) or a folder")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="minimum score drawn"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="allow running without train.init_checkpoint (an untrained, seeded model)",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, key=value"
    )
    return parser


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files, globs and folders (their images, sorted) -> image paths."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = sorted(os.listdir(pattern))
            paths += [
                os.path.join(pattern, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
            ]
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise FileNotFoundError(f"--input {pattern!r} matches no file")
            paths += matches
    if not paths:
        raise FileNotFoundError(
            f"--input {patterns} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def setup_cfg(args):
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if not cfg.train.get("init_checkpoint"):
        if not args.random_weights:
            raise SystemExit(
                "no checkpoint: pass --opts train.init_checkpoint=PATH (or --random-weights to "
                "draw an untrained model)"
            )
        cfg.train.allow_random_weights = True  # the predictor's explicit opt-in
        logger.warning("drawing an untrained model (--random-weights)")
    return cfg


def output_path(output: str, source: str, many: bool, ext: str = "") -> str:
    """``output`` itself for a single input written to a file, else ``output/<source name>``."""
    if many or output.endswith(os.sep) or os.path.isdir(output):
        os.makedirs(output, exist_ok=True)
        name = os.path.basename(source)
        return os.path.join(output, os.path.splitext(name)[0] + ext if ext else name)
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    return output


def show(image_bgr, wait_ms: int) -> bool:
    """Shows a frame; False when Esc is pressed."""
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW, image_bgr)
    except cv2.error as e:
        raise SystemExit(f"cannot open a window ({e}); pass --output to write files") from e
    return cv2.waitKey(wait_ms) != 27


def run_on_images(demo: VisualizationDemo, args) -> int:
    paths = expand_inputs(args.input)
    skipped = 0
    for path in tqdm.tqdm(paths, disable=len(paths) == 1):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:  # a bad file in a folder must not stop the others
            logger.warning("skipped %s: cannot read it (%s)", path, e)
            skipped += 1
            continue
        start = time.perf_counter()
        predictions, drawn = demo.run_on_image(image)
        logger.info(
            "%s: %d detections in %.2f s",
            path,
            len(predictions["instances"]),
            time.perf_counter() - start,
        )
        if args.output:
            drawn.save(output_path(args.output, path, many=len(paths) > 1))
        elif not show(drawn.get_image()[:, :, ::-1], 0):
            break
    if skipped:
        logger.warning("%d of %d images could not be read", skipped, len(paths))
    return len(paths) - skipped


def run_on_video(demo: VisualizationDemo, video: cv2.VideoCapture, args, name: str) -> int:
    writer = None
    if args.output:
        path = output_path(args.output, name, many=False, ext=".mp4")
        codec = VIDEO_CODECS.get(os.path.splitext(path)[1].lower())
        if codec is None:
            raise SystemExit(f"--output {path!r}: use one of {', '.join(VIDEO_CODECS)}")
        size = (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        fps = video.get(cv2.CAP_PROP_FPS) or 30.0
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, size, True)
        if not writer.isOpened():
            raise SystemExit(f"OpenCV cannot write {path!r} with codec {codec}; try .mp4 or .avi")
    frames = 0
    total = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    for frame in tqdm.tqdm(demo.run_on_video(video), total=total):
        frames += 1
        if writer is not None:
            writer.write(frame)
        elif not show(frame, 1):
            break
    video.release()
    if writer is not None:
        writer.release()
    else:
        cv2.destroyAllWindows()
    return frames


def main(argv=None) -> int:
    """Returns the number of images or frames drawn."""
    args = get_parser().parse_args(argv)
    setup_logger(name="detr_variants")
    demo = VisualizationDemo(setup_cfg(args), confidence_threshold=args.confidence_threshold)
    if args.input:
        return run_on_images(demo, args)
    if args.webcam:
        if args.output:
            raise SystemExit("--output is not supported with --webcam")
        source, name = 0, "webcam"
    elif not os.path.isfile(args.video_input):
        raise SystemExit(f"--video-input {args.video_input!r} is not a file")
    else:
        source, name = args.video_input, os.path.basename(args.video_input)
    video = cv2.VideoCapture(source)
    if not video.isOpened():
        raise SystemExit(f"OpenCV cannot open {'the webcam' if args.webcam else repr(source)}")
    return run_on_video(demo, video, args, name)


if __name__ == "__main__":
    main()
