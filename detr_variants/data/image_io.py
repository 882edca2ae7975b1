"""Reading image files into the HxWx3 ``uint8`` arrays the models take.

detectron2's ``read_image`` converts every PIL mode with ``Image.convert("RGB")``, which clips
16-bit samples to 255 and maps float images to garbage without a word. Here 16-bit grayscale is
rescaled to 8 bits, and modes whose range is unknown (32-bit integer, float) are refused.
"""

import os
from typing import Union

import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation
from PIL import Image

__all__ = ["SUPPORTED_FORMATS", "read_image"]

SUPPORTED_FORMATS = ("RGB", "BGR")
# PIL's modes for 16-bit grayscale (PNG, TIFF): full range 0..65535.
_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(file_name: Union[str, os.PathLike], format: str = "RGB") -> np.ndarray:
    """Reads an image file as an HxWx3 ``uint8`` array in ``format``.

    EXIF orientation is applied (as detectron2's ``read_image``); grayscale, palette, alpha and
    CMYK images are converted to three channels (alpha is dropped); 16-bit grayscale is scaled
    by 255/65535 with rounding.

    Raises:
        IOError: naming the file, when it is missing, truncated, not an image, or of a mode
            with no defined 8-bit range (32-bit integer ``I``, float ``F``).
    """
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"image format must be one of {SUPPORTED_FORMATS}, got {format!r}")
    try:
        with Image.open(file_name) as image:
            image.load()  # decodes now, so that truncated files fail here
            image = _apply_exif_orientation(image)
    except Exception as e:  # PIL raises several types for missing, corrupt or truncated files
        raise IOError(f"Cannot read image {str(file_name)!r}: {e}") from e
    if image.mode in _UINT16_MODES:
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        raise IOError(
            f"Cannot read image {str(file_name)!r}: PIL mode {image.mode!r} (32-bit integer or "
            "float samples) has no defined 8-bit range; convert it to 8 bits per channel"
        )
    array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array[:, :, ::-1] if format == "BGR" else array)
