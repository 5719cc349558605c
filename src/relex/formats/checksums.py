"""CRC-32 checks of the tensor bytes a pass reads out of torch.save archives.

torchzip.load keeps each storage's CRC-32 from the zip, and chunked tensors hand their
bytes here as the pass releases them (Checksums says why the check is needed and how it stays
cheap). The CRC-32 is ISA-L's, with zlib's as the fallback: the same values at a fifth of the
speed (measured at the import below; benchmarks/bench_checksums.py times the whole check).
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import MappedFiles
from relex.formats.unpickler import Storage

try:  # ISA-L's CRC-32: 12 GB/s here against zlib's 2.2 GB/s (256 MiB in 8 MiB calls, 2 cores),
    from isal.isal_zlib import crc32  # which made the check cost 1.3-1.4x on 100M x 30
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32


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
