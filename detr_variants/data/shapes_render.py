"""Rendering of the synthetic shapes images: shapes with random colours, sizes and rotations
on cluttered backgrounds (gradients, noise, thin lines and small blobs that are not objects),
each object with its tight box and its outline polygon, optional crowd regions (clusters of tiny
shapes annotated as one region with a mask), and optionally in grayscale.

Every parameter comes from a :class:`~detr_variants.data.synthetic.ShapesSpec`.
"""

import math
from typing import List, Optional, Tuple

import cv2
import numpy as np

__all__ = ["SHAPES", "render_image", "shape_mask"]

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")

MIN_VISIBLE = 0.5  # fraction of an object that later objects must leave visible
PLACEMENT_TRIES = 25
MIN_COLOUR_DIST = 90.0  # L2 in RGB between an object and what lies beneath it
CROWD_SIZE_RANGE = (40, 90)  # side of a crowd region, pixels
CROWD_MEMBERS = (4, 9)  # tiny shapes per crowd region, [lo, hi)
CROWD_MEMBER_SIDE = (6.0, 12.0)
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as cv2's RGB2GRAY


def _unit_outline(name: str, rng: np.random.Generator) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Returns ``(outer, hole)`` polygons of a shape with radius ~1 around 0."""
    if name in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], axis=1)
        hole = circle * rng.uniform(0.45, 0.65) if name == "ring" else None
        return circle, hole
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64), None
    if name == "triangle":
        t = np.deg2rad([90.0, 210.0, 330.0])
        return np.stack([np.cos(t), np.sin(t)], axis=1), None
    if name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), None
    if name == "cross":
        a = rng.uniform(0.25, 0.38)  # half width of an arm
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a)]
        pts += [(-x, -y) for x, y in pts]
        return np.array(pts, dtype=np.float64), None
    raise ValueError(f"Unknown shape {name!r}")


def shape_mask(
    name: str, side: float, max_wh: Tuple[int, int], rng
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Rasterizes a randomly deformed and rotated shape.

    Args:
        name: shape name, one of :data:`SHAPES`.
        side: target sqrt(area) of the shape's bounding box, in pixels.
        max_wh: the mask may not be wider / taller than this.

    Returns:
        ``(mask, outline)``: a bool mask cropped tightly to the shape, and its outer outline as
        an Nx2 polygon in the mask's pixel-corner coordinates (pixel ``(i, j)`` covers
        ``[j, j+1] x [i, i+1]``, COCO's convention); ``(None, None)`` if it came out empty.
    """
    outer, hole = _unit_outline(name, rng)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    # Mild aspect jitter so that shapes are not all perfectly regular.
    linear = rot @ np.diag([1.0, rng.uniform(0.85, 1.18)])
    outer = outer @ linear.T
    w0, h0 = np.ptp(outer, axis=0)
    scale = min(side / math.sqrt(w0 * h0), max_wh[0] / w0, max_wh[1] / h0)
    origin = outer.min(axis=0) * scale - 1.0  # 1 px margin for rasterization
    size_w, size_h = (np.ceil(np.array([w0, h0]) * scale) + 3).astype(int)
    mask = np.zeros((size_h, size_w), dtype=np.uint8)

    def fill(poly, value):
        # 4 fractional bits of sub-pixel precision.
        pts = np.round((poly * scale - origin) * 16).astype(np.int32)
        cv2.fillPoly(mask, [pts], value, lineType=cv2.LINE_8, shift=4)

    fill(outer, 1)
    if hole is not None:
        fill(hole @ linear.T, 0)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None, None
    # cv2 fills the pixels whose centres (integer coordinates) lie inside: +0.5 moves the
    # outline to pixel-corner coordinates; clipping keeps it inside the tight box.
    outline = outer * scale - origin - np.array([xs.min(), ys.min()]) + 0.5
    mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(bool)
    outline = np.clip(outline, 0, [mask.shape[1], mask.shape[0]])
    return mask, outline


def _random_colour(rng) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _background(rng, h: int, w: int, clutter: float) -> np.ndarray:
    """Linear two-colour gradient plus non-object clutter (lines, small blobs)."""
    c0, c1 = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.arange(w, dtype=np.float32)[None, :] * np.cos(angle)
    t = xs + np.arange(h, dtype=np.float32)[:, None] * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0.astype(np.float32) + t[..., None] * (c1 - c0).astype(np.float32)

    def clutter_colour():
        # Half the clutter uses object-like colours so that colour alone does
        # not identify objects.
        if rng.random() < 0.5:
            return tuple(float(c) for c in _random_colour(rng))
        return tuple(float(c) for c in np.clip(c0 + rng.uniform(-50, 50, 3), 0, 255))

    for _ in range(int(round(rng.integers(2, 9) * clutter))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p0, p1, clutter_colour(), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(round(rng.integers(2, 11) * clutter))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        cv2.ellipse(
            img, centre, axes, float(rng.uniform(0, 180)), 0, 360, clutter_colour(), -1, cv2.LINE_AA
        )
    return img


def _box_iou(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> float:
    """IoU of two XYWH boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _place(mask, owner, boxes, full_areas, max_iou, rng) -> Optional[Tuple[int, int]]:
    """Finds a top-left corner for ``mask`` whose box overlaps no earlier box by more than
    ``max_iou`` and that leaves every earlier object ``MIN_VISIBLE`` visible, or None."""
    h_img, w_img = owner.shape
    h, w = mask.shape
    if w > w_img - 2 or h > h_img - 2:
        return None
    # Pixels each earlier object currently shows (unchanged while we search).
    visible = np.bincount(owner.ravel() + 1, minlength=len(boxes) + 1)[1:]
    min_visible = MIN_VISIBLE * np.asarray(full_areas, dtype=np.float64)
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(1, w_img - w))
        y0 = int(rng.integers(1, h_img - h))
        box = (x0, y0, w, h)
        if any(_box_iou(box, b) > max_iou for b in boxes):
            continue
        # Pixels of each earlier object that this one would newly cover.
        under = owner[y0 : y0 + h, x0 : x0 + w][mask]
        covered = np.bincount(under + 1, minlength=len(boxes) + 1)[1:]
        if np.all(visible - covered >= min_visible):
            return x0, y0
    return None


def _paint(img, mask, x0, y0, rng, gray: bool) -> None:
    """Paints a shaded object colour that contrasts with what lies beneath it (in luminance
    for a grayscale image)."""
    h, w = mask.shape
    region = img[y0 : y0 + h, x0 : x0 + w]
    under = region[mask].mean(axis=0)

    def contrast(colour):
        if gray:
            return math.sqrt(3) * abs(float(_LUMA @ (colour - under)))
        return float(np.linalg.norm(colour - under))

    colour = _random_colour(rng)
    for _ in range(20):
        if contrast(colour) >= MIN_COLOUR_DIST:
            break
        colour = _random_colour(rng)
    # A soft linear shading keeps objects from being perfectly flat.
    amp = rng.uniform(0.0, 0.25)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = (xx - w / 2) * np.cos(ang) + (yy - h / 2) * np.sin(ang)
    shade = 1.0 + amp * proj / max(w, h)
    region[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0, 255)


def _crowd(spec, rng, img_wh) -> Tuple[int, List[Tuple[np.ndarray, int, int]]]:
    """A cluster of tiny shapes of one class: ``(class index, [(mask, dx, dy), ...])`` with
    member offsets inside the cluster's tight box."""
    cls = int(rng.integers(len(spec.classes)))
    side = int(min(rng.integers(*CROWD_SIZE_RANGE), img_wh[0] - 4, img_wh[1] - 4))
    members = []
    for _ in range(int(rng.integers(*CROWD_MEMBERS))):
        mask, _ = shape_mask(spec.classes[cls], rng.uniform(*CROWD_MEMBER_SIDE), (side, side), rng)
        if mask is None:
            continue
        dx = int(rng.integers(0, max(side - mask.shape[1], 0) + 1))
        dy = int(rng.integers(0, max(side - mask.shape[0], 0) + 1))
        members.append((mask, dx, dy))
    return cls, members


def _union(members) -> Tuple[np.ndarray, List[Tuple[np.ndarray, int, int]]]:
    """The members' union mask cropped tightly, and the members re-offset into it."""
    w = max(dx + m.shape[1] for m, dx, _ in members)
    h = max(dy + m.shape[0] for m, _, dy in members)
    union = np.zeros((h, w), dtype=bool)
    for m, dx, dy in members:
        union[dy : dy + m.shape[0], dx : dx + m.shape[1]] |= m
    ys, xs = np.nonzero(union)
    x0, y0 = xs.min(), ys.min()
    return union[y0 : ys.max() + 1, x0 : xs.max() + 1], [
        (m, dx - x0, dy - y0) for m, dx, dy in members
    ]


def render_image(spec, rng: np.random.Generator) -> Tuple[np.ndarray, List[dict]]:
    """Renders one image of ``spec``.

    Args:
        spec: a :class:`~detr_variants.data.synthetic.ShapesSpec`.
        rng: the image's own random generator.

    Returns:
        ``(image, objects)``: a uint8 HxWx3 (colour) or HxW (grayscale) image, and per object
        ``{"category": index into spec.classes, "bbox": [x, y, w, h], "polygon": Nx2 array}``
        for a shape (tight integer box, outline in pixel-corner image coordinates), or
        ``{"category", "bbox", "mask": HxW bool}`` for a crowd region.
    """
    lo, hi = spec.image_size
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    gray = rng.random() < spec.grayscale_fraction
    img = _background(rng, h, w, spec.clutter)
    empty = rng.random() < spec.empty_fraction
    num = 0 if empty else int(rng.integers(spec.min_objects, spec.max_objects + 1))

    owner = np.full((h, w), -1, dtype=np.int64)  # index of the topmost object
    boxes, full_areas, objects = [], [], []

    def add(mask, pieces, obj):
        pos = _place(mask, owner, boxes, full_areas, spec.max_overlap_iou, rng)
        if pos is None:
            return None  # dropped: too crowded for this shape
        x0, y0 = pos
        for piece, dx, dy in pieces:
            _paint(img, piece, x0 + dx, y0 + dy, rng, gray)
        owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = len(boxes)
        boxes.append((x0, y0, mask.shape[1], mask.shape[0]))
        full_areas.append(int(mask.sum()))
        objects.append({**obj, "bbox": list(boxes[-1])})
        return x0, y0

    for _ in range(num):
        cls = int(rng.integers(len(spec.classes)))
        lo, hi = spec.side_ranges[rng.choice(len(spec.side_ranges), p=spec.size_probs)]
        mask, outline = shape_mask(spec.classes[cls], rng.uniform(lo, hi), (w - 4, h - 4), rng)
        if mask is not None and (pos := add(mask, [(mask, 0, 0)], {"category": cls})):
            objects[-1]["polygon"] = outline + np.array(pos)
    if not empty and rng.random() < spec.crowd_fraction:
        cls, members = _crowd(spec, rng, (w, h))
        if members:
            union, members = _union(members)
            if pos := add(union, members, {"category": cls}):
                full = np.zeros((h, w), dtype=bool)
                full[pos[1] : pos[1] + union.shape[0], pos[0] : pos[0] + union.shape[1]] = union
                objects[-1]["mask"] = full

    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)  # softer edges, as in real photos
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(3.0, 10.0))
    np.clip(img + 0.5, 0, 255, out=img)  # +0.5: round when truncating to uint8
    img = img.astype(np.uint8)
    if gray:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return img, objects
