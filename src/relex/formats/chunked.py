"""Global tensors stored as N-d boxes (chunks) across files, read by element range.

verl FSDP rank files, torch DCP `.distcp` chunks, DeepSpeed model states and NeMo-RL's per-rank
safetensors all hold a global tensor as pieces: each a StoredTensor at some offsets in the
global shape. ChunkedTensor checks that the pieces cover the shape exactly and serves any
element range of it from the mapped files (a zero-copy view where the range lies in whole rows
of one chunk), folding the bytes it releases into the archives' CRC-32 checks; ChunkedReader is
the Reader these formats build on.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats.base import DTYPES, MappedFiles, Reader, TensorMeta, numel
from relex.formats.checksums import Checksums
from relex.formats.unpickler import StoredTensor


@dataclass(frozen=True)
class Chunk:
    """A box of a global tensor: its offsets per dim and the stored tensor holding it."""

    offsets: tuple[int, ...]
    tensor: StoredTensor


@dataclass(frozen=True)
class Place:
    """One copy a checkpoint keeps of a tensor's values, as boxes tiling `shape` in `dtype`.

    `shape` is the tensor's own shape, or its flattened (numel,) where a trainer keeps the
    values in flat buffers (DeepSpeed's fp32 master partitions): flat element k is the same
    element either way. A checkpoint may keep several (the 16-bit module weights and the
    optimizer's fp32 masters; every rank's replica): writing a tensor back (output/native.py)
    writes all of them, or resuming would undo the write. Replicas kept side by side in one
    store (each TP rank's copy of a norm in Megatron's optimizer buckets) may be boxes of one
    Place: every box is written."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]


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
        hit = self._row_chunk(a, b) if b > a else None
        if hit is not None:  # inside one contiguous chunk: exactly its bytes (a Megatron
            s, c = hit       # q_proj range is a few rows of a whole layer's linear_qkv)
            t = c.tensor
            yield (t.storage.file, t.storage.offset + (t.offset + a - s) * t.itemsize,
                   (b - a) * t.itemsize)
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
        """Register a tensor this reader hands out under its own name."""
        self._keep(tensor)
        self.tensors[tensor.name] = TensorMeta(tensor.name, tensor.dtype, tensor.shape)

    def _keep(self, tensor: ChunkedTensor) -> None:
        """Register a stored tensor (read, released and checksummed here) without listing it
        in `tensors`: readers that hand out other views of it (megatron.py) list those."""
        self._chunked[tensor.name] = tensor
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

    def places(self, name: str) -> list[Place]:
        t = self._chunked[name]
        return [Place(t.shape, t.dtype, tuple(t.chunks))]

    def close(self) -> None:
        self._maps.close()


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
