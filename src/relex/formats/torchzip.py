"""torch.save archives (zip files) read without running their pickles, and their storages located.

A `torch.save` file is a zip archive: `<prefix>/data.pkl` (a pickle of the saved object whose
tensors point to storages by key) and one uncompressed member `<prefix>/data/<key>` per storage.
We unpickle data.pkl with a restricted unpickler that builds inert records instead of calling
anything (unpickler.py), and find each storage's absolute byte offset from the zip's own headers;
tensor bytes are then read through base.MappedFiles (zero-copy views, released as the pass goes),
never torch.load'ed: a 7B verl rank file is 14-28 GB. The same parser reads a torch.save blob
inside a bigger file (torch DCP `.distcp` chunks), given its [offset, offset + length).

zipfile reads only the directory, data.pkl and the small records; the storages, which we map
ourselves, get the checks zipfile would have made: each local header agrees with the central
directory, each member lies whole inside the archive and before the next entry, and each tensor
inside its storage. Their CRC-32s are checked as a pass reads them (checksums.py).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

from relex.errors import RelexError
from relex.formats.base import CODES
from relex.formats.unpickler import (
    Record,
    RestrictedUnpickler,
    Storage,
    StoredTensor,
    check_bounded,
    short,
)

#: data.pkl larger than this is not a state dict (a 7B DTensor state dict pickles to ~1 MB)
MAX_PICKLE = 256 << 20


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
    its storage; each storage keeps its CRC-32 for the pass to check (checksums.py)."""
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
        zf, members, prefix, data = _open_archive(f, offset, length, where, fix)
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
        central = _central_crcs(f, offset, zf.start_dir, length)
        placed = {}
        for key, st in storages.items():
            member = members.get(f"{prefix}data/{key}")
            nbytes = st.numel * st.dtype.itemsize
            if member is None:
                raise RelexError(f"{where}: storage '{key}' is missing from the archive; {fix}")
            if member.compress_type != zipfile.ZIP_STORED or member.file_size != nbytes:
                raise RelexError(f"{where}: storage '{key}' is compressed or has "
                                 f"{member.file_size} bytes instead of {nbytes}; {fix}")
            start, crc_at = _member_data(f, offset, length, member, ends, where, fix)
            crc_at += (offset + central[member.header_offset],) if member.header_offset in \
                central else ()
            placed[key] = Storage(key, st.dtype, st.numel, file, offset + start, member.CRC,
                                  crc_at)
    try:
        return _place(obj, placed, where)
    except (RecursionError, MemoryError) as e:
        raise RelexError(f"{where}: data.pkl nests too deeply or is too large for a state dict "
                         f"({type(e).__name__}); the file is corrupt or not a checkpoint: "
                         f"{fix}") from None


def _open_archive(f, offset: int, length: int, where: str, fix: str):
    """(zip file, its members by name, the `<name>/` prefix, the bytes of data.pkl) of the
    torch.save archive at [offset, offset + length) of `f`, after checking that it is one
    (a single data.pkl, little-endian, of a state dict's size) and that its records read."""
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
    return zf, members, prefix, data


_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header


_CENTRAL = struct.Struct("<4s12xI8xHHH8xI")  # a central directory entry, the fields we use


def _central_crcs(f, offset: int, start_dir: int, length: int) -> dict[int, int]:
    """{a member's local header offset: where its CRC-32 sits in the central directory}
    (relative to the archive); what a writer updates after changing the member's bytes."""
    out, pos = {}, start_dir
    while pos + _CENTRAL.size <= length:
        raw = os.pread(f.fileno(), _CENTRAL.size, offset + pos)
        if len(raw) < _CENTRAL.size or raw[:4] != b"PK\x01\x02":
            break
        _, _, n, e, c, header = _CENTRAL.unpack(raw)
        if header == 0xFFFFFFFF:  # zip64: the real offset is in the extra field
            extra = os.pread(f.fileno(), e, offset + pos + _CENTRAL.size + n)
            header = _zip64_offset(extra, raw)
        out[header] = pos + 16
        pos += _CENTRAL.size + n + e + c
    return out


def _zip64_offset(extra: bytes, raw: bytes) -> int:
    """The local header offset from a zip64 extra field (the fields present are those whose
    32-bit values are 0xFFFFFFFF, in the order: size, compressed size, offset)."""
    usize, csize = struct.unpack_from("<II", raw, 20)[::-1]
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            j = i + 4 + 8 * ((usize == 0xFFFFFFFF) + (csize == 0xFFFFFFFF))
            return struct.unpack_from("<Q", extra, j)[0] if j + 8 <= i + 4 + size else -1
        i += 4 + size
    return -1


def _member_data(f, offset: int, length: int, member: zipfile.ZipInfo, ends: list[int],
                 where: str, fix: str) -> tuple[int, tuple[int, ...]]:
    """Where a stored member's bytes start in the archive, and where (absolute) its local
    header or data descriptor holds its CRC-32, after checking both against the central
    directory: zipfile trusts neither for members we read ourselves, and a damaged name or
    extra length there shifts the data silently."""
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
    crc_at = offset + pos + 14
    if flags & 0x08:  # sizes and CRC follow the data (torch.save writes them so)
        desc = os.pread(f.fileno(), 28, offset + start + nbytes)
        crc_at = offset + start + nbytes + (4 if desc[:4] == b"PK\x07\x08" else 0)
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
    return start, (crc_at,)


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
