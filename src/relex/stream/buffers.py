"""Each worker's buffers, allocated once per thread and reused for every block and tensor.

Buffers are thread-local: workers never share one, and they go with the worker threads when the
pass ends. Each is sized once for the largest use in the pass (a whole block, the largest tensor
a worker keeps resident), so nothing is allocated per block. All are contiguous: the compiled
kernels and numpy take C-contiguous rows without a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from relex.stream.budget import Budget
from relex.stream.trajectory import TensorPlan

#: a worker's rows and base of a tensor it keeps resident (see WorkerBuffers.resident)
Resident = tuple[dict | torch.Tensor, torch.Tensor]


class WorkerBuffers:
    """The buffers of the calling worker thread, for a pass over `tensors` sized by `budget`."""

    def __init__(self, budget: Budget, tensors: list[TensorPlan]):
        self.budget, self.tensors = budget, tensors
        self._local = threading.local()

    def resident(self, plan: TensorPlan) -> Resident:
        """This worker's (rows, base [n]) for a tensor it keeps resident. rows: for the kernels
        a dict, block start -> the T rows as read (views of the mapped files stay mapped until
        the tensor is written: nothing is copied); else the float delta rows [T n]."""
        sizes, kernel_rows = self.budget.resident_sizes, self.budget.kernel_rows
        rows_bytes, base_bytes = sizes(plan)
        base = self._resident("base", base_bytes, lambda p: sizes(p)[1])
        base = base.view(plan.compute_dtype)
        if kernel_rows(plan):
            return {}, base
        # Block-major: block [a, b) holds its T rows contiguously at [T a, T b), so every
        # block is a contiguous (T, b - a) matrix (see block_of).
        deltas = self._resident("deltas", rows_bytes,
                                lambda p: 0 if kernel_rows(p) else sizes(p)[0])
        return deltas.view(plan.compute_dtype), base

    def _resident(self, what: str, nbytes: int,
                  size_of: Callable[[TensorPlan], int]) -> torch.Tensor:
        """nbytes of this worker's buffer `what`, allocated once for the largest resident
        tensor (size_of(plan): its bytes)."""
        bufs = self._local.__dict__.setdefault("resident", {})
        buf = bufs.get(what)
        if buf is None or buf.numel() < nbytes:
            bufs[what] = None  # free the old one first
            biggest = max(size_of(p) for p in self.tensors if p.moves and self.budget.single(p))
            bufs[what] = buf = torch.empty(max(biggest, nbytes), dtype=torch.uint8,
                                           device=self.budget.device)
        return buf[:nbytes]

    def block_of(self, full: Resident, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (delta rows, base) of block [a, b) of a resident tensor, both contiguous."""
        t = self.budget.t
        return full[0][t * a: t * b].view(t, b - a), full[1][a:b]

    def local(self, what: str, dt: torch.dtype, m: int, rows: int = 1) -> torch.Tensor:
        """This worker's (rows, m) buffer `what` of dtype dt (allocated once, for a whole
        block): 'delta' rows, 'base', 'out'puts."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        key = (what, dt)
        if key not in bufs:
            bufs[key] = torch.empty(rows * self.budget.block, dtype=dt, device=self.budget.device)
        return bufs[key][: rows * m].view(rows, m)

    def as_stored(self, what: str, dt: torch.dtype, m: int, rows: int,
                  host: bool) -> torch.Tensor:
        """This worker's (rows, m) buffer of inputs as stored (dtype dt), for feeding a GPU
        (blocks.BlockWork._fill_gpu): one allocation for every dtype (the widest), in pinned
        host memory (host, where the device is a GPU) or on the device."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        if what not in bufs:
            size = (self.budget.t + 1) * self.budget.block * self.budget.stored
            bufs[what] = (torch.empty(size, dtype=torch.uint8,
                                      pin_memory=self.budget.device.type == "cuda") if host
                          else torch.empty(size, dtype=torch.uint8, device=self.budget.device))
        return bufs[what][: rows * m * dt.itemsize].view(dt).view(rows, m)

    def deltas(self, plan: TensorPlan, a: int, b: int,
               full: Resident | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta rows, base) of block [a, b) on the torch path: the resident tensor's, else
        this worker's block buffers."""
        if full is not None:
            return self.block_of(full, a, b)
        dt, m = plan.compute_dtype, b - a
        return self.local("delta", dt, m, self.budget.t), self.local("base", dt, m)[0]
