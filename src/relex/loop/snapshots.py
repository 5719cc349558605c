"""A cycle's snapshots of this rank's weights, compact, with their Gram matrices kept current.

The cycle start theta_0 is kept exactly (a copy of the weights the optimizer trains: the fp32
masters). Each later snapshot is kept as "float16", its delta from theta_0 with every block of
2^18 elements scaled by its own power of two into float16 (11 significant bits wherever a
block's largest delta is; scaling by a power of two adds no rounding), or as "float32", the
weights themselves (exact; deltas formed in float64 when used). As a snapshot arrives its Gram
row (its inner products with itself and the earlier stored deltas, float64) is added, so a jump
needs only the fit and one weighted sum. The Gram is of the deltas as stored, which are exactly
what the weighted sum adds.

With `directory`, the deltas and the pre-jump weights go to safetensors files there (one file
per snapshot, written block by block, read back with pread) and RAM holds about one copy of the
cycle start; the files are removed after each jump.

Memory without a directory, in units of the rank's fp32 trainable bytes, at T = cycle / every
snapshots: 1 (cycle start) + T / 2 (float16 deltas; T with float32) while a cycle runs; at a jump
each parameter's pre-jump copy is taken just before it is written, while its deltas are freed,
so the peak stays at 1 + T / 2 + the largest parameter; then 2 (cycle start + pre-jump weights)
until the guard decides. At cycle 20, every 2: 6x.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from relex.errors import RelexError

#: elements per block (float16 scale granularity; float64 work buffers of T x BLOCK)
BLOCK = 1 << 18
DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: largest float16 magnitude a scaled block may reach (float16's max is 65504)
_F16_TOP = 2.0 ** 15


class CycleStore:
    """Cycle start, stored deltas, their Gram matrices (per parameter) and the pre-jump copy.

    names: parameter names in order; dtype: "float16" or "float32"; directory: spill files
    there (None: RAM); rank: used in the spill directory's name."""

    def __init__(self, dtype: str = "float16", directory: str | Path | None = None,
                 rank: int = 0, block: int = BLOCK):
        if dtype not in DTYPES:
            raise RelexError(f"snapshot_dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.dtype, self.block = DTYPES[dtype], block
        self.root = None
        if directory is not None:  # a directory of its own: two runs may share snapshot_dir
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=f"relex-rank{rank}-", dir=directory))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)
        self.base: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}     # RAM: stored deltas per parameter
        self.scales: dict[str, list[np.ndarray]] = {}     # per parameter, per row: block scales
        self.gram: dict[str, np.ndarray] = {}
        self.files: list = []                              # spill: one reader per stored row
        self.pre: dict[str, torch.Tensor] = {}
        self._pre_file = None
        self.count = 0

    # ------------------------------------------------------------------ cycle start
    def start(self, parts) -> None:
        """A new cycle from the weights in `parts` now (the pre-jump copy is kept)."""
        self.clear_rows()
        old = self.base
        self.base = {}
        for p in parts:  # into the previous cycle's copy where it fits: one copy at a time
            kept = old.pop(p.name, None)
            if kept is not None and kept.numel() == p.tensor.numel() and \
                    kept.dtype == p.tensor.dtype:
                self.base[p.name] = kept.copy_(p.tensor.detach())
            else:
                self.base[p.name] = p.tensor.detach().to("cpu", copy=True)
        del old
        self.rows = {n: [] for n in self.base}
        self.scales = {n: [] for n in self.base}
        self.gram = {n: np.zeros((0, 0)) for n in self.base}

    def clear_rows(self) -> None:
        for f in self.files:
            f.close()
        self.files = []
        self.rows, self.scales, self.count = {}, {}, 0
        if self.root is not None:
            shutil.rmtree(self.root / "rows", ignore_errors=True)

    # ------------------------------------------------------------------ snapshots
    def add(self, parts) -> None:
        """Store the deltas of `parts` from the cycle start and add their Gram rows."""
        t = self.count
        writer = (self._writer(f"rows/{t}", parts, own_dtype=self.exact)
                  if self.root is not None else None)
        try:
            for p in parts:
                base = self.base[p.name]
                stored = (torch.empty(base.numel(), dtype=self._stored_dtype(p))
                          if writer is None else None)
                scales = np.ones(max(1, -(-base.numel() // self.block)))
                row = np.zeros(t + 1)
                for b, lo in enumerate(range(0, base.numel(), self.block)):
                    hi = min(lo + self.block, base.numel())
                    live = p.tensor[lo:hi].to("cpu")
                    if self.exact:
                        q, x = live, live.double() - base[lo:hi].double()
                    else:
                        q, scales[b] = self._quantize(live.double() - base[lo:hi].double())
                        x = q.double() * scales[b]
                    if writer is None:
                        stored[lo:hi] = q
                    else:
                        writer.write_at(p.name, lo, q)
                    if t:
                        row[:t] += (self._earlier(p.name, lo, hi) @ x).numpy()
                    row[t] += float(x @ x)
                g = np.zeros((t + 1, t + 1))
                g[:t, :t] = self.gram[p.name]
                g[t, :], g[:, t] = row, row
                self.gram[p.name] = g
                self.scales[p.name].append(scales)
                if writer is None:
                    self.rows[p.name].append(stored)
            if writer is not None:
                writer.close()
                self.files.append(_open(self._path(f"rows/{t}")))
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        self.count += 1

    @property
    def exact(self) -> bool:
        return self.dtype == torch.float32

    def _stored_dtype(self, part) -> torch.dtype:
        return part.tensor.dtype if self.exact else self.dtype

    def _quantize(self, d: torch.Tensor) -> tuple[torch.Tensor, float]:
        top = float(d.abs().max()) if d.numel() else 0.0
        if not np.isfinite(top) or top == 0.0:
            return d.to(torch.float16), 1.0
        exp = int(np.frexp(top)[1])  # top = m * 2^exp, 0.5 <= m < 1
        scale = 2.0 ** (exp - 15)    # top / scale < 2^15
        return (d / scale).to(torch.float16), scale

    def _earlier(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """The stored deltas of rows 0..count-1 over [lo, hi), float64 (count x n)."""
        if self.root is None:
            rows = torch.stack([r[lo:hi] for r in self.rows[name]]).double()
        else:
            rows = torch.stack([f.read(name, lo, hi) for f in self.files]).double()
            for f in self.files:  # mapped pages count as this process's memory: drop them
                f.release(name, lo, hi)
        if self.exact:
            return rows - self.base[name][lo:hi].double()
        b = lo // self.block
        scales = torch.tensor([s[b] for s in self.scales[name]], dtype=torch.float64)
        return rows * scales[:, None]

    # ------------------------------------------------------------------ the jump
    def keep_pre(self, part) -> None:
        """Copy `part`'s weights now (before the jump writes it): for a rollback or restore."""
        if self._pre_file is None:
            self.pre[part.name] = part.tensor.detach().to("cpu", copy=True)
        else:
            self._pre_file.write_at(part.name, 0, part.tensor.detach().to("cpu"))

    def begin_pre(self, parts) -> None:
        self.drop_pre()
        if self.root is not None:
            self._pre_file = self._writer("pre", parts, own_dtype=True)

    def end_pre(self) -> None:
        if self._pre_file is not None:
            self._pre_file.close()
            self._pre_file = None
            self.pre = _open(self._path("pre"))

    def pre_of(self, name: str) -> torch.Tensor | None:
        if isinstance(self.pre, dict):
            return self.pre.get(name)
        if name not in self.pre.tensors:
            return None
        got = self.pre.read(name, 0, self.pre.tensors[name].numel).clone()
        self.pre.release(name, 0, got.numel())
        return got

    def drop_pre(self) -> None:
        if self._pre_file is not None:
            self._pre_file.abort()
            self._pre_file = None
        if not isinstance(self.pre, dict):
            self.pre.close()
        self.pre = {}
        if self.root is not None:
            shutil.rmtree(self.root / "pre", ignore_errors=True)

    def combine_into(self, part, w: np.ndarray) -> None:
        """part.tensor = theta_0 + sum_t w_t D_t (float64 work, written in its dtype)."""
        base = self.base[part.name]
        wt = torch.from_numpy(np.asarray(w, dtype=np.float64))
        for lo in range(0, base.numel(), self.block):
            hi = min(lo + self.block, base.numel())
            out = base[lo:hi].double() + wt @ self._earlier(part.name, lo, hi)
            part.tensor[lo:hi].copy_(out.to(part.tensor.dtype))
        if part.flush is not None:
            part.flush()

    def free(self, name: str) -> None:
        """A parameter whose jump is written needs no stored deltas any more (RAM mode)."""
        if self.root is None:
            self.rows[name] = []

    def memory_bytes(self) -> int:
        """Bytes held in RAM (cycle start, stored deltas, pre-jump copy)."""
        held = list(self.base.values()) + [r for rows in self.rows.values() for r in rows]
        if isinstance(self.pre, dict):
            held += list(self.pre.values())
        return sum(t.numel() * t.element_size() for t in held)

    def close(self) -> None:
        self.clear_rows()
        self.drop_pre()
        if self.root is not None:
            self._finalizer()  # removes the directory, once

    # ------------------------------------------------------------------ spill files
    def _path(self, what: str) -> Path:
        return self.root / what / "model.safetensors"

    def _writer(self, what: str, parts, own_dtype: bool = False):
        """A one-file safetensors writer for `parts` (stored dtype, or each part's own)."""
        from relex.formats import CODES
        from relex.output.model import ModelWriter
        d = self.root / what
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        specs = [(p.name, CODES[p.tensor.dtype if own_dtype else self.dtype],
                  (p.tensor.numel(),)) for p in parts]
        return ModelWriter(d, specs, max_shard_size=1 << 62)


def _open(path: Path):
    """A spilled file for element-range reads: relex's own mapped reader (formats/hf.py), not
    safetensors' get_slice, which took 40 ms per 2^18-element slice of a 30M-element tensor
    (a 30M-parameter jump from 10 spilled rows: 64 s)."""
    from relex.formats.hf import HFReader
    return HFReader(path.parent)
