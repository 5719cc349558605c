"""NeMo-RL DTensor v2 checkpoints: `step_N/policy/weights/model/`, one safetensors file per rank.

NeMo-RL's default (DTensor policy v2, via NeMo Automodel) saves with torch DCP's
HuggingFaceStorageWriter(save_distributed=True): rank R writes
`shard-{R+1:05d}-model-00001-of-00001.safetensors`, a valid safetensors file holding that rank's
chunk of every tensor under its HF name; `__metadata__["DCP_SHARDING_INFO"]` is a JSON map
{name: {"saved_offsets": [o_0, o_1, ...]}} giving each chunk's place in the global tensor, whose
shape is max(offset + size) per dim. There is no `.metadata` file; config.json sits in
`.hf_metadata/`; a tied lm_head is not saved. FSDP2 shards dim 0 (`Shard(0)`), so a tensor is a
stack of row ranges: an element range maps to byte ranges of one or two files, read through
MappedFiles like an HF directory. Chunks split along another dim (tensor parallel) are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import DTYPES, MappedFiles, Reader, TensorMeta, numel
from relex.formats.hf import TensorInfo, read_header

NAME = "nemo"
SHARD = re.compile(r"shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors")
SHARDING_KEY = "DCP_SHARDING_INFO"
METADATA_DIR = ".hf_metadata"
_FIX = "re-copy the checkpoint, or consolidate it (NeMo-RL checkpoint.save_consolidated: true)"


def shard_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("shard-*-model-*-of-*.safetensors")
                  if SHARD.fullmatch(p.name))


def detect(path: Path) -> bool:
    return bool(shard_files(path))


@dataclass(frozen=True)
class Chunk:
    """Rows [row, row + info.shape[0]) of a tensor, stored as `info` in one shard file."""

    row: int
    info: TensorInfo


class NemoReader(Reader):
    """A NeMo-RL DTensor v2 checkpoint: per-rank safetensors shards assembled by row ranges.

    >>> ckpt = NemoReader("results/grpo/step_50/policy/weights/model")
    >>> rows = ckpt.read("model.embed_tokens.weight", 0, 4096)
    """

    format = "nemo"

    def __init__(self, path: str | Path):
        super().__init__(Path(path))
        self._files = shard_files(self.path)
        if not self._files:
            raise RelexError(f"{self.path}: no shard-*-model-*-of-*.safetensors files")
        self._check_ranks()
        chunks: dict[str, list[Chunk]] = {}
        dims: dict[str, tuple[str, int]] = {}
        for file in self._files:
            entries, meta = read_header(file)
            try:
                info = json.loads(meta[SHARDING_KEY])
                if not isinstance(info, dict):
                    raise TypeError("not an object")
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise RelexError(f"{file}: no valid __metadata__['{SHARDING_KEY}'] ({e!r}); not "
                                 f"a DCP-sharded safetensors file; {_FIX}") from None
            for name, entry in entries.items():
                offsets = self._offsets(file, name, entry, info)
                if entry.numel == 0:  # ranks past the end of a short dim 0 hold empty chunks
                    continue
                if any(offsets[1:]):
                    raise RelexError(f"{file}: tensor '{name}' is split along a dim other than "
                                     f"0 (offsets {offsets}: tensor parallel); relex reads "
                                     f"FSDP dim-0 shards only: {_FIX}")
                if dims.setdefault(name, (entry.dtype, entry.shape[1:])) != \
                        (entry.dtype, entry.shape[1:]):
                    raise RelexError(f"{file}: chunk of '{name}' is {entry.dtype} "
                                     f"{list(entry.shape)}, other shards disagree; {_FIX}")
                chunks.setdefault(name, []).append(Chunk(offsets[0], entry))
            extra = set(info) - set(entries)
            if extra:
                raise RelexError(f"{file}: {SHARDING_KEY} names '{min(extra)}', which the "
                                 f"file does not hold; {_FIX}")
        self._chunks: dict[str, list[Chunk]] = {}
        for name, parts in chunks.items():
            parts.sort(key=lambda c: c.row)
            pos = 0
            for c in parts:
                if c.row != pos:
                    what = "overlap" if c.row < pos else f"rows {pos}-{c.row - 1} are missing"
                    raise RelexError(f"{self.path}: tensor '{name}': shard chunks {what} (is a "
                                     f"shard file missing or damaged?); {_FIX}")
                pos += c.info.shape[0]
            code, tail = dims[name]
            self.tensors[name] = TensorMeta(name, code, (pos, *tail))
            self._chunks[name] = parts
        meta_dir = self.path / METADATA_DIR
        # config + tokenizer for the output: .hf_metadata when it has both, else the base's
        has_tok = any(meta_dir.glob("tokenizer*")) or (meta_dir / "tokenizer").is_dir()
        self.meta_dir = meta_dir if (meta_dir / "config.json").is_file() and has_tok else None
        self._maps = MappedFiles()

    def _check_ranks(self) -> None:
        """Every rank's file present: shard-00001 .. shard-W of each model-i-of-n."""
        groups: dict[tuple[str, str], list[int]] = {}
        for f in self._files:
            rank, i, n = SHARD.fullmatch(f.name).groups()
            groups.setdefault((i, n), []).append(int(rank))
        for (i, n), ranks in groups.items():
            missing = set(range(1, max(ranks) + 1)) - set(ranks)
            if missing:
                raise RelexError(f"{self.path}: shard-{min(missing):05d}-model-{i}-of-{n}"
                                 f".safetensors is missing ({len(ranks)} of {max(ranks)} rank "
                                 f"files); {_FIX}")

    @staticmethod
    def _offsets(file: Path, name: str, entry: TensorInfo, info: dict) -> list[int]:
        try:
            offsets = info[name]["saved_offsets"]
            ok = (isinstance(offsets, list) and len(offsets) == len(entry.shape)
                  and all(type(o) is int and o >= 0 for o in offsets))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise RelexError(f"{file}: tensor '{name}' has no valid saved_offsets in "
                             f"{SHARDING_KEY} (one non-negative int per dim); {_FIX}")
        return offsets

    def _pieces(self, name: str, start: int, stop: int):
        """(chunk, first element, last element) of each chunk overlapping [start, stop)."""
        row = numel(self.tensors[name].shape[1:])
        for c in self._chunks[name]:
            a, b = c.row * row, c.row * row + c.info.numel
            if a < stop and b > start:
                yield c, max(start, a) - a, min(stop, b) - a

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop): a zero-copy view when one chunk holds them, else a copy."""
        views = [self._maps.view(c.info.file, c.info.offset + a * c.info.itemsize,
                                 (b - a) * c.info.itemsize, DTYPES[c.info.dtype])
                 for c, a, b in self._pieces(name, start, stop)]
        return views[0] if len(views) == 1 else torch.cat(views)

    def release(self, name: str, start: int, stop: int) -> None:
        for c, a, b in self._pieces(name, start, stop):
            size = c.info.itemsize
            self._maps.release(c.info.file, c.info.offset + a * size, (b - a) * size)

    def files(self) -> list[Path]:
        return list(self._files)

    def close(self) -> None:
        self._maps.close()


def reader(path: Path) -> NemoReader:
    return NemoReader(path)
