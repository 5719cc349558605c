"""Hugging Face model directories: safetensors weights, single file or sharded with an index.

Opening a checkpoint reads only the safetensors headers (a few KB); every field is checked before
use, at least as strictly as the safetensors library (offsets contiguous from 0, covering the
data exactly). Tensor data comes through base.MappedFiles (zero-copy views, released as the pass
goes). The header format is tiny: an 8-byte length, then JSON.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import DTYPES, MappedFiles, Reader, TensorMeta
from relex.formats.chunked import Chunk, Place
from relex.formats.unpickler import Storage, StoredTensor

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo(TensorMeta):
    """A tensor of a safetensors file: its metadata plus the file and absolute data offset."""

    file: Path = Path()
    offset: int = 0


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header: ({name: TensorInfo}, __metadata__).

    As strict as safetensors' own loader: a JSON object of entries with a known dtype, a shape
    and data_offsets whose byte count matches, laid end to end from 0 without gap or overlap and
    covering the data section exactly. A file relex accepts is one safetensors accepts."""
    size = file.stat().st_size
    fix = "re-copy or re-save this checkpoint"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RelexError(f"{file}: not a safetensors file (shorter than 8 bytes); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise RelexError(f"{file}: corrupt or truncated safetensors header "
                             f"(declares {n} header bytes, file has {size}); {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RelexError(f"{file}: corrupt safetensors header ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise RelexError(f"{file}: corrupt safetensors header (not a JSON object); {fix}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RelexError(f"{file}: corrupt safetensors __metadata__ (must map strings to "
                         f"strings); {fix}")
    data_start = 8 + n
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            code, shape, offsets = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            begin, end = offsets
            ok = (all(type(s) is int and s >= 0 for s in shape)
                  and type(begin) is int and type(end) is int and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise RelexError(f"{file}: corrupt safetensors entry for tensor '{name}'; {fix}")
        if code not in DTYPES:
            raise RelexError(f"{file}: tensor '{name}' has dtype {code}, which this torch build "
                             f"cannot represent; upgrade torch or convert the checkpoint")
        info = TensorInfo(name, code, shape, file, data_start + begin)
        if end - begin != info.nbytes:
            raise RelexError(f"{file}: tensor '{name}' declares {end - begin} bytes for shape "
                             f"{list(shape)} {code}; the file is corrupt; {fix}")
        tensors[name] = info
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise RelexError(f"{file}: corrupt safetensors header: tensor '{name}' at bytes "
                             f"{begin}-{end} {what}; {fix}")
        pos = end
    if data_start + pos != size:
        if data_start + pos > size:
            raise RelexError(f"{file}: truncated: tensor data ends at byte {data_start + pos} "
                             f"but the file has {size} bytes; {fix}")
        raise RelexError(f"{file}: corrupt: {size - data_start - pos} bytes after the last "
                         f"tensor that the header does not describe; {fix}")
    return tensors, metadata


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (index first, then single file).

    Refuses pickled ``.bin`` weights and index entries that point outside the directory.
    """
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) for name in names):
                raise TypeError("shard names must be strings")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise RelexError(f"{index}: not a valid safetensors index ({e!r}); re-save the "
                             f"checkpoint") from None
        root = path.resolve()
        files = []
        for name in names:
            shard = (path / name).resolve()
            if not shard.is_relative_to(root):
                raise RelexError(f"{index}: shard path '{name}' escapes the checkpoint "
                                 f"directory; refusing to read it (fix the index)")
            if not shard.is_file():
                raise RelexError(f"{index}: shard '{name}' is missing; re-copy the checkpoint")
            files.append(path / name)
        return files
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    if any(path.glob("pytorch_model*.bin")) or (path / "pytorch_model.bin.index.json").exists():
        raise RelexError(
            f"{path}: holds pickled PyTorch weights (.bin), which relex does not unpickle; "
            f"convert once to safetensors: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained("
            f"'{path}-safetensors')\"")
    if any(path.glob("*.safetensors")):
        raise RelexError(f"{path}: has *.safetensors shards but no {SAFE_INDEX} or "
                         f"{SAFE_WEIGHTS}; restore the index file")
    raise RelexError(f"{path}: no {SAFE_WEIGHTS} or {SAFE_INDEX} found; point relex at a "
                     f"Hugging Face model directory")


def has_weights(path: Path) -> bool:
    """True when ``path`` looks like a model directory with safetensors or .bin weights."""
    return path.is_dir() and ((path / SAFE_INDEX).is_file() or (path / SAFE_WEIGHTS).is_file()
                              or any(path.glob("pytorch_model*.bin")))


class HFReader(Reader):
    """The weights of one HF model directory: headers in memory, data mapped on demand.

    >>> ckpt = HFReader("out/checkpoint-50")
    >>> rows = ckpt.read("model.embed_tokens.weight", 0, 4096).float()  # from disk / page cache
    >>> ckpt.release("model.embed_tokens.weight", 0, 4096)
    """

    format = "hf"

    def __init__(self, path: str | os.PathLike):
        super().__init__(Path(path))
        if not self.path.is_dir():
            raise RelexError(f"{self.path}: no such checkpoint directory")
        self._files = weight_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files:
            tensors, _ = read_header(file)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise RelexError(f"{self.path}: tensor '{name}' appears in two shards "
                                     f"({self.tensors[name].file.name}, {file.name}); fix the "
                                     f"checkpoint")
                self.tensors[name] = info
        self._maps = MappedFiles()

    def files(self) -> list[Path]:
        return list(self._files)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Zero-copy, read-only view of elements [start, stop) (never write to it)."""
        info = self.tensors[name]
        size = info.itemsize
        return self._maps.view(info.file, info.offset + start * size, (stop - start) * size,
                               DTYPES[info.dtype])

    def release(self, name: str, start: int, stop: int) -> None:
        info = self.tensors[name]
        size = info.itemsize
        self._maps.release(info.file, info.offset + start * size, (stop - start) * size)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        info = self.tensors[name]
        size = info.itemsize
        self._maps.prefetch(info.file, info.offset + start * size, (stop - start) * size)

    def places(self, name: str) -> list[Place]:
        info = self.tensors[name]
        stride = tuple(torch.empty(info.shape, device="meta").stride())
        stored = StoredTensor(Storage(name, DTYPES[info.dtype], info.numel, info.file,
                                      info.offset), 0, info.shape, stride)
        return [Place(info.shape, info.dtype, (Chunk((0,) * len(info.shape), stored),))]

    def close(self) -> None:
        self._maps.close()


NAME = "hf"


def detect(path: Path) -> bool:
    return has_weights(path)


def reader(path: Path) -> HFReader:
    return HFReader(path)
