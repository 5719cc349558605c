"""NeMo-RL DTensor v2 checkpoints: `step_N/policy/weights/model/`, one safetensors file per rank.

NeMo-RL's default (DTensor policy v2, via NeMo Automodel) saves with torch DCP's
HuggingFaceStorageWriter(save_distributed=True): rank R writes
`shard-{R+1:05d}-model-00001-of-00001.safetensors`, a valid safetensors file holding that rank's
chunk of every tensor under its HF name; `__metadata__["DCP_SHARDING_INFO"]` is a JSON map
{name: {"saved_offsets": [o_0, o_1, ...]}} giving each chunk's place in the global tensor, whose
shape is max(offset + size) per dim. There is no `.metadata` file; config.json sits in
`.hf_metadata/`; a tied lm_head is not saved. FSDP2 shards dim 0 (`Shard(0)`), so a tensor is a
stack of row ranges (chunked.ChunkedTensor, read through MappedFiles like every format).
Chunks split along another dim (tensor parallel) are refused.

Nothing records the world size or the global shapes (the file names count ranks, the `-of-`
number counts output files), so a missing *last* rank file cannot be seen: every tensor is then
short in dim 0. `shape_hint` says so when such a tensor's shape disagrees with the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from relex.errors import RelexError
from relex.formats.base import DTYPES
from relex.formats.chunked import (
    Chunk,
    ChunkedReader,
    ChunkedTensor,
)
from relex.formats.hf import TensorInfo, read_header
from relex.formats.unpickler import Storage, StoredTensor

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


def _stored(info: TensorInfo) -> StoredTensor:
    """A safetensors entry as a contiguous StoredTensor of its file."""
    stride, step = [], 1
    for size in reversed(info.shape):
        stride.insert(0, step)
        step *= size
    storage = Storage(info.name, DTYPES[info.dtype], info.numel, info.file, info.offset)
    return StoredTensor(storage, 0, tuple(info.shape), tuple(stride))


class NemoReader(ChunkedReader):
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
        chunks: dict[str, list[tuple[int, TensorInfo]]] = {}
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
                chunks.setdefault(name, []).append((offsets[0], entry))
            extra = set(info) - set(entries)
            if extra:
                raise RelexError(f"{file}: {SHARDING_KEY} names '{min(extra)}', which the "
                                 f"file does not hold; {_FIX}")
        for name, parts in chunks.items():
            parts.sort(key=lambda c: c[0])
            pos = 0
            for row, entry in parts:
                if row != pos:
                    what = "overlap" if row < pos else f"rows {pos}-{row - 1} are missing"
                    raise RelexError(f"{self.path}: tensor '{name}': shard chunks {what} (is a "
                                     f"shard file missing or damaged?); {_FIX}")
                pos += entry.shape[0]
            code, tail = dims[name]
            shape = (pos, *tail)  # inferred: see shape_hint
            self._add(ChunkedTensor(name, code, shape,
                                    [Chunk((row, *[0] * len(tail)), _stored(entry))
                                     for row, entry in parts], self._maps, str(self.path)))
        meta_dir = self.path / METADATA_DIR
        # config + tokenizer for the output: .hf_metadata when it has both, else the base's
        has_tok = any(meta_dir.glob("tokenizer*")) or (meta_dir / "tokenizer").is_dir()
        self.meta_dir = meta_dir if (meta_dir / "config.json").is_file() and has_tok else None

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

    def shape_hint(self, name: str) -> str:
        """Why `name` may have the wrong shape (used when it differs from the base's)."""
        last = max(int(SHARD.fullmatch(f.name).group(1)) for f in self._files)
        return (f"NeMo-RL records no global shape, so its dim 0 was inferred from the shard "
                f"files present: if the base is right, the last rank's file (shard-"
                f"{last + 1:05d}-model-...) may be missing; {_FIX}")

    def files(self) -> list[Path]:
        return list(self._files)


def reader(path: Path) -> NemoReader:
    return NemoReader(path)
