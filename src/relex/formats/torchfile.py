"""torch.save archives read without running their pickles, and tensors assembled from chunks.

A `torch.save` file is a zip archive: `<prefix>/data.pkl` (a pickle of the saved object whose
tensors point to storages by key) and one uncompressed member `<prefix>/data/<key>` per storage.
We unpickle data.pkl with a restricted unpickler that builds inert records instead of calling
anything, and find each storage's absolute byte offset from the zip's own headers; tensor bytes
are then read through base.MappedFiles (zero-copy views, released as the pass goes), never
torch.load'ed: a 7B verl rank file is 14-28 GB. The same parser reads a torch.save blob inside a
bigger file (torch DCP `.distcp` chunks), given its [offset, offset + length).

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
- extra: names a caller adds (torch DCP's metadata classes, see dcp.py).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import reprlib
import struct
import sys
import threading
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import CODES, DTYPES, MappedFiles, Reader, TensorMeta, numel

#: data.pkl larger than this is not a state dict (a 7B DTensor state dict pickles to ~1 MB)
MAX_PICKLE = 256 << 20
#: an unpickled object may count at most this many nodes as a tree (shared objects counted at
#: every place they appear) per byte of pickle, plus MIN_NODES; and nest at most MAX_DEPTH deep.
#: The memo lets a few hundred bytes name 2**48 leaves; state dicts and DCP metadata stay
#: below 1 node per byte (see tests/test_torch_damage.py).
NODES_PER_BYTE = 8
MIN_NODES = 1 << 16
MAX_DEPTH = 100

try:  # ISA-L's CRC-32: 12 GB/s here against zlib's 2.2 GB/s (256 MiB in 8 MiB calls, 2 cores),
    from isal.isal_zlib import crc32  # which made the check cost 1.3-1.4x on 100M x 30
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32

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


def _record(kind: str) -> type:
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


DTensorRecord = _record("DTensor")


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
        return _RECORDS.setdefault(name, _record(name))
    return None


_RECORDS: dict[str, type] = {}


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


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of a file as a seekable stream (for zipfile)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.base, self.length, self.pos = f, offset, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, pos, whence=0):
        pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        if pos < 0:  # damaged zip64 / end records point before the archive
            raise ValueError(f"seek to byte {pos} before the start of the archive")
        self.pos = pos
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self.f.fileno(), n, self.base + self.pos)
        self.pos += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


#: what zipfile raises on a damaged archive (a negative seek is our _Slice's ValueError)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
               KeyError, NotImplementedError, zlib.error)


def load(file: Path, offset: int = 0, length: int | None = None, where: str | None = None,
         extra: dict | None = None):
    """The object a torch.save archive holds, tensors as StoredTensor (no tensor data read).

    file: the file; offset/length: where the archive sits in it (default: the whole file);
    where: how errors name it; extra: more allowed globals {(module, name): object}. Every
    storage is checked to be stored uncompressed and whole inside [offset, offset + length),
    its local zip header to agree with the central directory, and every tensor to lie inside
    its storage; each storage keeps its CRC-32 for the pass to check (Checksums)."""
    file = Path(file)
    where = where or str(file)
    fix = "re-copy the checkpoint or re-save it"
    if not file.is_file():  # a FIFO or device would block or never end
        raise RelexError(f"{file}: missing or not a regular file; {fix}")
    size = file.stat().st_size
    length = size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > size:
        raise RelexError(f"{where}: truncated: bytes {offset}-{offset + length} are past the "
                         f"end of the file ({size} bytes); {fix}")
    with open(file, "rb") as f:
        head = os.pread(f.fileno(), 4, offset)
        if head != b"PK\x03\x04":
            what = ("a legacy (pre-1.6, non-zip) torch.save file; re-save it with torch >= 1.6"
                    if head[:2] == b"\x80\x02" else f"not a torch.save zip archive; {fix}")
            raise RelexError(f"{where}: {what}")
        try:
            zf = zipfile.ZipFile(_Slice(f, offset, length))
            members = {i.filename: i for i in zf.infolist()}
            pkls = [n for n in members if re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(pkls) != 1:
                raise RelexError(f"{where}: not a torch.save archive (no single "
                                 f"<name>/data.pkl); {fix}")
            prefix = pkls[0][: -len("data.pkl")]
            order = members.get(prefix + "byteorder")
            if order is not None and zf.read(order) != b"little":
                raise RelexError(f"{where}: saved on a big-endian machine; re-save it on a "
                                 f"little-endian one")
            info = members[pkls[0]]
            if info.file_size > MAX_PICKLE:
                raise RelexError(f"{where}: data.pkl is {info.file_size} bytes, too large for "
                                 f"a state dict; {fix}")
        except _ZIP_ERRORS as e:
            raise RelexError(f"{where}: corrupt or truncated torch.save archive "
                             f"({type(e).__name__}: {str(e)[:100]}); {fix}") from None
        try:
            data = zf.read(info)  # zipfile checks its local header and CRC-32
            for m in members.values():  # the small records too (version, byteorder, ...)
                if (m is not info and not m.filename.startswith(f"{prefix}data/")
                        and m.compress_type == zipfile.ZIP_STORED and m.file_size < 1 << 20):
                    zf.read(m)
        except _ZIP_ERRORS as e:
            raise RelexError(f"{where}: corrupt data.pkl ({type(e).__name__}: "
                             f"{str(e)[:100]}); {fix}") from None
        storages: dict[str, Storage] = {}
        try:
            obj = RestrictedUnpickler(data, where, storages, extra, file=file).load()
        except RelexError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a damaged pickle is one error
            raise RelexError(f"{where}: corrupt pickle in data.pkl ({type(e).__name__}: "
                             f"{str(e)[:100]}); {fix}") from None
        check_bounded(obj, len(data), where)
        ends = sorted([i.header_offset for i in members.values()] + [zf.start_dir])
        placed = {}
        for key, st in storages.items():
            member = members.get(f"{prefix}data/{key}")
            nbytes = st.numel * st.dtype.itemsize
            if member is None:
                raise RelexError(f"{where}: storage '{key}' is missing from the archive; {fix}")
            if member.compress_type != zipfile.ZIP_STORED or member.file_size != nbytes:
                raise RelexError(f"{where}: storage '{key}' is compressed or has "
                                 f"{member.file_size} bytes instead of {nbytes}; {fix}")
            start = _member_data(f, offset, length, member, ends, where, fix)
            placed[key] = Storage(key, st.dtype, st.numel, file, offset + start, member.CRC)
    try:
        return _place(obj, placed, where)
    except (RecursionError, MemoryError) as e:
        raise RelexError(f"{where}: data.pkl nests too deeply or is too large for a state dict "
                         f"({type(e).__name__}); the file is corrupt or not a checkpoint: "
                         f"{fix}") from None


_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header


def _member_data(f, offset: int, length: int, member: zipfile.ZipInfo, ends: list[int],
                 where: str, fix: str) -> int:
    """Where a stored member's bytes start in the archive, after checking its local header
    (and data descriptor) against the central directory: zipfile trusts neither for members
    we read ourselves, and a damaged name or extra length there shifts the data silently."""
    bad = f"{where}: corrupt zip entry '{member.filename}'"
    pos, nbytes = member.header_offset, member.file_size
    local = os.pread(f.fileno(), _LOCAL.size, offset + pos) if 0 <= pos <= length else b""
    if len(local) < _LOCAL.size or local[:4] != b"PK\x03\x04":
        raise RelexError(f"{bad} (no local header at byte {pos}); {fix}")
    _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL.unpack(local)
    name = os.pread(f.fileno(), name_len + extra_len, offset + pos + _LOCAL.size)
    extra, name = name[name_len:], name[:name_len]
    if name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != member.orig_filename:
        raise RelexError(f"{bad} (the local header names {short(name)}); {fix}")
    if flags != member.flag_bits or method != member.compress_type:
        raise RelexError(f"{bad} (local header flags/method differ from the central "
                         f"directory); {fix}")
    i = 0
    while i + 4 <= len(extra):  # the extra field is (id, size, data) records, end to end
        i += 4 + struct.unpack_from("<H", extra, i + 2)[0]
    if i != len(extra):
        raise RelexError(f"{bad} (malformed extra field in the local header); {fix}")
    start = pos + _LOCAL.size + name_len + extra_len
    if start + nbytes > length:
        raise RelexError(f"{where}: truncated: storage '{member.filename}' ends at byte "
                         f"{start + nbytes} of {length}; {fix}")
    if flags & 0x08:  # sizes and CRC follow the data (torch.save writes them so)
        desc = os.pread(f.fileno(), 28, offset + start + nbytes)
        desc = desc[4:] if desc[:4] == b"PK\x07\x08" else desc
        crc = struct.unpack_from("<I", desc)[0] if len(desc) >= 4 else None
    elif csize != 0xFFFFFFFF and (csize, usize) != (member.compress_size, member.file_size):
        crc = None
    if crc != member.CRC:
        raise RelexError(f"{bad} (local header or data descriptor disagrees with the central "
                         f"directory: CRC or size); {fix}")
    nxt = next((e for e in ends if e > pos), length)
    if start + nbytes > nxt:
        raise RelexError(f"{bad} (its data runs into the next entry at byte {nxt}); {fix}")
    return start


def _aliased(shape, stride) -> bool:
    """Two elements at one address (stride 0, or dims interleaved): no saved parameter is
    like that, and a damaged record that is would read the same bytes twice."""
    span = 1
    for size, st in sorted((x for x in zip(shape, stride) if x[0] > 1), key=lambda x: x[1]):
        if st < span:
            return True
        span = st * size
    return False


def _place(obj, storages: dict[str, Storage], where: str):
    """obj with every StoredTensor pointing at its placed storage, checked against its size."""
    memo: dict[int, object] = {}

    def walk(x):
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, StoredTensor):
            st = storages[x.storage.key]
            t = StoredTensor(st, x.offset, x.shape, x.stride)
            if (len(x.stride) != len(x.shape) or x.offset < 0
                    or any(s < 0 for s in x.shape) or any(s < 0 for s in x.stride)
                    or _aliased(x.shape, x.stride)):
                raise RelexError(f"{where}: corrupt tensor record (shape {list(x.shape)}, "
                                 f"stride {list(x.stride)}); re-copy the checkpoint")
            if t.numel and t.span()[0] + t.span()[1] > st.offset + st.numel * st.dtype.itemsize:
                raise RelexError(f"{where}: a tensor of shape {list(x.shape)} reaches past the "
                                 f"end of its storage '{st.key}'; the file is corrupt")
            if t.storage.dtype not in CODES:
                raise RelexError(f"{where}: a tensor has dtype {st.dtype}, which relex does "
                                 f"not read")
            out = t
        elif isinstance(x, dict):
            out = type(x)() if type(x) is not dict else {}
            memo[id(x)] = out
            for k, v in x.items():
                out[k] = walk(v)
            return out
        elif isinstance(x, (list, tuple)):
            out = type(x)(walk(v) for v in x) if type(x) in (list, tuple) else x
        elif isinstance(x, Record):
            memo[id(x)] = x
            x.args = tuple(walk(a) for a in x.args)
            x.state = walk(x.state)
            return x
        else:
            out = x
        memo[id(x)] = out
        return out

    return walk(obj)


# --------------------------------------------------------------------- chunked global tensors
@dataclass(frozen=True)
class Chunk:
    """A box of a global tensor: its offsets per dim and the stored tensor holding it."""

    offsets: tuple[int, ...]
    tensor: StoredTensor


class ChunkedTensor:
    """A global tensor stored as N-d boxes (FSDP shards, DCP chunks), read by element range.

    A range inside one chunk that covers whole rows of the global tensor (every Shard(0) shard)
    is a zero-copy view; any other range is assembled into a new buffer, box by box. The chunks
    are checked to cover the shape exactly: each in bounds, pairwise disjoint, and together as
    many elements as the shape.
    """

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], chunks: list[Chunk],
                 maps: MappedFiles, where: str):
        self.name, self.dtype, self.shape, self.maps = name, dtype, tuple(shape), maps
        self.chunks = [c for c in chunks if c.tensor.numel]
        self.checksums: Checksums | None = None  # set by ChunkedReader._add
        self.touched = False
        fix = "the checkpoint is damaged or was written by an unsupported version"
        for c in self.chunks:
            t = c.tensor
            if (len(c.offsets) != len(shape) or len(t.shape) != len(shape)
                    or any(o < 0 or o + s > g for o, s, g in zip(c.offsets, t.shape, shape))):
                raise RelexError(f"{where}: tensor '{name}': chunk of shape {list(t.shape)} at "
                                 f"{list(c.offsets)} lies outside the global shape "
                                 f"{list(shape)}; {fix}")
            if t.dtype != dtype:
                raise RelexError(f"{where}: tensor '{name}': chunks of different dtypes "
                                 f"({t.dtype}, {dtype}); {fix}")
        if sum(c.tensor.numel for c in self.chunks) != numel(shape):
            raise RelexError(f"{where}: tensor '{name}': its chunks hold "
                             f"{sum(c.tensor.numel for c in self.chunks)} elements, not the "
                             f"{numel(shape)} of shape {list(shape)} (a shard is missing or "
                             f"repeated); {fix}")
        # in bounds + as many elements as the shape + pairwise disjoint = an exact cover
        overlap = _overlapping(self.chunks)
        if overlap is not None:
            c, d = overlap
            raise RelexError(f"{where}: tensor '{name}': chunks of shape {list(c.tensor.shape)} "
                             f"at {list(c.offsets)} and {list(d.tensor.shape)} at "
                             f"{list(d.offsets)} overlap (so others leave a gap); {fix}")
        self.inner = numel(shape[1:]) if shape else 1
        # chunks that are whole rows of the global tensor, by their first flat element
        self.rows = sorted((c.offsets[0] * self.inner if shape else 0, c) for c in self.chunks
                           if tuple(c.tensor.shape[1:]) == self.shape[1:]
                           and c.tensor.contiguous)
        self._starts = [s for s, _ in self.rows]

    def _row_chunk(self, a: int, b: int) -> tuple[int, Chunk] | None:
        import bisect
        i = bisect.bisect_right(self._starts, a) - 1
        if i >= 0:
            s, c = self.rows[i]
            if b <= s + c.tensor.numel:
                return s, c
        return None

    def read(self, a: int, b: int) -> torch.Tensor:
        """Elements [a, b) of the flattened global tensor, 1-D."""
        self.touched = True  # its members are checked after the pass, released or not
        hit = self._row_chunk(a, b)
        if hit is not None:
            s, c = hit
            t = c.tensor
            i0 = a - s
            if t.shape:
                r0, r1 = i0 // self.inner, -(-(b - s) // self.inner)
                flat = t.view(self.maps, r0, r1).reshape(-1)
                i0 -= r0 * self.inner
                return flat[i0: i0 + b - a]
            return t.view(self.maps).reshape(-1)[i0: i0 + b - a]
        out = torch.empty(b - a, dtype=DTYPES[self.dtype])
        _fill(out, self.shape, a, b, [(c.offsets, c) for c in self.chunks], self.maps)
        return out

    def _spans(self, a: int, b: int):
        """(file, offset, nbytes) of the stored bytes elements [a, b) come from."""
        if not self.shape:
            for c in self.chunks:
                yield (c.tensor.storage.file, *c.tensor.span())
            return
        r0, r1 = a // max(self.inner, 1), -(-b // max(self.inner, 1))
        for c in self.chunks:
            lo, hi = max(r0, c.offsets[0]), min(r1, c.offsets[0] + c.tensor.shape[0])
            if lo < hi:
                yield (c.tensor.storage.file, *c.tensor.span(lo - c.offsets[0],
                                                              hi - c.offsets[0]))

    def release(self, a: int, b: int) -> None:
        for file, start, nbytes in self._spans(a, b):
            if self.checksums is not None:  # the bytes are still mapped: check them first
                self.checksums.fold(file, start, nbytes)
            self.maps.release(file, start, nbytes)

    def prefetch(self, a: int, b: int) -> None:
        if hasattr(self.maps, "prefetch"):  # MappedFiles.prefetch (newer base.py)
            for file, start, nbytes in self._spans(a, b):
                self.maps.prefetch(file, start, nbytes)


class ChunkedReader(Reader):
    """A Reader whose tensors are ChunkedTensors over one MappedFiles (verl FSDP, DCP,
    DeepSpeed, NeMo-RL): subclasses build them and register each with `_add`."""

    def __init__(self, path):
        super().__init__(Path(path))
        self._maps = MappedFiles()
        self._chunked: dict[str, ChunkedTensor] = {}
        self.checksums = Checksums(self._maps)

    def _add(self, tensor: ChunkedTensor) -> None:
        self._chunked[tensor.name] = tensor
        self.tensors[tensor.name] = TensorMeta(tensor.name, tensor.dtype, tensor.shape)
        tensor.checksums = self.checksums
        for c in tensor.chunks:
            self.checksums.add(c.tensor.storage)

    def verify(self) -> None:
        self.checksums.finish([c.tensor.storage for t in self._chunked.values() if t.touched
                               for c in t.chunks])

    def read(self, name, start, stop):
        return self._chunked[name].read(start, stop)

    def release(self, name, start, stop):
        self._chunked[name].release(start, stop)

    def prefetch(self, name, start, stop):
        self._chunked[name].prefetch(start, stop)

    def close(self) -> None:
        self._maps.close()


class _Member:
    """One zip member's bytes [start, end) in `file`, and its CRC-32 folded up to `pos`."""

    def __init__(self, storage: Storage):
        self.storage, self.start = storage, storage.offset
        self.end = storage.offset + storage.numel * storage.dtype.itemsize
        self.pos, self.crc, self.lock = self.start, 0, threading.Lock()


class Checksums:
    """The CRC-32 of every zip member a pass reads, computed as the pass releases its bytes.

    torch.save records each storage's CRC-32 but nothing else checks it when bytes are
    mapped in place: a flipped bit in tensor data would be used as is. The engine releases
    each tensor's ranges in order right after using them (mapped, usually in the CPU cache),
    so each member's CRC is folded in there, from the furthest byte folded onwards (ranges
    released again, or before that point, cost nothing); `finish` folds what the pass never
    released (a storage's padding past its tensor) and checks every member it touched."""

    def __init__(self, maps: MappedFiles):
        self.maps, self.enabled = maps, True
        self._members: dict[Path, dict[int, _Member]] = {}
        self._starts: dict[Path, list[int]] = {}

    def add(self, storage: Storage) -> None:
        if storage.crc is None or storage.numel == 0:
            return
        members = self._members.setdefault(storage.file, {})
        if storage.offset not in members:
            members[storage.offset] = _Member(storage)
            self._starts[storage.file] = sorted(members)

    def fold(self, file: Path, start: int, nbytes: int) -> None:
        """Fold bytes [start, start + nbytes) of `file` into the members they belong to."""
        import bisect
        starts = self._starts.get(file)
        if not self.enabled or not starts or nbytes <= 0:
            return
        end = start + nbytes
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(starts) and starts[i] < end:
            m = self._members[file][starts[i]]
            i += 1
            with m.lock:
                if start <= m.pos < min(end, m.end):
                    self._fold(m, min(end, m.end))

    def _fold(self, m: _Member, upto: int) -> None:
        data = self.maps.view(m.storage.file, m.pos, upto - m.pos, torch.uint8).numpy()
        m.crc, m.pos = crc32(data, m.crc), upto
        if m.pos == m.end and m.crc != m.storage.crc:
            raise RelexError(f"{m.storage.file}: the bytes of storage '{m.storage.key}' (file "
                             f"bytes {m.start}-{m.end}) fail their CRC-32 check: the tensor "
                             f"data is damaged; re-copy the checkpoint")

    def finish(self, read: list[Storage] = ()) -> None:
        """Check every member the pass released bytes of, or that holds a storage in `read`,
        reading what it left out."""
        if not self.enabled:
            return
        wanted = {(st.file, st.offset) for st in read}
        for file, members in self._members.items():
            for m in members.values():
                with m.lock:
                    if m.pos < m.end and (m.pos > m.start or (file, m.start) in wanted):
                        self._fold(m, m.end)


def _overlapping(chunks: list[Chunk]) -> tuple[Chunk, Chunk] | None:
    """Two (non-empty) chunks whose boxes share an element, or None: a sweep along dim 0, so
    row shards cost O(n log n) and only boxes with overlapping row ranges are compared (a 0-d
    tensor's single chunk is checked by the element count)."""
    if len(chunks) < 2 or not chunks[0].offsets:
        return None
    boxes = sorted(chunks, key=lambda c: c.offsets[0])
    for i, c in enumerate(boxes):
        end = c.offsets[0] + c.tensor.shape[0]
        for d in boxes[i + 1:]:
            if d.offsets[0] >= end:
                break
            if all(o < p + t and p < o + s for o, s, p, t in
                   zip(c.offsets, c.tensor.shape, d.offsets, d.tensor.shape)):
                return c, d
    return None


def _fill(out: torch.Tensor, shape, a: int, b: int, pieces, maps) -> None:
    """out[:] = flat elements [a, b) of a tensor of `shape` made of pieces [(offsets, src)]:
    src is a Chunk (rows read from the map on demand) or an N-d tensor already sliced.

    Whole rows are copied box by box with tensor slicing; a partial first or last row is the
    same problem one dimension down."""
    if a >= b:
        return
    if not shape:
        src = pieces[0][1]
        out.copy_((src.tensor.view(maps) if isinstance(src, Chunk) else src).reshape(1))
        return
    inner = numel(shape[1:])

    def rows(src, lo, hi, o0):
        if isinstance(src, Chunk):
            return src.tensor.view(maps, lo - o0, hi - o0)
        return src[lo - o0: hi - o0]

    def partial(row, lo, hi, dst):
        sub = []
        for offs, src in pieces:
            size0 = (src.tensor.shape if isinstance(src, Chunk) else src.shape)[0]
            if offs[0] <= row < offs[0] + size0:
                sub.append((offs[1:], rows(src, row, row + 1, offs[0])[0]))
        _fill(dst, shape[1:], lo, hi, sub, maps)

    row_a, row_b = a // inner, b // inner
    if row_a == row_b:
        end = min(b, (row_a + 1) * inner)
        partial(row_a, a - row_a * inner, end - row_a * inner, out[: end - a])
        return
    first = row_a
    if a % inner:
        first = row_a + 1
        partial(row_a, a % inner, inner, out[: first * inner - a])
    if row_b > first:
        region = out[first * inner - a: row_b * inner - a].view(row_b - first, *shape[1:])
        for offs, src in pieces:
            size = src.tensor.shape if isinstance(src, Chunk) else tuple(src.shape)
            lo, hi = max(first, offs[0]), min(row_b, offs[0] + size[0])
            if lo < hi:
                idx = (slice(lo - first, hi - first),) + tuple(
                    slice(o, o + s) for o, s in zip(offs[1:], size[1:]))
                region[idx] = rows(src, lo, hi, offs[0])
    if b % inner:
        partial(row_b, 0, b % inner, out[row_b * inner - a:])

