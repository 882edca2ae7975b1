"""Builds the native ops in ops/csrc into ``detr_variants._C`` and ships the configs.

The CPU kernels are always compiled (unless DETR_VARIANTS_NO_EXT=1: the package then runs on its
PyTorch fallbacks). The CUDA kernels are compiled when torch is a CUDA build and ``nvcc`` is
found (CUDA_HOME), or when FORCE_CUDA=1.

The LazyConfig files stay where they are edited (``configs/common``, ``projects/*/configs``) and
are copied at build time into ``detr_variants/model_zoo_configs/`` with the same relative layout,
so their relative imports (``from ....configs.common ...``) resolve in an installed copy too (as
detectron2 ships ``configs/`` in ``detectron2/model_zoo/configs``).
"""

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - the build needs torch (use --no-build-isolation)
    raise RuntimeError(
        "detr_variants is built against the installed torch: pip install --no-build-isolation -e ."
    ) from e

CSRC = os.path.join("ops", "csrc")


def config_files():
    """The LazyConfig files to ship, relative to the repository root."""
    return sorted(
        glob.glob(os.path.join("configs", "**", "*.py"), recursive=True)
        + glob.glob(os.path.join("projects", "*", "configs", "*.py"))
    )


class build_py_with_configs(build_py):
    """build_py that also copies the configs into ``detr_variants/model_zoo_configs``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # editable: model_zoo reads the checkout
            return
        for rel in config_files():
            target = os.path.join(self.build_lib, "detr_variants", "model_zoo_configs", rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(rel, target)


def native_extensions():
    if os.environ.get("DETR_VARIANTS_NO_EXT", "0") == "1":
        return []
    sources = sorted(
        glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    )
    if not sources:
        return []
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    want_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None
    )
    cxx = ["-O3", "-std=c++20"]
    if os.environ.get("DETR_VARIANTS_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")
    openmp = ["-fopenmp"]
    if want_cuda and cuda_sources:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch derives the arch list from the visible GPUs and fails when there is none.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        nvcc = [
            "-O3",
            "--use_fast_math",
            "-std=c++20",
            "-DCUDA_HAS_FP16=1",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
        return [
            CUDAExtension(
                "detr_variants._C",
                sources + cuda_sources,
                include_dirs=[os.path.abspath(CSRC)],
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx + openmp, "nvcc": nvcc},
                extra_link_args=openmp,
            )
        ]
    return [
        CppExtension(
            "detr_variants._C",
            sources,
            include_dirs=[os.path.abspath(CSRC)],
            extra_compile_args={"cxx": cxx + openmp},
            extra_link_args=openmp,
        )
    ]


setup(
    ext_modules=native_extensions(),
    cmdclass={
        "build_ext": BuildExtension.with_options(use_ninja=True),
        "build_py": build_py_with_configs,
    },
)
