"""DETR's augmentation (Carion et al. 2020, Sec. 4) in detectron2 ``Augmentation`` form."""

from typing import List, Sequence

import numpy as np
from detectron2.data import transforms as T


class ResizeShortestEdge(T.ResizeShortestEdge):
    """detectron2's ``ResizeShortestEdge``, but no side is rounded down to 0 pixels.

    With ``max_size``, an image as thin as 1x3000 would be resized to 0x373 and crash inside
    the transform; here its thin side keeps at least one pixel.
    """

    def get_transform(self, image) -> T.Transform:
        transform = super().get_transform(image)
        if isinstance(transform, T.ResizeTransform) and min(transform.new_h, transform.new_w) < 1:
            transform = T.ResizeTransform(
                transform.h,
                transform.w,
                max(transform.new_h, 1),
                max(transform.new_w, 1),
                transform.interp,
            )
        return transform


class RandomChoice(T.Augmentation):
    """Applies one of several augmentation lists, chosen uniformly at random."""

    def __init__(self, choices: Sequence[Sequence[T.Augmentation]]):
        super().__init__()
        self.choices = [T.AugmentationList(list(c)) for c in choices]

    def __call__(self, aug_input) -> T.Transform:
        return self.choices[np.random.randint(len(self.choices))](aug_input)

    def __repr__(self):
        return f"RandomChoice({self.choices})"


def detr_train_augmentations(
    min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
) -> List[T.Augmentation]:
    """Horizontal flip, then with equal chance either a multi-scale resize, or
    resize → random crop → multi-scale resize (the official ``make_coco_transforms``)."""
    resize = ResizeShortestEdge(list(min_sizes), max_size, sample_style="choice")
    return [
        T.RandomFlip(horizontal=True),
        RandomChoice(
            [
                [resize],
                [
                    ResizeShortestEdge(list(crop_resize_sizes), sample_style="choice"),
                    T.RandomCrop("absolute_range", tuple(crop_size)),
                    resize,
                ],
            ]
        ),
    ]


def flip_resize_augmentations(min_sizes: Sequence[int], max_size: int) -> List[T.Augmentation]:
    """Horizontal flip and a multi-scale resize: DETR's augmentation without its random-crop
    branch. The demo recipe trains with it: in its few epochs, the crops slowed learning more
    than they helped (README "The demo")."""
    return [
        T.RandomFlip(horizontal=True),
        ResizeShortestEdge(list(min_sizes), max_size, sample_style="choice"),
    ]


def detr_test_augmentations(min_size: int = 800, max_size: int = 1333) -> List[T.Augmentation]:
    """Shortest edge ``min_size``, longest at most ``max_size``."""
    return [ResizeShortestEdge(min_size, max_size)]
