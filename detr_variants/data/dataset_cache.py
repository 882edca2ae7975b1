"""A generated dataset directory, built once under a file lock and swapped into place.

The directory holds a ``VERSION`` file with the fingerprint of whatever made it, written last:
a directory with the expected fingerprint is complete. Building happens in a temporary sibling
that is renamed into place, so concurrent processes never see a partial dataset.
"""

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Optional

__all__ = ["build_once", "read_fingerprint"]


def read_fingerprint(out_dir: str) -> Optional[str]:
    """The fingerprint a finished ``out_dir`` was built with, or None."""
    try:
        with open(os.path.join(out_dir, "VERSION")) as f:
            return f.read().strip()
    except OSError:
        return None


@contextmanager
def _file_lock(path: str):
    """Exclusive advisory lock across processes (released on exit or crash)."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _swap_into_place(tmp_dir: str, out_dir: str) -> None:
    """Replaces ``out_dir`` (if any) by the finished ``tmp_dir`` with renames."""
    stale = None
    if os.path.exists(out_dir):
        stale = tempfile.mkdtemp(
            prefix=os.path.basename(out_dir) + ".stale-", dir=os.path.dirname(out_dir)
        )
        stale = os.path.join(stale, "old")
        os.rename(out_dir, stale)
    os.rename(tmp_dir, out_dir)
    if stale is not None:
        shutil.rmtree(os.path.dirname(stale), ignore_errors=True)


def build_once(out_dir: str, fingerprint: str, build: Callable[[str], None]) -> bool:
    """Makes sure ``out_dir`` holds what ``build`` writes for ``fingerprint``.

    Safe to call from several processes at once: one builds under ``<out_dir>.lock`` into a
    temporary sibling directory, the others wait and reuse the result. A directory with another
    fingerprint is replaced.

    Args:
        out_dir: absolute path of the dataset directory.
        fingerprint: identifies everything that changes the built bytes.
        build: writes the dataset into the (empty, existing) directory it is given.

    Returns:
        Whether this call built the directory.
    """
    if read_fingerprint(out_dir) == fingerprint:
        return False
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(out_dir + ".lock"):
        if read_fingerprint(out_dir) == fingerprint:
            return False  # another process finished it while we waited
        tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
        try:
            build(tmp_dir)
            with open(os.path.join(tmp_dir, "VERSION"), "w") as f:
                f.write(fingerprint + "\n")
            _swap_into_place(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return True
