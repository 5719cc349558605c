"""Bounded unpickling of torch.save pickles, without running any of their code.

A pickle names the functions that rebuild its objects, and torch.load calls them: loading a
checkpoint can run anything. The restricted unpickler here resolves each allowed global to a
stand-in that builds an inert record instead (Record; StoredTensor over a Storage named by key,
placed in its file by torchzip.load), and refuses every other global. The result is then
checked to be small as a tree (check_bounded) before anything walks it: the pickle memo lets a
few hundred bytes name 2**48 leaves.

The unpickler allows exactly these globals (anything else stops with a one-line error naming the
file and the global):
- tensors: torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter,
  torch._tensor._rebuild_from_type_v2, torch._utils._rebuild_wrapper_subclass (DTensor only),
  the typed storage classes (torch.FloatStorage, torch.BFloat16Storage, ...,
  torch.UntypedStorage) as persistent-id tags, torch.Size, torch.device, torch dtypes
  (torch.float32, ...), torch layouts and memory formats, torch.serialization._get_layout;
- containers: collections.OrderedDict;
- DTensor metadata (inert records, only their fields are read): DTensor, DTensorSpec,
  TensorMeta, ShardOrderEntry, Shard, _StridedShard, Replicate, Partial, DeviceMesh,
  _MeshLayout, _FlatLayout from torch.distributed.tensor / torch.distributed._tensor /
  torch.distributed.device_mesh / torch.distributed._mesh_layout (old and new module paths);
- extra: names a caller adds (torch DCP's metadata classes, see dcp.py), or `InertGlobals()`:
  every other global as an inert record, for a file relex only inspects and never rebuilds
  (Megatron's common.pt: argparse.Namespace, Megatron's enums; see megatron.py).
"""

from __future__ import annotations

import io
import pickle
import re
import reprlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import CODES, DTYPES, MappedFiles, numel

#: an unpickled object may count at most this many nodes as a tree (shared objects counted at
#: every place they appear) per byte of pickle, plus MIN_NODES; and nest at most MAX_DEPTH deep.
#: The memo lets a few hundred bytes name 2**48 leaves; state dicts and DCP metadata stay
#: below 1 node per byte (see tests/test_torch_damage.py).
NODES_PER_BYTE = 8
MIN_NODES = 1 << 16
MAX_DEPTH = 100

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40


def short(x) -> str:
    """A bounded repr of an untrusted object for error messages (see NODES_PER_BYTE)."""
    return _REPR.repr(x)


class Record:
    """An inert stand-in for an allowed class: keeps constructor args and pickled state."""

    kind = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def get(self, field, default=None):
        """A field of the pickled state (dict state, or (dict, slots) pairs)."""
        state = self.state
        if (isinstance(state, tuple) and len(state) == 2
                and all(s is None or isinstance(s, dict) for s in state)):
            state = {**(state[1] or {}), **(state[0] or {})}
        return state.get(field, default) if isinstance(state, dict) else default

    def __repr__(self):
        return f"<{self.kind} {short(self.args)} {short(self.state)}>"


def record_class(kind: str) -> type:
    """A Record subclass standing for the pickled class `kind` (the name shows in reprs)."""
    return type(kind, (Record,), {"kind": kind})


@dataclass(frozen=True)
class Storage:
    """A storage of the archive: dtype, element count and absolute byte offset in `file`."""

    key: str
    dtype: torch.dtype
    numel: int
    file: Path
    offset: int = -1
    crc: int | None = None  # the zip member's CRC-32, checked as the pass reads it (Checksums)
    #: absolute offsets in `file` of the 4-byte fields holding that CRC-32 (local header or
    #: data descriptor, central directory): where output/native.py updates it after a write
    crc_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a torch.save archive: a strided view of one storage."""

    storage: Storage
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return CODES[self.storage.dtype]

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def itemsize(self) -> int:
        return self.storage.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        expect = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True

    def span(self, r0: int = 0, r1: int | None = None) -> tuple[int, int]:
        """(absolute byte offset, bytes) of the storage bytes rows [r0, r1) of dim 0 occupy."""
        if self.numel == 0:
            return self.storage.offset, 0
        if not self.shape:
            return self.storage.offset + self.offset * self.itemsize, self.itemsize
        r1 = self.shape[0] if r1 is None else r1
        if r1 <= r0:
            return self.storage.offset, 0
        rest = sum((s - 1) * st for s, st in zip(self.shape[1:], self.stride[1:])) + 1
        first = self.offset + r0 * self.stride[0]
        last = self.offset + (r1 - 1) * self.stride[0] + rest
        return self.storage.offset + first * self.itemsize, (last - first) * self.itemsize

    def view(self, maps: MappedFiles, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows [r0, r1) of this tensor as an N-d read-only view of the mapped file (a copy of
        just those bytes when the storage sits at an offset its dtype cannot be viewed at)."""
        r1 = (self.shape[0] if self.shape else 1) if r1 is None else r1
        shape = ((r1 - r0), *self.shape[1:]) if self.shape else ()
        start, nbytes = self.span(r0, r1)
        dtype = self.storage.dtype
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if start % dtype.itemsize:
            flat = maps.view(self.storage.file, start, nbytes, torch.uint8).clone().view(dtype)
        else:
            flat = maps.view(self.storage.file, start, nbytes, dtype)
        return flat.as_strided(shape, self.stride if self.shape else ())


def _rebuild_tensor_v2(storage, offset, size, stride, *rest):
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return StoredTensor(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, *rest):
    return data  # an nn.Parameter is its data here


def _rebuild_from_type_v2(func, new_type, args, state):
    obj = func(*args)
    if isinstance(obj, Record):
        obj.__setstate__(state)
    return obj


DTensorRecord = record_class("DTensor")


def _rebuild_wrapper_subclass(cls, dtype, size, *rest):
    if cls is not DTensorRecord:
        raise pickle.UnpicklingError("wrapper subclass other than DTensor")
    obj = DTensorRecord(dtype, tuple(size))
    return obj


def _identity(x, *rest):
    return x


def _storage_dtypes() -> dict[str, torch.dtype]:
    out = {"UntypedStorage": torch.uint8}
    for dtype in DTYPES.values():
        name = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool"}.get(dtype)
        if name:
            out[f"{name}Storage"] = dtype
    for name in dir(torch):
        if name.startswith("Float8") and name.endswith("Storage"):
            try:
                out[name] = getattr(torch, name).dtype
            except Exception:  # noqa: BLE001, S110 - a storage class torch only half supports
                pass
    return out


_STORAGES = _storage_dtypes()
#: the torch.<name> values a pickle may name (dtypes, layouts, memory formats), read from the
#: module's own dict once: an untrusted name is looked up here, never with getattr(torch, name),
#: which would run torch's lazy imports (torch._dynamo, torch.onnx, ...) before refusing it
_TORCH_VALUES = {k: v for k, v in vars(torch).items()
                 if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))}
_DT = ("torch.distributed.tensor", "torch.distributed._tensor")
_DT_NAMES = {"DTensorSpec", "TensorMeta", "ShardOrderEntry", "Shard", "_StridedShard",
             "Replicate", "Partial", "DeviceMesh", "_MeshLayout", "_FlatLayout"}


class StorageTag:
    """The class named in a storage's persistent id: only its dtype matters."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


def _allowed(module: str, name: str, extra: dict):
    """The object a pickle's global resolves to, or None when it is not allowed."""
    if (module, name) in extra:
        return extra[module, name]
    if module == "torch._utils":
        return {"_rebuild_tensor_v2": _rebuild_tensor_v2,
                "_rebuild_parameter": _rebuild_parameter,
                "_rebuild_wrapper_subclass": _rebuild_wrapper_subclass}.get(name)
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module == "torch.serialization" and name == "_get_layout":
        return _identity
    if module == "collections" and name == "OrderedDict":
        import collections
        return collections.OrderedDict
    if module in ("torch", "torch.storage") and name in _STORAGES:
        return StorageTag(name, _STORAGES[name])
    if module == "torch":
        return _identity if name in ("Size", "device") else _TORCH_VALUES.get(name)
    if name == "DTensor" and module.startswith(_DT):
        return DTensorRecord
    if name in _DT_NAMES and module.startswith(("torch.distributed.", )):
        return _RECORDS.setdefault(name, record_class(name))
    return None


_RECORDS: dict[str, type] = {}


class InertGlobals:
    """An `extra` for the unpickler that resolves every global not allowed anyway to an inert
    Record (its kind is `module.name`; nothing is imported or called): for non-tensor state
    whose fields relex only reads, such as Megatron's common.pt (an argparse.Namespace of the
    run's arguments, Megatron's enum values). Tensors still go through the checked rebuilds."""

    def __init__(self):
        self._kinds: dict[tuple[str, str], type] = {}

    def __contains__(self, key) -> bool:
        return _allowed(*key, {}) is None

    def __getitem__(self, key):
        if key not in self._kinds:
            self._kinds[key] = record_class(".".join(key))
        return self._kinds[key]


class RestrictedUnpickler(pickle.Unpickler):
    """Builds records and StoredTensors; refuses every global not listed in the module doc."""

    def __init__(self, data: bytes, where: str, storages: dict[str, Storage] | None = None,
                 extra: dict | None = None, file: Path | None = None):
        super().__init__(io.BytesIO(data))
        self.where, self.storages, self.extra, self.file = where, storages, extra or {}, file

    def load(self):
        # A damaged BYTEARRAY8 length makes CPython's unpickler raise MemoryError after printing
        # "SystemError: deallocated bytearray object has exported buffers" through
        # sys.excepthook (bytearray_dealloc): keep that line off the user's terminal.
        hook, sys.excepthook = sys.excepthook, lambda *exc: None
        try:
            return super().load()
        finally:
            sys.excepthook = hook

    def find_class(self, module, name):
        obj = _allowed(module, name, self.extra)
        if obj is None:
            raise RelexError(f"{self.where}: refusing to unpickle global '{module}.{name}' "
                             f"(relex only loads tensors and their sharding metadata); this "
                             f"file is not a plain checkpoint: do not load it with torch.load "
                             f"either")
        return obj

    def persistent_load(self, pid):
        if self.storages is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageTag) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"bad storage record {short(pid)}")
        tag, key, count = pid[1], pid[2], pid[4]
        if not re.fullmatch(r"[0-9A-Za-z_.-]+", key):
            raise pickle.UnpicklingError(f"bad storage key {key!r:.40}")
        if tag.name == "UntypedStorage":
            dtype = torch.uint8
        else:
            dtype = tag.dtype
        old = self.storages.get(key)
        if old is not None:
            if old.dtype.itemsize * old.numel != dtype.itemsize * count:
                raise pickle.UnpicklingError(f"storage {key} declared with two sizes")
            return old
        self.storages[key] = Storage(key, dtype, count, self.file)
        return self.storages[key]


def restricted_loads(data: bytes, where: str, extra: dict | None = None):
    """Unpickle `data` (no storages) with the restricted unpickler; errors name `where`."""
    try:
        obj = RestrictedUnpickler(data, where, None, extra).load()
    except RelexError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a damaged pickle is the same error
        raise RelexError(f"{where}: corrupt or truncated pickle ({type(e).__name__}: "
                         f"{str(e)[:100]}); re-copy the checkpoint") from None
    check_bounded(obj, len(data), where)
    return obj


@contextmanager
def records_of(where: str):
    """Reading fields of unpickled records: a damaged pickle can put any type where a field
    should be (a string for a shape, a dict for a dim), which surfaces as one of these."""
    try:
        yield
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError,
            RecursionError) as e:
        raise RelexError(f"{where}: corrupt checkpoint records ({type(e).__name__}: "
                         f"{short(str(e))}); re-copy the checkpoint") from None


def _children(x):
    if isinstance(x, dict):
        return (*x.keys(), *x.values())
    if isinstance(x, (list, tuple, set, frozenset)):
        return x
    if isinstance(x, Record):
        return x.args, x.state
    return ()


def check_bounded(obj, nbytes: int, where: str) -> None:
    """Refuse an unpickled object too big or deep to walk as a tree, or holding a cycle.

    Every later step (placing storages, reading records, formatting an error) walks the
    object as a tree, so it must be small as one: the pickle memo lets tuples share entries,
    and a few hundred bytes then unfold into 2**48 leaves, whose repr never ends. Counted
    bottom-up with each object visited once (iteratively: depth is what is being checked)."""
    limit = MIN_NODES + NODES_PER_BYTE * nbytes
    size: dict[int, tuple[int, int]] = {}  # id -> (tree nodes, height)
    open_: set[int] = set()
    stack = [(obj, False)]
    problem = None
    while stack and problem is None:
        x, done = stack.pop()
        kids = _children(x)
        if not kids and not done:
            continue  # a leaf: one node, height 1
        i = id(x)
        if done:
            n, h = 1, 1
            for k in kids:
                kn, kh = size.get(id(k), (1, 1))
                n, h = n + kn, max(h, kh + 1)
            size[i] = (n, h)
            open_.discard(i)
            if n > limit:
                problem = f"unfolds into more than {limit} objects (shared memo entries?)"
            elif h > MAX_DEPTH:
                problem = f"nests more than {MAX_DEPTH} levels deep"
        elif i in open_:
            problem = "contains itself"
        elif i not in size:
            open_.add(i)
            stack.append((x, True))
            stack.extend((k, False) for k in kids)
    if problem is not None:
        raise RelexError(f"{where}: the pickle {problem}, which no checkpoint does; the file "
                         f"is corrupt or hostile: re-copy it, and do not torch.load it")
