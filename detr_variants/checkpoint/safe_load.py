"""Reading checkpoint files without letting them run code, and verifying downloads.

A pickle can call any importable function while it is read, so a ``.pth`` or ``.pkl`` from
elsewhere is only unpickled with an allow-list of the types that released checkpoints hold:

- ``.pth`` (and ``.bin``, ...): ``torch.load(weights_only=True)`` (tensors, builtin containers
  and numbers) plus ``argparse.Namespace`` (the ``args`` entry of the DETR-family ``main.py``
  checkpoints) and numpy arrays, dtypes and scalars;
- ``.pkl`` (detectron2 / Detectron model-zoo format): a restricted unpickler that accepts numpy
  arrays, dtypes and scalars, builtin containers and numbers only.

A file that needs anything else raises :class:`UnsafeCheckpointError` naming the type. Trusted
files load unrestricted with ``trust=True`` (``train.trust_checkpoint=True``,
``--trust-checkpoint``). A checkpoint named by URL is verified against its SHA-256 before it is
unpickled: the ``?sha256=<hex>`` query of the URL, or the hash prefix that torch.hub file names
carry by convention (``detr-r50-e632da11.pth``). A URL with neither (detectron2's ImageNet
backbones publish none) is downloaded and loaded through the same allow-list, with a warning that
gives its SHA-256 to pin; a mismatch is always an error.
"""

import _compat_pickle
import argparse
import hashlib
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Optional, Tuple
from urllib.parse import parse_qsl, urlencode, urlparse

import numpy as np
import torch
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

TRUST_HINT = (
    "Only if you trust the file's source, load it unrestricted: train.trust_checkpoint=True "
    "(training, --eval-only, DefaultPredictor), --trust-checkpoint (tools/convert_checkpoint.py) "
    "or trust=True (Checkpointer, model_zoo.get, load_checkpoint_file)."
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file needs a type outside the allow-list to be unpickled."""


class CorruptCheckpointError(OSError):
    """The file is empty, truncated or otherwise unreadable."""


class ChecksumError(ValueError):
    """A downloaded checkpoint is not the published file."""


# numpy >= 2 pickles name numpy._core.multiarray; files written with numpy 1 name numpy.core.
_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_multiarray = getattr(np, "_core", None) or np.core
_NUMPY_RECONSTRUCT = _multiarray.multiarray._reconstruct
_NUMPY_SCALAR = _multiarray.multiarray.scalar

_NUMERIC_DTYPES = "?bBhHiIlLqQefdFD"  # bool, (unsigned) integers, floats, complex
_TORCH_SAFE_GLOBALS = (
    [argparse.Namespace, np.ndarray, np.dtype]
    + [type(np.dtype(code)) for code in _NUMERIC_DTYPES]  # numpy.dtypes.Float32DType, ...
    + [
        (fn, f"{module}.{fn.__name__}")
        for module in _MULTIARRAY_MODULES
        for fn in (_NUMPY_RECONSTRUCT, _NUMPY_SCALAR)
    ]
)

_PICKLE_ALLOWED = {
    *((module, name) for module in _MULTIARRAY_MODULES for name in ("_reconstruct", "scalar")),
    # protocol 5 stores arrays as numeric._frombuffer(bytes, dtype, shape, order)
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    *(("builtins", name) for name in ("set", "frozenset", "complex", "bytearray")),
}


# what reading a damaged pickle or zip archive raises
_DAMAGED = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, ValueError)
_DAMAGED += (KeyError, IndexError, TypeError)


def _corrupt(path: str, error: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is truncated or corrupt ({type(error).__name__}: {error})"
    )


def _refusal(path: str, what: str) -> str:
    return (
        f"Refusing to load {path}: unpickling it needs {what}, which checkpoints do not hold "
        f"(a pickle can run code while it is read). {TRUST_HINT}"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only the globals of ``_PICKLE_ALLOWED``."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # Python 2 pickles (Detectron model zoo)
        self.path = path

    def find_class(self, module: str, name: str):
        # Python 2 names (as the default find_class maps them for protocols < 3)
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        )
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafeCheckpointError(_refusal(self.path, f"{module}.{name}"))
        return super().find_class(module, name)


def load_pickle(path: str, *, trust: bool = False) -> Any:
    """A local ``.pkl`` file through the restricted unpickler (plain ``pickle`` if trusted)."""
    with open(path, "rb") as f:
        try:
            return (
                pickle.load(f, encoding="latin1") if trust else _RestrictedUnpickler(f, path).load()
            )
        except UnsafeCheckpointError:
            raise
        except _DAMAGED as e:
            raise _corrupt(path, e) from e


def load_torch(path: str, *, trust: bool = False) -> Any:
    """A local ``torch.save`` file with ``weights_only=True`` and the allow-list above (all
    types if trusted), on CPU."""
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_TORCH_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = re.search(
            r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", str(e), re.S
        )
        if detail is None:
            raise _corrupt(path, e) from e
        name = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", detail.group(1))
        what = next(filter(None, name.groups())) if name else detail.group(1).rstrip(".")
        raise UnsafeCheckpointError(_refusal(path, what)) from None
    except _DAMAGED as e:
        raise _corrupt(path, e) from e


def is_url(path: str) -> bool:
    return "://" in path


def split_url(url: str) -> Tuple[str, Optional[str], str]:
    """``url`` → (the URL without query, its expected SHA-256 or hex prefix or None, the query
    without ``sha256``). The hash is the ``sha256`` query, else the torch.hub file-name suffix
    ``-<8 or more hex digits>.``."""
    parsed = urlparse(url)
    query = parse_qsl(parsed.query)
    hashes = [v.lower() for k, v in query if k == "sha256"]
    rest = urlencode([(k, v) for k, v in query if k != "sha256"])
    base = parsed._replace(query="").geturl()
    if not hashes:
        hub = re.search(r"-([0-9a-f]{8,64})\.[^/.]+$", parsed.path)
        hashes = [hub.group(1)] if hub else []
    if hashes and not re.fullmatch(r"[0-9a-f]{8,64}", hashes[0]):
        raise ValueError(f"sha256={hashes[0]!r} in {url} is not 8 to 64 hex digits")
    return base, (hashes[0] if hashes else None), rest


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_local_copy(url: str, expected: Optional[str]) -> str:
    """Downloads ``url`` (to detectron2's ``PathManager`` cache) and checks that its SHA-256
    starts with ``expected`` before anything unpickles it. Without ``expected`` nothing can tell a
    tampered or truncated download from the published file: it is loaded with a warning giving
    the hash to pin (the allow-list still keeps it from running code)."""
    local = PathManager.get_local_path(url)
    actual = sha256_of(local)
    if expected is None:
        logger.warning(
            "No SHA-256 is known for %s, so the download is unverified (SHA-256 %s). To pin it, "
            "append '?sha256=%s' to the URL.",
            url,
            actual,
            actual,
        )
    elif not actual.startswith(expected):
        raise ChecksumError(
            f"{url} failed its hash check: SHA-256 {actual}, expected {expected}"
            f"{'...' if len(expected) < 64 else ''}. The download ({local}) is corrupt or not "
            "the published file; delete it and retry."
        )
    return local


def local_checkpoint(path: str, *, trust: bool = False) -> str:
    """A local path for ``path``: itself, or the verified download of a URL (query dropped)."""
    if not is_url(path):
        return path
    base, expected, _ = split_url(path)
    return verified_local_copy(base, expected)


def load_checkpoint_file(path: str, *, trust: bool = False) -> Any:
    """The content of a checkpoint file or URL (``.pkl``: restricted unpickler; otherwise
    ``torch.load`` with the allow-list), after verifying a download."""
    local = local_checkpoint(path, trust=trust)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return (
        load_pickle(local, trust=trust)
        if local.endswith(".pkl")
        else load_torch(local, trust=trust)
    )
