"""The native extension ``detr_variants._C`` (built from ops/csrc); the package imports without it."""

from typing import Optional

import torch

try:
    from detr_variants import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as e:  # pragma: no cover - depends on the build
    _C = None
    IMPORT_ERROR = e

__all__ = ["_C", "IMPORT_ERROR", "graph_capture"]


def graph_capture() -> Optional[str]:
    """What is capturing the graph (tracing, ONNX export, torch.compile), which a native call would
    break, or None."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "tracing (torch.jit)"
    if torch.onnx.is_in_onnx_export():
        return "ONNX export"
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return "torch.compile"
    return None
