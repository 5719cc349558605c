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
cycle start; the files are removed after each jump. Where the bytes live is storage.py's
(RamRows or DiskRows, chosen once here); this module does the arithmetic.

Memory without a directory, in units of the rank's fp32 trainable bytes, at T = cycle / every
snapshots: 1 (cycle start) + T / 2 (float16 deltas; T with float32) while a cycle runs; at a jump
each parameter's pre-jump copy is taken just before it is written, while its deltas are freed,
so the peak stays at 1 + T / 2 + the largest parameter; then 2 (cycle start + pre-jump weights)
until the guard decides. At cycle 20, every 2: 6x.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from relex.errors import RelexError
from relex.loop.storage import DiskRows, RamRows

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
        #: where the stored deltas and the pre-jump copy live
        self.rows = RamRows() if directory is None else DiskRows(directory, rank)
        self.base: dict[str, torch.Tensor] = {}
        self.scales: dict[str, list[np.ndarray]] = {}     # per parameter, per row: block scales
        self.gram: dict[str, np.ndarray] = {}
        self.count = 0

    @property
    def root(self) -> Path | None:
        """The spill directory of this store (None in RAM)."""
        return self.rows.root

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
        self.scales = {n: [] for n in self.base}
        self.gram = {n: np.zeros((0, 0)) for n in self.base}

    def clear_rows(self) -> None:
        self.rows.clear()
        self.scales, self.count = {}, 0

    # ------------------------------------------------------------------ snapshots
    def add(self, parts) -> None:
        """Store the deltas of `parts` from the cycle start and add their Gram rows."""
        self.rows.open_row([(p.name, self._stored_dtype(p), p.tensor.numel()) for p in parts])
        try:
            for p in parts:
                self._add_part(p)
            self.rows.close_row()
        except BaseException:
            self.rows.abort_row()
            raise
        self.count += 1

    def _add_part(self, p) -> None:
        """One parameter's delta: stored block by block, its Gram row added."""
        t = self.count
        base = self.base[p.name]
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
            self.rows.put(p.name, lo, q)
            if t:
                row[:t] += (self._earlier(p.name, lo, hi) @ x).numpy()
            row[t] += float(x @ x)
        g = np.zeros((t + 1, t + 1))
        g[:t, :t] = self.gram[p.name]
        g[t, :], g[:, t] = row, row
        self.gram[p.name] = g
        self.scales[p.name].append(scales)

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
        rows = self.rows.read(name, lo, hi)
        if self.exact:
            return rows - self.base[name][lo:hi].double()
        b = lo // self.block
        scales = torch.tensor([s[b] for s in self.scales[name]], dtype=torch.float64)
        return rows * scales[:, None]

    # ------------------------------------------------------------------ the jump
    def begin_pre(self, parts) -> None:
        """A jump will write `parts`: drop the last pre-jump copy; on disk, copy them all now
        (before anything changes)."""
        self.rows.begin_pre(parts)

    def keep_pre(self, part) -> None:
        """Just before the jump writes `part`: in RAM, copy it now, for a rollback or restore
        (its deltas are freed right after, so RAM never holds both in full)."""
        self.rows.keep_pre(part)

    def pre_of(self, name: str) -> torch.Tensor | None:
        return self.rows.pre_of(name)

    def drop_pre(self) -> None:
        self.rows.drop_pre()

    def keep_best(self, parts) -> None:
        """Keep `parts` as the best state so far (jump="auto"): one more copy of the rank's
        trainable weights, in RAM or in the spill directory."""
        self.rows.keep_best(parts)

    def best_of(self, name: str) -> torch.Tensor | None:
        return self.rows.best_of(name)

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
        """A parameter whose jump is written needs no stored deltas any more (RAM frees them)."""
        self.rows.free(name)

    def memory_bytes(self) -> int:
        """Bytes held in RAM (cycle start, stored deltas, pre-jump copy)."""
        return sum(t.numel() * t.element_size() for t in self.base.values()) + \
            self.rows.memory_bytes()

    def close(self) -> None:
        self.clear_rows()
        self.rows.close()
