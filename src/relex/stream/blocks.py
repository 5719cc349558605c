"""One block of one tensor in a worker: rows read, made into deltas, a Gram matrix or outputs.

For a block, the rows of the base and of every observed checkpoint (read through each
checkpoint's Reader; zero-copy views of the memory-mapped files for HF safetensors) become delta
rows D[:, block] = rows - base in float32 (float64 if an input is), reduced to a partial Gram
matrix D D^T (gram_block); once the tensor is fitted, each output block is base + W @ D[:, block],
cast to the output dtype and written at its place in every output file (emit_block).

On CPU, bf16 and fp32 inputs go through compiled kernels that read the rows where the readers
give them (views of the mapped files: no copy) and make the float32 deltas chunk by chunk in
cache, for the Gram matrix (kernels.delta_gram) and again for the outputs
(kernels.delta_combine), so float32 deltas are never stored; fp16 inputs, float64 and GPUs go
through torch, with float delta rows in buffers (_fill). To a GPU, several threads each gather a
block's rows as stored into pinned host memory and send them in one copy; the GPU converts them
(_fill_gpu). Where a reader gives a delta itself (the other tensors of a LoRA run: lora_B
biases, modules_to_save), the torch path takes it exact (_fill_exact).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from relex.errors import RelexError
from relex.formats import DTYPES
from relex.stream import kernels
from relex.stream.budget import Budget
from relex.stream.buffers import Resident, WorkerBuffers
from relex.stream.plan import PassPlan
from relex.stream.prefetch import Prefetcher
from relex.stream.trajectory import TensorPlan, Trajectory


class BlockWork:
    """The per-block steps of one pass, called from the worker threads.

    Each reads through the prefetcher (which it tells how far it got) and reports the bytes it
    read to count(nbytes). `full` is the worker's resident tensor (WorkerBuffers.resident) when
    it keeps the whole tensor, else None: the block is read into the worker's block buffers."""

    def __init__(self, traj: Trajectory, plan: PassPlan, budget: Budget, prefetch: Prefetcher,
                 count: Callable[[int], None]):
        self.traj, self.pass_plan, self.budget = traj, plan, budget
        self.prefetch, self.count = prefetch, count
        self.buffers = WorkerBuffers(budget, plan.tensors)
        #: without saved Gram matrices, a tensor over the budget is read again for its outputs
        self.twice = plan.grams is None and plan.fit is not None

    def gram_block(self, plan: TensorPlan, a: int, b: int,
                   full: Resident | None) -> torch.Tensor:
        """The partial Gram matrix (float64) of elements [a, b); a resident tensor keeps its
        rows (as read, or as delta rows) until the output step."""
        kdt, m = self.budget.kernel_rows(plan), b - a
        if kdt is None:  # torch: float delta rows in a buffer
            d, base = self.buffers.deltas(plan, a, b, full)
            return self._fill(plan, a, b, d, base, gram=True)
        base = full[1][a:b] if full is not None else self.buffers.local("base", torch.float32,
                                                                        m)[0]
        rows = self._read_as_is(plan, a, b, base, kdt)
        if full is not None:
            full[0][a] = rows  # until the output step
        return torch.from_numpy(kernels.delta_gram(_addresses(rows), base.numpy(),
                                                   kdt == torch.bfloat16))

    def emit_block(self, plan: TensorPlan, a: int, b: int, full: Resident | None,
                   w: torch.Tensor, writers: list) -> None:
        """Elements [a, b) of every output (base + W @ D, or W @ D for a delta output), written
        by each target's writer. w: (K, T) in the compute dtype."""
        kdt, m = self.budget.kernel_rows(plan), b - a
        out = self.buffers.local("out", plan.compute_dtype, m, self.pass_plan.targets)
        npass = 1 if self.twice and not self.budget.single(plan) else 0
        if kdt is None:
            d, base = self.buffers.deltas(plan, a, b, full)
            if full is None:
                self._fill(plan, a, b, d, base, npass)
            if plan.name in self.pass_plan.delta_out:
                torch.mm(w, d, out=out)
            else:
                torch.addmm(base, w, d, out=out)
        else:
            if full is not None:
                rows, base = full[0].pop(a), full[1][a:b]
            else:
                base = self.buffers.local("base", torch.float32, m)[0]
                rows = self._read_as_is(plan, a, b, base, kdt, npass)
            kernels.delta_combine(_addresses(rows), base.numpy(), w.numpy(), out.numpy(),
                                  kdt == torch.bfloat16)
        code = DTYPES[self.pass_plan.delta_out.get(plan.name, plan.out_dtype)]
        for k, writer in enumerate(writers):
            writer.write_at(plan.name, a, out[k].to(code))

    def copy_block(self, plan: TensorPlan, a: int, b: int, writers: list) -> None:
        """Elements [a, b) of a tensor no checkpoint changes, copied from the base."""
        self.prefetch.advance(plan, 0, a)
        row = self.traj.read(plan, 0, a, b)
        for writer in writers:
            writer.write_at(plan.name, a, row)
        self.count(plan.base.itemsize * (b - a))

    def _sources(self, plan, a, b, npass: int = 0) -> list[torch.Tensor]:
        """Elements [a, b) of the base and every checkpoint as the readers give them (views of
        the mapped files for safetensors), read ahead by the prefetcher and counted."""
        self.prefetch.advance(plan, npass, a)
        src = [self.traj.read(plan, s, a, b) for s in range(len(plan.sources))]
        self.count(sum(i.itemsize for i in plan.sources) * (b - a))
        return src

    def _read(self, plan, a, b, base, npass: int = 0) -> list[torch.Tensor]:
        """_sources with the base copied into `base`: the checkpoints' rows."""
        src = self._sources(plan, a, b, npass)
        base.copy_(src[0])
        return src[1:]

    def _read_as_is(self, plan, a, b, base, kdt, npass: int = 0) -> list[torch.Tensor]:
        """_read for the kernels: the rows where they lie (no copy); a row in another dtype or
        layout than they take is converted."""
        rows = self._read(plan, a, b, base, npass)
        for s, r in enumerate(rows):  # the kernels do not check bounds: never hand them less
            if r.numel() != b - a:
                raise RelexError(f"tensor '{plan.name}': {self.traj.checkpoints[s].path} gave "
                                 f"{r.numel()} elements for [{a}, {b}); the file is damaged")
        return [r if r.dtype == kdt and r.is_contiguous() else r.to(kdt).contiguous()
                for r in rows]

    def _fill(self, plan, a, b, d, base, npass: int = 0,
              gram: bool = False) -> torch.Tensor | None:
        """The torch path (where the kernels do not apply): d = rows - base for elements
        [a, b); returns the Gram matrix of d (float64) if gram."""
        if plan.exact:
            self._fill_exact(plan, a, b, d, base, npass)
        elif not self.budget.cpu:
            self._fill_gpu(plan, a, b, d, base, npass)
        else:
            self._subtract(d, self._read(plan, a, b, base, npass), base)
        if not gram:
            return None
        if self.budget.cpu:
            return torch.from_numpy(kernels.gram(d.numpy()))
        return (d @ d.T).to(torch.float64)

    def _fill_exact(self, plan, a, b, d, base, npass: int) -> None:
        """_fill where some reader gives its delta itself (LoRA: scaling * B @ A in d's dtype,
        never rounded to the base's dtype): d[t] = that delta, or rows - base for checkpoints
        read whole (a run mixing merged exports with adapters)."""
        self.prefetch.advance(plan, npass, a)
        base.copy_(self.traj.read(plan, 0, a, b))
        nbytes = plan.base.itemsize * (b - a)
        for t, (ckpt, kind) in enumerate(zip(self.traj.checkpoints, plan.kinds)):
            if kind == "zero":
                d[t].zero_()
                continue
            if kind == "full":
                d[t].copy_(ckpt.read(plan.name, a, b))
                d[t].sub_(base)
            else:
                d[t].copy_(ckpt.delta(plan.name, a, b, d.dtype))
            nbytes += plan.rows[t].itemsize * (b - a)
        self.count(nbytes)

    def _fill_gpu(self, plan, a, b, d, base, npass: int) -> None:
        """_fill to a GPU: the block's base and checkpoint rows, as stored, are gathered into
        this worker's pinned host buffer and sent in one copy; the GPU converts them and makes
        the deltas. (A copy_ from pageable memory to the GPU that also converts does the
        conversion on the CPU, and each such copy is staged by the driver.)"""
        src = self._sources(plan, a, b, npass)
        m, dts = b - a, {r.dtype for r in src}
        if len(dts) == 1 and hasattr(torch, "_foreach_copy_"):
            host = self.buffers.as_stored("host", src[0].dtype, m, len(src), host=True)
            torch._foreach_copy_(list(host.unbind(0)), src)
            stage = self.buffers.as_stored("stage", src[0].dtype, m, len(src), host=False)
            stage.copy_(host)  # synchronous: the host buffer is refilled for the next block
            base.copy_(stage[0])
            torch.sub(stage[1:], base, out=d)
        else:  # mixed dtypes (a bf16 base with fp32 checkpoints): row by row
            base.copy_(src[0])
            self._subtract(d, src[1:], base)

    def _subtract(self, d, rows, base) -> None:
        """d = rows - base (the rows converted into d first)."""
        if self.budget.cpu and hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(list(d.unbind(0)), rows)  # one call converts every row
        else:  # (to a GPU: a copy that also converts is done row by row)
            for t, row in enumerate(rows):
                d[t].copy_(row)
        d.sub_(base)


def _addresses(rows: list[torch.Tensor]) -> np.ndarray:
    """Where each row's data starts, for the kernels (the tensors must outlive the call)."""
    return np.fromiter((r.data_ptr() for r in rows), np.int64, len(rows))
