"""Helpers shared by the dataset modules: generating sample data once, expanding volumes to slices."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

__all__ = ["ensure_generated", "expand_slices"]


def ensure_generated(out_dir: str, marker: str, make: Callable[[str], object]) -> str:
    """Run ``make(tmp_dir)`` and rename ``tmp_dir`` to ``out_dir``, unless ``out_dir/marker`` exists.

    The data appear whole or not at all: an interrupted generation leaves only a hidden temporary
    folder, and a concurrent run that finishes first wins.
    """
    if os.path.isfile(os.path.join(out_dir, marker)):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sample_", dir=parent)
    try:
        make(tmp)
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(out_dir, marker)):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def expand_slices(volumes: list[dict], depth_of: Callable[[str], int]) -> list[dict]:
    """One data dict per axial slice (``slice`` = index along the last axis) of each volume dict."""
    return [{**item, "slice": k} for item in volumes for k in range(depth_of(item["image"]))]
