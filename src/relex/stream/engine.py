"""The streaming pass: Gram matrices in, weighted sums out, one block of every tensor at a time.

Each tensor is cut into blocks of consecutive elements; for each block the base's and every
checkpoint's rows become delta rows D[:, block], reduced to a partial Gram matrix D D^T
(blocks.py). The partials are summed in block order in float64, so results do not depend on
thread timing. The fit then gives W (targets x T), and each output block is base + W @ D[:, block],
cast to the output dtype and written at its place in every output file.

Work runs on a pool of worker threads, each calling single-threaded kernels on buffers small
enough to stay in cache (torch and numba release the GIL inside them; buffers.py). On 2 cores this
beat one thread with 2-way intra-op parallelism, whose spinning OpenMP workers fought the I/O.
A tensor that fits a worker's share of the memory budget is one worker's task, read once; a
larger one is shared by all workers block by block and read twice (budget.py). LoRA runs never
materialise a delta of an adapted weight: its Gram matrix and outputs come from the factors
(factors.py). Reading overlaps computing: a Prefetcher asks for the inputs ahead of the workers
(prefetch.py). Under torchrun each rank runs an Engine over its share of the tensors
(PassPlan.tensors; see torchrun.py).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from relex.errors import RelexError
from relex.stream.blocks import BlockWork
from relex.stream.budget import Budget
from relex.stream.factors import FactorPath, factor_bytes, factor_gram
from relex.stream.plan import PassPlan
from relex.stream.prefetch import PREFETCH_WINDOW, Prefetcher
from relex.stream.trajectory import TensorPlan, Trajectory


@dataclass
class EngineResult:
    grams: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    bytes_read: int = 0
    #: adapter outputs: tensor -> share of the extrapolated delta's Frobenius norm kept, per
    #: target (factors.compress_factors)
    kept: dict[str, list[float]] = field(default_factory=dict)


class Engine:
    """Runs the Gram step and the output step over a Trajectory within a memory budget.

    It receives the pass finished (plan.PassPlan: tensors, targets, fit rule, budget, device,
    threads) and sizes its blocks and buffers from it (budget.Budget); each run() streams the
    whole plan to the writers it is given.
    """

    def __init__(self, traj: Trajectory, plan: PassPlan, block: int | None = None):
        self.traj = traj
        self.pass_plan = plan
        #: blocks, workers, what a worker keeps: sized from the plan (budget.py)
        self.budget = Budget(traj, plan, block)

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

    def run(self, writers: list, progress: Callable[[int], None] | None = None) -> EngineResult:
        """Stream every tensor of the plan; each writer gets one target's tensors via
        write_at(). progress: called with the number of bytes read, from worker threads."""
        result = EngineResult()
        with _pass_settings():
            pool = ThreadPoolExecutor(self.budget.workers, thread_name_prefix="relex",
                                      initializer=partial(torch.set_num_threads, 1))
            try:
                self._stream(pool, writers, result, progress)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # frees the workers' buffers
                if self.budget.device.type == "cuda":  # give the pinned host buffers back
                    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache",
                                    None)
                    (empty or getattr(torch._C, "_host_emptyCache", lambda: None))()
        return result

    def _stream(self, pool: ThreadPoolExecutor, writers: list, result: EngineResult,
                progress: Callable[[int], None] | None) -> None:
        """run() on its pool, with the read-ahead going; the inputs are verified before any
        output is committed."""
        plans, gram_only = self.pass_plan.tensors, self.pass_plan.fit is None
        passes = [(p, self.budget.passes(p, self.pass_plan.grams, gram_only)) for p in plans]
        prefetch = Prefetcher(self.traj, passes, cache=self.budget.cache_room(PREFETCH_WINDOW))
        try:
            if plans:
                prefetch.advance(plans[0], 0, 0)
            # numpy's BLAS threads (the fits) spin after each call; on the 100M benchmark they
            # stole 2 s from the workers: keep them to one thread.
            with threadpool_limits(limits=1, user_api="blas"):
                _Pass(self, pool, prefetch, writers, result, progress).run()
            self.traj.verify()  # before any output is committed
        finally:
            prefetch.close()  # before the pool stops: its asks must end before the files close


class _Pass:
    """One run() of an Engine: which tensors one worker does whole and which all workers share,
    in the plan's order, and what each tensor's Gram matrix, fit and outputs are."""

    def __init__(self, engine: Engine, pool: ThreadPoolExecutor, prefetch: Prefetcher,
                 writers: list, result: EngineResult, progress: Callable[[int], None] | None):
        self.traj, self.plan, self.budget = engine.traj, engine.pass_plan, engine.budget
        self.weights, self.grams = self.plan.fit, self.plan.grams
        self.pool, self.writers, self.result, self.progress = pool, writers, result, progress
        self.lock = threading.Lock()
        self.work = BlockWork(self.traj, self.plan, self.budget, prefetch, self.count)
        self.lora = FactorPath(self.traj, self.budget.block, prefetch, self.count)

    def count(self, nbytes: int) -> None:
        """nbytes more were read (from any thread)."""
        with self.lock:
            self.result.bytes_read += nbytes
            if self.progress:
                self.progress(nbytes)

    def run(self) -> None:
        """Every tensor in the plan's order: each run of tensors that fit a worker goes to the
        pool one tensor per worker; a larger tensor has all workers to itself."""
        plans, i = self.plan.tensors, 0
        while i < len(plans):
            j = i
            while j < len(plans) and self.budget.single(plans[j]):
                j += 1
            if j > i:  # a run of tensors handled one per worker
                for plan, (gram, fit) in zip(plans[i:j], self.pool.map(self._whole, plans[i:j])):
                    self._record(plan, gram, fit)
                i = j
            else:
                self._shared(plans[i])
                i += 1

    def _record(self, plan, gram, fit) -> None:
        """A tensor's Gram matrix (computed, not a saved fit's) and fit statistics."""
        if self.grams is None and gram is not None:
            self.result.grams[plan.name] = gram
        if fit is not None:
            self.result.stats[plan.name] = fit.stats

    def _fit(self, plan: TensorPlan, gram: np.ndarray):
        """The plan's fit rule on a Gram matrix; its weights (K, T) where the outputs are made."""
        fit = self.weights(gram)
        return fit, torch.from_numpy(fit.weights).to(self.budget.device, plan.compute_dtype)

    def _whole(self, plan):
        """One worker: Gram step, fit and output step of one tensor (or a copy)."""
        if plan.factored:
            return self._factored(plan)
        work, writers, weights = self.work, self.writers, self.weights
        blocks = self.budget.blocks(plan)
        if not plan.moves:
            if weights is not None:
                self._grouped(plan, blocks, lambda ab: work.copy_block(plan, *ab, writers))
            return None, None
        if self.grams is not None:
            fit, w = self._fit(plan, self.grams[plan.name])
            self._grouped(plan, blocks, lambda ab: work.emit_block(plan, *ab, None, w, writers))
            return None, fit
        full = work.buffers.resident(plan) if weights is not None else None
        mapped = full is not None and isinstance(full[0], dict)  # rows kept as read
        gram = None
        for part in self._grouped(plan, blocks, lambda ab: work.gram_block(plan, *ab, full),
                                  release=not mapped):
            gram = part if gram is None else gram.add_(part)
        gram = gram.cpu().numpy()
        self._check_finite(plan, gram)
        if weights is None:
            return gram, None
        fit, w = self._fit(plan, gram)
        for a, b in blocks:
            work.emit_block(plan, a, b, full, w, writers)
        if mapped:
            self.traj.release(plan, 0, plan.numel)
        return gram, fit

    def _factored(self, plan):
        """One LoRA'd tensor (or one no checkpoint changes) from its factors alone (factors.py):
        the Gram matrix from r x r products, the outputs formed or compressed from them."""
        left, right, owner = self.lora.factors(plan)
        if self.grams is None:
            gram = factor_gram(left, right, owner, self.traj.T)
            self._check_finite(plan, gram)
        else:
            gram = self.grams[plan.name]
        if self.weights is None:
            return gram, None
        fit = self.weights(gram)
        w = torch.from_numpy(fit.weights)  # (K, T) float64
        if self.plan.lora_rank is None:
            self.lora.merge(plan, left, right, owner, w, self.writers)
        elif left.shape[1]:  # (an unadapted tensor has no adapter entry)
            shares = self.lora.compress(plan, left, right, owner, w, self.writers)
            with self.lock:
                self.result.kept[plan.name] = shares
        self.traj.release(plan, 0, plan.numel)  # the base's range and the factors' mappings
        return gram, fit

    def _shared(self, plan) -> None:
        """All workers share one large tensor's blocks; it is read twice without grams."""
        work, pool = self.work, self.pool
        blocks = self.budget.blocks(plan, parts=self.budget.workers)
        if self.grams is None:
            gram = None
            parts = self._grouped(plan, blocks, lambda ab: work.gram_block(plan, *ab, None), pool)
            for part in parts:
                gram = part.clone() if gram is None else gram.add_(part)
            gram = gram.cpu().numpy()
            self._check_finite(plan, gram)
            if self.weights is None:
                return self._record(plan, gram, None)
        else:
            gram = self.grams[plan.name]
        fit, w = self._fit(plan, gram)
        self._grouped(plan, blocks, lambda ab: work.emit_block(plan, *ab, None, w, self.writers),
                      pool)
        self._record(plan, gram, fit)

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

    def _check_finite(self, plan: TensorPlan, gram: np.ndarray) -> None:
        """A NaN or Inf in the inputs shows on the Gram matrix's diagonal: stop, naming where."""
        if np.isfinite(gram).all():
            return
        bad = [i for i in range(len(gram)) if not np.isfinite(gram[i, i])]
        if len(bad) == len(gram):
            where = f"the base model {self.traj.base.path} (or every checkpoint)"
        else:
            where = ", ".join(str(self.traj.checkpoints[i].path) for i in bad[:3])
        raise RelexError(f"tensor '{plan.name}': NaN or Inf values in {where}; the run diverged "
                         f"or the file is damaged: leave that checkpoint out (--steps)")


@contextmanager
def _pass_settings() -> Iterator[None]:
    """The process as the pass wants it, and as it was afterwards (also when the pass fails):
    torch at one thread (each worker runs single-threaded kernels), Python's cyclic collector
    paused, float32 products in full float32."""
    threads = torch.get_num_threads()
    # The pass makes many short-lived tensor views; Python's cyclic collector then kept
    # walking every object torch created at import (6% of the CPU time of the 100M
    # benchmark). Nothing here creates cycles worth collecting before the pass ends.
    collecting = gc.isenabled()
    restore_precision = _full_float32()
    try:
        gc.disable()
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)
        restore_precision()
        if collecting:
            gc.enable()


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
