"""detr_variants: the fast-converging DETR family as a Detectron2 extension.

Importing the package registers every meta-architecture in detectron2's
``META_ARCH_REGISTRY`` and the built-in synthetic datasets in ``DatasetCatalog``.
"""

from . import (
    data,  # noqa: F401  (registers datasets)
    modeling,  # noqa: F401  (registers meta-architectures)
)

__version__ = "0.1.0"
