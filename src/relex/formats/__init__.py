"""Checkpoint formats relex reads, one module each, behind the Reader interface (base.py).

Every format module provides NAME, `detect(path) -> bool` (does this directory hold a checkpoint
in my format? cheap: file names and headers only) and `reader(path) -> Reader`. Discovery asks
them in the order below, so a directory with HF weights is read as HF even when the trainer's
native shards sit beside them, and a Megatron torch_dist checkpoint (DCP plus metadata.json) as
Megatron rather than plain DCP.
"""

from __future__ import annotations

from pathlib import Path

from relex.errors import RelexError
from relex.formats import hf, lora, nemo
from relex.formats import dcp, deepspeed, megatron, verl_fsdp
from relex.formats.base import CODES, DTYPES, FLOAT_CODES, Reader, TensorMeta

FORMATS = (hf, lora, nemo, verl_fsdp, megatron, dcp, deepspeed)

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


def open_reader(path: str | Path, base: str | Path | None = None,
                hf_config: str | Path | None = None) -> Reader:
    """A Reader for the checkpoint at `path`, whatever format it is in.

    base: the run's base model, for formats that store only a difference to it (LoRA) or
    take its config (Megatron); hf_config: the HF config.json of formats that keep none."""
    path = Path(path)
    if not path.is_dir():
        raise RelexError(f"{path}: no such checkpoint directory")
    # Nothing recognised: the HF reader's errors say best what is missing (an index, .bin...).
    fmt = detect(path) or hf
    if getattr(fmt, "NEEDS_HF_CONFIG", False):
        return fmt.reader(path, base=base, hf_config=hf_config)
    if getattr(fmt, "NEEDS_BASE", False):
        return fmt.reader(path, base=base)
    return fmt.reader(path)
