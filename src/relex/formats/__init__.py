"""Checkpoint formats relex reads, one module each, behind the Reader interface (base.py).

Every format module provides NAME, `detect(path) -> bool` (does this directory hold a checkpoint
in my format? cheap: file names and headers only) and `reader(path) -> Reader`. Discovery asks
them in the order below, so a directory with HF weights is read as HF even when the trainer's
native shards sit beside them.
"""

from __future__ import annotations

from pathlib import Path

from relex.errors import RelexError
from relex.formats import hf
from relex.formats.base import CODES, DTYPES, FLOAT_CODES, Reader, TensorMeta

FORMATS = (hf,)

__all__ = ["CODES", "DTYPES", "FLOAT_CODES", "FORMATS", "Reader", "TensorMeta", "detect",
           "open_reader"]


def detect(path: str | Path):
    """The format module that reads `path`, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    return None


def open_reader(path: str | Path) -> Reader:
    """A Reader for the checkpoint at `path`, whatever format it is in."""
    path = Path(path)
    if not path.is_dir():
        raise RelexError(f"{path}: no such checkpoint directory")
    # Nothing recognised: the HF reader's errors say best what is missing (an index, .bin...).
    return (detect(path) or hf).reader(path)
