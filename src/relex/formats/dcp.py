"""torch.distributed.checkpoint (DCP) directories: `.metadata` + `__R_0.distcp`, read in place.

Written by accelerate / transformers Trainer with FSDP SHARDED_STATE_DICT
(`checkpoint-N/pytorch_model_fsdp_0/`, the state dict nested as {"model": ...}) and by NeMo-RL's
DTensor v1 policy (`step_N/policy/weights/`, {"model": ModelState}). `.metadata` lists every
tensor's global size and chunks (N-d boxes: offsets and sizes per dim) and where each chunk is
stored: `(relative_path, offset, length)` in a .distcp file. torch 2.13 stores each chunk as a
complete torch.save blob there (or raw bytes with the safetensors serialization format, where
length is exactly the chunk's bytes); we parse it with torchzip.load at its offset, so tensor
bytes are read through the shared mapped-file path and never torch.load'ed.

`.metadata` is a pickle. It is loaded with the restricted unpickler (unpickler.py), which here
also allows (as inert records, nothing called): torch.distributed.checkpoint.metadata's Metadata,
TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties,
MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING; torch.distributed.checkpoint.filesystem's
_StorageInfo; torch.distributed.checkpoint.planner's SavePlan, WriteItem, WriteItemType,
TensorWriteData (Megatron's torch_dist adds the ranks' save plans to Metadata as
`all_local_plans`); and pathlib's PosixPath / WindowsPath (StorageMeta.checkpoint_id).

Names: the nested state dict is flattened to `model.<name>`; see hf_names. Config: accelerate
writes config.json beside the DCP dir (checkpoint-N/); NeMo-RL keeps none with the weights
(relex then uses the base's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import CODES, numel
from relex.formats.chunked import (
    Chunk,
    ChunkedReader,
    ChunkedTensor,
)
from relex.formats.torchzip import load
from relex.formats.unpickler import (
    Record,
    Storage,
    StoredTensor,
    record_class,
    records_of,
    restricted_loads,
    short,
)

NAME = "dcp"
METADATA = ".metadata"
MAX_METADATA = 512 << 20

_MD = "torch.distributed.checkpoint.metadata"
ALLOWED = {(_MD, n): record_class(n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = record_class("_StorageInfo")
for _n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
    ALLOWED[("torch.distributed.checkpoint.planner", _n)] = record_class(_n)
for _p in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
    ALLOWED[("pathlib", _p)] = record_class(_p)

HINT = "accelerate merge-weights {path} {path}-hf"


def _field(rec, name, index=None):
    """A dataclass field of a record: from its pickled state dict, or its constructor args."""
    if not isinstance(rec, Record):
        return None
    value = rec.get(name)
    if value is None and index is not None and isinstance(rec.state, tuple) and len(
            rec.state) > index and not isinstance(rec.state[0], dict):
        value = rec.state[index]
    return value


def _dtype(props) -> torch.dtype | None:
    value = _field(props, "dtype", 0)
    return value if isinstance(value, torch.dtype) else None


def _ints(x) -> tuple[int, ...] | None:
    try:
        out = tuple(x)
    except TypeError:
        return None
    return out if all(type(i) is int and i >= 0 for i in out) else None


def hf_names(fqns: list[str], planner_data) -> dict[str, str]:
    """{flattened DCP key: HF tensor name}. Like `accelerate merge-weights`, which unnests a
    state dict with a single top-level key ({"model": ...}), using planner_data's paths
    (("model", "<name>") -> "<name>"); without them, the `model.` prefix is stripped."""
    paths = {f: planner_data.get(f) for f in fqns} if isinstance(planner_data, dict) else {}
    ok = [p for p in paths.values() if isinstance(p, tuple) and len(p) >= 2
          and all(isinstance(x, str) for x in p)]
    if fqns and len(ok) == len(fqns) and len({p[0] for p in ok}) == 1:
        return {f: ".".join(paths[f][1:]) for f in fqns}
    return {f: f.removeprefix("model.") for f in fqns}


class DCPReader(ChunkedReader):
    """A torch DCP directory, every chunk read in place from its .distcp file.

    >>> r = DCPReader("out/checkpoint-50/pytorch_model_fsdp_0")
    >>> r.read("model.embed_tokens.weight", 0, 4096)
    """

    format = NAME
    #: the converter an error suggests when relex cannot read a tensor ({path}: this directory)
    hint = HINT

    def __init__(self, path):
        super().__init__(Path(path))
        md_file = self.path / METADATA
        where = str(md_file)
        if not md_file.is_file():  # never opened unless a regular file (a FIFO would block)
            what = "is not a regular file" if md_file.exists() or md_file.is_symlink() else \
                "is missing"
            raise RelexError(f"{md_file}: {what}, so this torch DCP checkpoint cannot be read "
                             f"(its tensors are listed there); re-copy the checkpoint")
        if md_file.stat().st_size > MAX_METADATA:
            raise RelexError(f"{md_file}: too large for DCP metadata; re-copy the checkpoint")
        md = restricted_loads(md_file.read_bytes(), where, ALLOWED)
        with records_of(where):
            self._read_metadata(md, md_file, where)

    def _read_metadata(self, md, md_file: Path, where: str) -> None:
        if getattr(md, "kind", None) != "Metadata":
            raise RelexError(f"{md_file}: not a torch DCP Metadata pickle; re-copy it")
        tensors_md = _field(md, "state_dict_metadata")
        storage = _field(md, "storage_data")
        planner = _field(md, "planner_data") or {}
        if not isinstance(tensors_md, dict) or not isinstance(storage, dict):
            raise RelexError(f"{md_file}: DCP metadata without tensor or storage records; "
                             f"re-copy the checkpoint")
        self.meta_dir = self._meta_dir()
        self._files: set[Path] = set()
        places = {}
        for key, info in storage.items():
            fqn, offs = _field(key, "fqn"), _ints(_field(key, "offset") or ())
            places[(fqn, offs)] = info
        root = self.path.resolve()
        #: every key stored, tensors and objects (Megatron's optimizer state: megatron.py)
        self.stored_keys = list(tensors_md)
        # bytes entries (extra state) hold no weights
        tensors_md = {k: v for k, v in tensors_md.items()
                      if getattr(v, "kind", None) == "TensorStorageMetadata"}
        names = self._names(list(tensors_md), planner)
        for fqn, tmd in tensors_md.items():
            if fqn not in names:
                continue
            dtype, shape = _dtype(_field(tmd, "properties")), _ints(_field(tmd, "size") or ())
            chunks_md = _field(tmd, "chunks")
            if dtype not in CODES or shape is None or not isinstance(chunks_md, list):
                raise RelexError(f"{md_file}: corrupt record for tensor '{fqn}' (dtype {dtype},"
                                 f" size {shape}); re-copy the checkpoint")
            name = names[fqn]
            if name in self._chunked:
                raise RelexError(f"{md_file}: two entries map to tensor '{name}'; convert "
                                 f"with: {self.hint.format(path=self.path)}")
            chunks = []
            for cmd in chunks_md:
                offs, sizes = _ints(_field(cmd, "offsets") or ()), _ints(_field(cmd, "sizes") or ())
                info = places.get((fqn, offs))
                if offs is None or sizes is None or info is None:
                    raise RelexError(f"{md_file}: tensor '{fqn}' has a chunk at {offs} with no "
                                     f"storage record; the checkpoint is incomplete")
                chunks.append(Chunk(offs, self._chunk(info, fqn, dtype, sizes, root, md_file)))
            self._add(ChunkedTensor(name, CODES[dtype], shape, chunks, self._maps, where))
        if not self._chunked:
            raise RelexError(f"{md_file}: no tensors in this DCP checkpoint (an optimizer "
                             f"checkpoint?); point relex at the model's DCP directory")

    def _names(self, fqns: list[str], planner_data) -> dict[str, str]:
        """{DCP key: the name relex keeps its tensor under}; keys left out are not read."""
        return hf_names(fqns, planner_data)

    def _meta_dir(self) -> Path | None:
        for d in (self.path / ".hf_metadata", self.path.parent):
            if (d / "config.json").is_file():
                return d
        return None

    def _chunk(self, info, fqn, dtype, sizes, root: Path, md_file: Path) -> StoredTensor:
        rel, offset, length = (_field(info, "relative_path"), _field(info, "offset"),
                               _field(info, "length"))
        if not isinstance(rel, str) or type(offset) is not int or type(length) is not int:
            raise RelexError(f"{md_file}: corrupt storage record for '{fqn}'; re-copy it")
        file = (self.path / rel)
        if not file.resolve().is_relative_to(root) or Path(rel).is_absolute():
            raise RelexError(f"{md_file}: storage path '{rel}' of '{fqn}' escapes the checkpoint "
                             f"directory; refusing to read it")
        if not file.is_file():
            raise RelexError(f"{file}: missing or not a regular file (tensor '{fqn}' is stored "
                             f"there); re-copy the checkpoint")
        if _field(info, "transform_descriptors"):
            raise RelexError(f"{md_file}: tensor '{fqn}' is stored with transforms "
                             f"{short(_field(info, 'transform_descriptors'))} (compression?), "
                             f"which relex does not read; convert with: "
                             f"{HINT.format(path=self.path)}")
        self._files.add(file)
        n = numel(sizes)
        where = f"{file} (bytes {offset}-{offset + length}, tensor '{fqn}')"
        if length == n * dtype.itemsize:  # raw bytes (safetensors serialization format)
            size = file.stat().st_size
            if offset < 0 or offset + length > size:
                raise RelexError(f"{where}: truncated ({size} bytes); re-copy the checkpoint")
            stride = tuple(int(torch.empty(sizes, device="meta").stride()[i])
                           for i in range(len(sizes)))
            return StoredTensor(Storage("raw", dtype, n, file, offset), 0, sizes, stride)
        t = load(file, offset, length, where)
        if not isinstance(t, StoredTensor) or t.shape != sizes or t.storage.dtype != dtype:
            raise RelexError(f"{where}: holds {getattr(t, 'shape', type(t).__name__)} "
                             f"{getattr(t, 'dtype', '')}, but .metadata says {list(sizes)} "
                             f"{CODES.get(dtype)}; the checkpoint is corrupt")
        return t

    def files(self) -> list[Path]:
        return sorted(self._files)


def detect(path: Path) -> bool:
    """Any sign of DCP: then a missing or unreadable .metadata is the reader's error, not a
    checkpoint discovery would skip without a word."""
    md = path / METADATA
    return md.exists() or md.is_symlink() or any(path.glob("*.distcp"))


def reader(path: Path) -> DCPReader:
    return DCPReader(path)
