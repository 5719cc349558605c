"""The streaming pass: Gram matrices in, weighted sums out, one block of every tensor at a time.

Each tensor is cut into blocks of consecutive elements. For a block, the rows of the base and of
every observed checkpoint (read through each checkpoint's Reader; zero-copy views of the
memory-mapped files for HF safetensors) become delta rows
D[:, block] = rows - base in float32 (float64 if an input is), reduced to a partial Gram matrix
D D^T; the partials are summed in block order in float64, so results do not depend on thread
timing. The fit then gives W (targets x T), and each output block is base + W @ D[:, block],
cast to the output dtype and written at its place in every output file.

Work runs on a pool of worker threads, each calling single-threaded kernels on buffers small
enough to stay in cache (torch and numba release the GIL inside them). On 2 cores this beat one
thread with 2-way intra-op parallelism, whose spinning OpenMP workers fought the I/O. On CPU,
bf16 and fp32 inputs go through compiled kernels that read the rows where the readers give them
(views of the mapped files: no copy) and make the float32 deltas chunk by chunk in cache, for
the Gram matrix (kernels.delta_gram) and again for the outputs (kernels.delta_combine), so
float32 deltas are never stored; fp16 inputs, float64 and GPUs go through torch, with float
delta rows in buffers. To a GPU, several threads each gather a block's rows as stored into
pinned host memory and send them in one copy; the GPU converts them (_fill_gpu).

A tensor that fits a worker's share of the memory budget is one worker's task, read once; a
larger one is shared by all workers block by block and read twice (budget.py).

LoRA runs never materialise a delta of an adapted weight: its Gram matrix and outputs come from
the factors (factors.py).

Reading overlaps computing: a Prefetcher asks for the inputs ahead of the workers (prefetch.py).
Under torchrun each rank runs an Engine over its share of the tensors (PassPlan.tensors; see
torchrun.py).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from relex.errors import RelexError
from relex.formats import DTYPES
from relex.stream import kernels
from relex.stream.budget import Budget
from relex.stream.factors import FactorPath, factor_bytes, factor_gram
from relex.stream.plan import FitRule, PassPlan
from relex.stream.prefetch import PREFETCH_WINDOW, Prefetcher
from relex.stream.trajectory import TensorPlan, Trajectory


@dataclass
class EngineResult:
    grams: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    bytes_read: int = 0
    #: adapter outputs: tensor -> share of the extrapolated delta's Frobenius norm kept, per
    #: target (compress_factors)
    kept: dict[str, list[float]] = field(default_factory=dict)


class Engine:
    """Runs the Gram step and the output step over a Trajectory within a memory budget.

    It receives the pass finished (plan.PassPlan: tensors, targets, fit rule, budget, device,
    threads) and sizes its blocks and buffers from it (budget.Budget).
    """

    def __init__(self, traj: Trajectory, plan: PassPlan, block: int | None = None):
        self.traj = traj
        self.pass_plan = plan
        #: blocks, workers, what a worker keeps: sized from the plan (budget.py)
        self.budget = Budget(traj, plan, block)
        self.k = plan.targets
        self._local = threading.local()
        self._lock = threading.Lock()
        self._progress: Callable[[int], None] | None = None
        self._prefetch: Prefetcher | None = None

    def bytes_to_read(self) -> int:
        """Bytes run() will read (tensors over the memory budget count twice without a saved
        fit's Gram matrices; the Gram step alone reads every moving tensor once)."""
        grams, gram_only = self.pass_plan.grams, self.pass_plan.fit is None
        total = 0
        for plan in self.pass_plan.tensors:
            if plan.factored:
                total += factor_bytes(self.traj, plan) + (0 if gram_only else plan.base.nbytes)
                continue
            once = sum(i.nbytes for i in plan.sources) if plan.moves else plan.base.nbytes
            total += once * self.budget.passes(plan, grams, gram_only)
        return total

    # ------------------------------------------------------------------ the pass
    def run(self, writers: list, progress: Callable[[int], None] | None = None) -> EngineResult:
        """Stream every tensor of the plan; each writer gets one target's tensors via
        write_at(). progress: called with the number of bytes read, from worker threads."""
        weights, grams = self.pass_plan.fit, self.pass_plan.grams
        result = EngineResult()
        threads = torch.get_num_threads()
        # The pass makes many short-lived tensor views; Python's cyclic collector then kept
        # walking every object torch created at import (6% of the CPU time of the 100M
        # benchmark). Nothing here creates cycles worth collecting before the pass ends.
        collecting = gc.isenabled()
        init = partial(torch.set_num_threads, 1)
        pool = None
        restore_precision = _full_float32()
        try:
            gc.disable()
            init()
            pool = ThreadPoolExecutor(self.budget.workers, thread_name_prefix="relex",
                                      initializer=init)
            self._progress = progress
            plans = self.pass_plan.tensors
            self._twice = grams is None and weights is not None
            passes = [(p, self.budget.passes(p, grams, weights is None)) for p in plans]
            self._prefetch = Prefetcher(self.traj, passes,
                                        cache=self.budget.cache_room(PREFETCH_WINDOW))
            if plans:
                self._prefetch.advance(plans[0], 0, 0)
            # numpy's BLAS threads (the fits) spin after each call; on the 100M benchmark they
            # stole 2 s from the workers: keep them to one thread.
            with threadpool_limits(limits=1, user_api="blas"):
                i = 0
                while i < len(plans):
                    j = i
                    while j < len(plans) and self.budget.single(plans[j]):
                        j += 1
                    if j > i:  # a run of tensors handled one per worker
                        fits = pool.map(lambda p: self._whole(p, weights, writers, grams, result),
                                        plans[i:j])
                        for plan, (gram, fit) in zip(plans[i:j], fits):
                            self._record(plan, gram, fit, grams, result)
                        i = j
                    else:
                        self._shared(plans[i], pool, weights, writers, grams, result)
                        i += 1
            self.traj.verify()  # before any output is committed
        finally:
            if self._prefetch is not None:  # first: its asks must stop before the files close
                self._prefetch.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)  # frees the workers' buffers
            if self.budget.device.type == "cuda":  # give the pinned host buffers back to the OS
                empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
                (empty or getattr(torch._C, "_host_emptyCache", lambda: None))()
            torch.set_num_threads(threads)
            restore_precision()
            if collecting:
                gc.enable()
        return result

    def _record(self, plan, gram, fit, grams, result) -> None:
        if grams is None and gram is not None:
            result.grams[plan.name] = gram
        if fit is not None:
            result.stats[plan.name] = fit.stats

    def _fit(self, plan: TensorPlan, gram: np.ndarray, weights: FitRule):
        fit = weights(gram)
        return fit, torch.from_numpy(fit.weights).to(self.budget.device, plan.compute_dtype)

    def _whole(self, plan, weights, writers, grams, result):
        """One worker: Gram step, fit and output step of one tensor (or a copy)."""
        if plan.factored:
            return self._factored(plan, weights, writers, grams, result)
        blocks = self.budget.blocks(plan)
        if not plan.moves:
            if weights is not None:
                self._grouped(plan, blocks, lambda ab: self._copy_block(plan, *ab,
                                                                        writers, result))
            return None, None
        if grams is not None:
            fit, w = self._fit(plan, grams[plan.name], weights)
            self._grouped(plan, blocks, lambda ab: self._emit_block(plan, *ab, None, w,
                                                                    writers, result))
            return None, fit
        full = self._resident_buffers(plan) if weights is not None else None
        mapped = full is not None and isinstance(full[0], dict)  # rows kept as read
        gram = None
        for part in self._grouped(plan, blocks, lambda ab: self._gram_block(plan, *ab,
                                                                           full, result),
                                  release=not mapped):
            gram = part if gram is None else gram.add_(part)
        gram = gram.cpu().numpy()
        self._check_finite(plan, gram)
        if weights is None:
            return gram, None
        fit, w = self._fit(plan, gram, weights)
        for a, b in blocks:
            self._emit_block(plan, a, b, full, w, writers, result)
        if mapped:
            self.traj.release(plan, 0, plan.numel)
        return gram, fit

    def _factored(self, plan, weights, writers, grams, result):
        """One LoRA'd tensor (or one no checkpoint changes) from its factors alone (factors.py):
        the Gram matrix from r x r products, the outputs formed or compressed from them."""
        path = FactorPath(self.traj, self.budget.block, self._prefetch,
                          lambda nbytes: self._count(nbytes, result))
        left, right, owner = path.factors(plan)
        if grams is None:
            gram = factor_gram(left, right, owner, self.traj.T)
            self._check_finite(plan, gram)
        else:
            gram = grams[plan.name]
        if weights is None:
            return gram, None
        fit = weights(gram)
        w = torch.from_numpy(fit.weights)  # (K, T) float64
        if self.pass_plan.lora_rank is None:
            path.merge(plan, left, right, owner, w, writers)
        elif left.shape[1]:  # (an unadapted tensor has no adapter entry)
            shares = path.compress(plan, left, right, owner, w, writers)
            with self._lock:
                result.kept[plan.name] = shares
        self.traj.release(plan, 0, plan.numel)  # the base's range and the factors' mappings
        return gram, fit

    def _shared(self, plan, pool, weights, writers, grams, result) -> None:
        """All workers share one large tensor's blocks; it is read twice without grams."""
        blocks = self.budget.blocks(plan, parts=self.budget.workers)
        if grams is None:
            gram = None
            parts = self._grouped(plan, blocks, lambda ab: self._gram_block(
                plan, *ab, None, result), pool)
            for part in parts:
                gram = part.clone() if gram is None else gram.add_(part)
            gram = gram.cpu().numpy()
            self._check_finite(plan, gram)
            if weights is None:
                return self._record(plan, gram, None, grams, result)
        else:
            gram = grams[plan.name]
        fit, w = self._fit(plan, gram, weights)
        self._grouped(plan, blocks, lambda ab: self._emit_block(plan, *ab, None, w,
                                                                writers, result), pool)
        self._record(plan, gram, fit, grams, result)

    def _grouped(self, plan: TensorPlan, blocks, fn, pool=None, release: bool = True) -> list:
        """fn over the blocks (on the pool if given), results in block order; the inputs are
        unmapped each time the blocks done reach another release_bytes of them (if release)."""
        per_elem = sum(i.itemsize for i in plan.sources) if plan.moves else plan.base.itemsize
        size = blocks[0][1] - blocks[0][0] if blocks else 1
        group = max(1, self.budget.release_bytes // (per_elem * size))
        # Submitting everything at once keeps the workers busy while finished groups are
        # released; they take blocks in order, so only about one group is mapped at a time.
        futures = [pool.submit(fn, ab) for ab in blocks] if pool else None
        out = []
        for g in range(0, len(blocks), group):
            part = blocks[g: g + group]
            if futures:
                out += [f.result() for f in futures[g: g + group]]
            else:
                out += [fn(ab) for ab in part]
            if release:
                self.traj.release(plan, part[0][0], part[-1][1], None if plan.moves else 1)
        return out

    # ------------------------------------------------------------------ buffers
    def _resident_buffers(self, plan: TensorPlan):
        """This worker's (rows, base [n]) for a tensor it keeps resident. rows: for the kernels
        a dict, block start -> the T rows as read (views of the mapped files stay mapped until
        the tensor is written: nothing is copied); else the float delta rows [T n]."""
        sizes, kernel_rows = self.budget.resident_sizes, self.budget.kernel_rows
        rows_bytes, base_bytes = sizes(plan)
        base = self._resident_buffer("base", base_bytes, lambda p: sizes(p)[1])
        base = base.view(plan.compute_dtype)
        if kernel_rows(plan):
            return {}, base
        # Block-major: block [a, b) holds its T rows contiguously at [T a, T b), so every
        # block is a contiguous (T, b - a) matrix (see _rows).
        deltas = self._resident_buffer("deltas", rows_bytes,
                                       lambda p: 0 if kernel_rows(p) else sizes(p)[0])
        return deltas.view(plan.compute_dtype), base

    def _resident_buffer(self, what: str, nbytes: int, size_of) -> torch.Tensor:
        """nbytes of this worker's buffer `what`, allocated once for the largest resident
        tensor (size_of(plan): its bytes)."""
        bufs = self._local.__dict__.setdefault("resident", {})
        buf = bufs.get(what)
        if buf is None or buf.numel() < nbytes:
            bufs[what] = None  # free the old one first
            biggest = max(size_of(p) for p in self.pass_plan.tensors
                          if p.moves and self.budget.single(p))
            bufs[what] = buf = torch.empty(max(biggest, nbytes), dtype=torch.uint8,
                                           device=self.budget.device)
        return buf[:nbytes]

    def _rows(self, full, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (rows, base) of block [a, b) of a resident tensor, both contiguous.

        Contiguous matters: the compiled kernel and numpy take C-contiguous rows without a
        copy."""
        t = self.traj.T
        return full[0][t * a: t * b].view(t, b - a), full[1][a:b]

    def _local_buffer(self, what: str, dt: torch.dtype, m: int, rows: int = 1) -> torch.Tensor:
        """This worker's (rows, m) buffer `what` of dtype dt (allocated once, for a whole
        block): 'delta' rows, 'base', 'out'puts. Contiguous: see _rows."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        key = (what, dt)
        if key not in bufs:
            bufs[key] = torch.empty(rows * self.budget.block, dtype=dt, device=self.budget.device)
        return bufs[key][: rows * m].view(rows, m)

    def _rows_buffer(self, what: str, dt: torch.dtype, m: int, rows: int,
                     host: bool) -> torch.Tensor:
        """This worker's (rows, m) buffer of inputs as stored (dtype dt), for _fill_gpu: one
        allocation for every dtype (the widest), in pinned host memory (host, where the
        device is a GPU) or on the device."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        if what not in bufs:
            size = (self.traj.T + 1) * self.budget.block * self.budget.stored
            bufs[what] = (torch.empty(size, dtype=torch.uint8,
                                      pin_memory=self.budget.device.type == "cuda") if host
                          else torch.empty(size, dtype=torch.uint8, device=self.budget.device))
        return bufs[what][: rows * m * dt.itemsize].view(dt).view(rows, m)

    # ------------------------------------------------------------------ per block (workers)
    def _sources(self, plan, a, b, result, npass: int = 0) -> list[torch.Tensor]:
        """Elements [a, b) of the base and every checkpoint as the readers give them (views of
        the mapped files for safetensors), read ahead by the prefetcher and counted."""
        self._prefetch.advance(plan, npass, a)
        src = [self.traj.read(plan, s, a, b) for s in range(len(plan.sources))]
        self._count(sum(i.itemsize for i in plan.sources) * (b - a), result)
        return src

    def _read(self, plan, a, b, base, result, npass: int = 0) -> list[torch.Tensor]:
        """_sources with the base copied into `base`: the checkpoints' rows."""
        src = self._sources(plan, a, b, result, npass)
        base.copy_(src[0])
        return src[1:]

    def _torch_buffers(self, plan, a, b, full) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta rows, base) of block [a, b) on the torch path: the resident tensor's, else
        this worker's buffers."""
        if full is not None:
            return self._rows(full, a, b)
        dt, m = plan.compute_dtype, b - a
        return (self._local_buffer("delta", dt, m, self.traj.T),
                self._local_buffer("base", dt, m)[0])

    def _fill(self, plan, a, b, d, base, result, npass: int = 0,
              gram: bool = False) -> torch.Tensor | None:
        """The torch path (where the kernels do not apply): d = rows - base for elements
        [a, b); returns the Gram matrix of d (float64) if gram."""
        if plan.exact:
            self._fill_exact(plan, a, b, d, base, result, npass)
        elif not self.budget.cpu:
            self._fill_gpu(plan, a, b, d, base, result, npass)
        else:
            self._subtract(d, self._read(plan, a, b, base, result, npass), base)
        if not gram:
            return None
        if self.budget.cpu:
            return torch.from_numpy(kernels.gram(d.numpy()))
        return (d @ d.T).to(torch.float64)

    def _fill_exact(self, plan, a, b, d, base, result, npass: int) -> None:
        """_fill where some reader gives its delta itself (LoRA: scaling * B @ A in d's dtype,
        never rounded to the base's dtype): d[t] = that delta, or rows - base for checkpoints
        read whole (a run mixing merged exports with adapters)."""
        self._prefetch.advance(plan, npass, a)
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
        self._count(nbytes, result)

    def _fill_gpu(self, plan, a, b, d, base, result, npass: int) -> None:
        """_fill to a GPU: the block's base and checkpoint rows, as stored, are gathered into
        this worker's pinned host buffer and sent in one copy; the GPU converts them and makes
        the deltas. (A copy_ from pageable memory to the GPU that also converts does the
        conversion on the CPU, and each such copy is staged by the driver.)"""
        src = self._sources(plan, a, b, result, npass)
        m, dts = b - a, {r.dtype for r in src}
        if len(dts) == 1 and hasattr(torch, "_foreach_copy_"):
            host = self._rows_buffer("host", src[0].dtype, m, len(src), host=True)
            torch._foreach_copy_(list(host.unbind(0)), src)
            stage = self._rows_buffer("stage", src[0].dtype, m, len(src), host=False)
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

    def _count(self, nbytes: int, result: EngineResult) -> None:
        with self._lock:
            result.bytes_read += nbytes
            if self._progress:
                self._progress(nbytes)

    def _read_as_is(self, plan, a, b, base, kdt, result, npass: int = 0) -> list[torch.Tensor]:
        """_read for the kernels: the rows where they lie (no copy); a row in another dtype or
        layout than they take is converted."""
        rows = self._read(plan, a, b, base, result, npass)
        for s, r in enumerate(rows):  # the kernels do not check bounds: never hand them less
            if r.numel() != b - a:
                raise RelexError(f"tensor '{plan.name}': {self.traj.checkpoints[s].path} gave "
                                 f"{r.numel()} elements for [{a}, {b}); the file is damaged")
        return [r if r.dtype == kdt and r.is_contiguous() else r.to(kdt).contiguous()
                for r in rows]

    def _gram_block(self, plan, a, b, full, result) -> torch.Tensor:
        kdt, m = self.budget.kernel_rows(plan), b - a
        if kdt is None:  # torch: float delta rows in a buffer
            d, base = self._torch_buffers(plan, a, b, full)
            return self._fill(plan, a, b, d, base, result, gram=True)
        base = full[1][a:b] if full is not None else self._local_buffer("base", torch.float32,
                                                                        m)[0]
        rows = self._read_as_is(plan, a, b, base, kdt, result)
        if full is not None:
            full[0][a] = rows  # until the output step
        return torch.from_numpy(kernels.delta_gram(_addresses(rows), base.numpy(),
                                                   kdt == torch.bfloat16))

    def _emit_block(self, plan, a, b, full, w, writers, result) -> None:
        kdt, m = self.budget.kernel_rows(plan), b - a
        out = self._local_buffer("out", plan.compute_dtype, m, self.k)
        npass = 1 if self._twice and not self.budget.single(plan) else 0
        if kdt is None:
            d, base = self._torch_buffers(plan, a, b, full)
            if full is None:
                self._fill(plan, a, b, d, base, result, npass)
            if plan.name in self.pass_plan.delta_out:
                torch.mm(w, d, out=out)
            else:
                torch.addmm(base, w, d, out=out)
        else:
            if full is not None:
                rows, base = full[0].pop(a), full[1][a:b]
            else:
                base = self._local_buffer("base", torch.float32, m)[0]
                rows = self._read_as_is(plan, a, b, base, kdt, result, npass)
            kernels.delta_combine(_addresses(rows), base.numpy(), w.numpy(), out.numpy(),
                                  kdt == torch.bfloat16)
        code = DTYPES[self.pass_plan.delta_out.get(plan.name, plan.out_dtype)]
        for k, writer in enumerate(writers):
            writer.write_at(plan.name, a, out[k].to(code))

    def _copy_block(self, plan, a, b, writers, result) -> None:
        self._prefetch.advance(plan, 0, a)
        row = self.traj.read(plan, 0, a, b)
        for writer in writers:
            writer.write_at(plan.name, a, row)
        self._count(plan.base.itemsize * (b - a), result)

    def _check_finite(self, plan: TensorPlan, gram: np.ndarray) -> None:
        if np.isfinite(gram).all():
            return
        bad = [i for i in range(len(gram)) if not np.isfinite(gram[i, i])]
        if len(bad) == len(gram):
            where = f"the base model {self.traj.base.path} (or every checkpoint)"
        else:
            where = ", ".join(str(self.traj.checkpoints[i].path) for i in bad[:3])
        raise RelexError(f"tensor '{plan.name}': NaN or Inf values in {where}; the run diverged "
                         f"or the file is damaged: leave that checkpoint out (--steps)")


def _full_float32() -> Callable[[], None]:
    """Make float32 matrix products full float32 for the pass; returns what restores the
    caller's setting. A training script's TF32 (10-bit mantissas: transformers' tf32=True,
    set_float32_matmul_precision("high")) reached the Gram product on an H100
    (benchmarks/tf32_probe.py); oneDNN may take bf16 on CPUs. torch >= 2.9 has per-backend
    settings, and its legacy getter raises once they are used, so those go first."""
    knobs = [getattr(getattr(torch.backends, b, None), "matmul", None) for b in ("cuda", "mkldnn")]
    try:
        before = [k.fp32_precision for k in knobs]
    except AttributeError:  # torch < 2.9
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        return lambda: torch.set_float32_matmul_precision(legacy)
    for k in knobs:
        k.fp32_precision = "ieee"

    def restore() -> None:
        for k, value in zip(knobs, before):
            k.fp32_precision = value
    return restore


def _addresses(rows: list[torch.Tensor]) -> np.ndarray:
    """Where each row's data starts, for the kernels (the tensors must outlive the call)."""
    return np.fromiter((r.data_ptr() for r in rows), np.int64, len(rows))
