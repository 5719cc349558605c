"""How one pass spends its memory budget: block size, worker threads, what a worker may keep.

Per worker the budget holds one block's buffers, the mapped input pages it touches between two
releases of the mapping, and, in what is left (its capacity), one tensor kept resident:

- A tensor whose inputs fit a worker's share of the memory budget is one task: that worker
  reads it once, keeps it (mapped, as stored: bf16 is half the size of float32 deltas), fits
  and writes it, while other workers do other tensors.
- A larger tensor (a 150k x 4k embedding, or any 7B+ layer) is split across all workers block
  by block and read twice, right after itself, so the second read hits the page cache.
- With a saved fit there is no Gram step and every tensor is read once.

On a GPU the buffers live in its memory, so the budget is at most GPU_SHARE of what it has free.
"""

from __future__ import annotations

import os

import torch

from relex.errors import RelexError
from relex.output.model import parse_size
from relex.stream import kernels
from relex.stream.plan import PassPlan
from relex.stream.trajectory import TensorPlan, Trajectory

#: elements per block (T rows of it are processed at once): on the 100M-parameter benchmark
#: 2^17 ran in 6.0 s, 2^16 in 6.5 s, 2^18 in 7.8 s and 2^15 in 7.5 s (noise about 0.3 s)
BLOCK = 1 << 17
#: on a GPU: fewer, larger copies and kernel launches. 1.54B x 10 on an H100, 2 rounds: 2^19
#: took 1.20x the time of 2^21 and 2^23 1.01x.
GPU_BLOCK = 1 << 21
#: at most this many bytes of inputs per GPU block (its rows as stored, gathered in each
#: thread's pinned host buffer, sent in one copy): bounds pinned memory at long windows
GPU_BLOCK_BYTES = 128 << 20
#: host threads feeding a GPU (each gathers its blocks into pinned memory and sends them): on
#: the same run, 1 took 1.62x the time of 4, and 8 0.87x
GPU_WORKERS = 8
#: share of a GPU's free memory its buffers may take (the budget is capped at it)
GPU_SHARE = 0.8
#: smallest block a tensor is split into when it is divided among the workers
MIN_BLOCK = 1 << 12
#: most mapped input bytes a worker touches between two releases of the mapping (bounds the
#: resident set; releasing after every block cost 2 s of TLB shootdowns on the 100M benchmark)
RELEASE_BYTES = 32 << 20

#: fewest elements per block: --max-memory must hold one block of this size per worker
TINY_BLOCK = 64

#: stored dtypes of checkpoint rows the compiled kernels take as they are (kernels.delta_gram,
#: kernels.delta_combine)
_KERNEL_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32}

#: the smallest default --max-memory (bytes)
MIN_DEFAULT_BUDGET = 512 * 10**6


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable: free memory plus the page cache the kernel can
    drop), for the default budget and the prefetcher."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Budget:
    """The sizes of one pass, decided when the engine is built (so a budget too small for one
    block fails before any output exists): the block, the workers, the bytes a worker may keep
    resident (capacity), and per tensor whether it is one worker's task.

    Workers default to torch's thread count on CPU and GPU_WORKERS feeding a GPU; local
    processes (torchrun's ranks on this machine) share its RAM, the read-ahead's page-cache
    room.
    """

    def __init__(self, traj: Trajectory, plan: PassPlan, block: int | None = None):
        #: processes of this run on this machine (torchrun's local ranks), sharing its RAM
        self.local_processes = max(1, plan.local_processes)
        self.device = torch.device(plan.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RelexError("--device cuda: torch sees no CUDA device here")
        self.cpu = self.device.type == "cpu"
        budget, gpu_free = plan.budget, None
        if self.device.type == "cuda":
            # The buffers live on the GPU; host memory holds only mapped input pages, which are
            # released as the pass goes, and each thread's pinned buffer (counted below). So
            # the budget is what the GPU has free, at most.
            gpu_free = torch.cuda.mem_get_info(self.device)[0]
            budget = min(budget, int(gpu_free * GPU_SHARE))
        if plan.workers is not None and plan.workers < 0:
            raise RelexError(f"--threads {plan.workers}: give a positive number of threads")
        self.workers = plan.workers or (torch.get_num_threads() if self.cpu else
                                        min(GPU_WORKERS, os.cpu_count() or 1))
        self.t = t = traj.T
        self.item = 8 if any(p.compute_dtype == torch.float64 for p in traj.plans) else 4
        #: widest stored element of any input (bytes)
        self.stored = max(i.itemsize for p in traj.plans for i in p.sources)
        if block is None:
            block = (BLOCK if self.cpu
                     else min(GPU_BLOCK, GPU_BLOCK_BYTES // ((t + 1) * self.stored)))
        per_elem = self._per_element(plan.targets)
        #: the smallest budget that holds one block per worker (buffers + its mapped inputs)
        self.min_budget = self.workers * TINY_BLOCK * (2 * per_elem + (t + 1) * 8)
        if budget < self.min_budget:
            gpu = ("" if gpu_free is None else
                   f" ({GPU_SHARE:.0%} of the GPU's {gpu_free >> 20} MiB free)")
            raise RelexError(f"--max-memory {budget} bytes{gpu} is below what one block needs "
                             f"here ({t} checkpoints, {self.workers} threads): give at least "
                             f"{-(-self.min_budget // 1000)}KB" + (gpu and ", or free GPU memory"))
        #: the budget in bytes (on a GPU, capped at GPU_SHARE of its free memory)
        self.bytes = budget
        self.block = int(min(block, max(TINY_BLOCK, budget // (2 * self.workers * per_elem))))
        # Mapped input pages count as resident memory until released: part of the budget.
        self.release_bytes = max(self.block * (t + 1) * 8, min(RELEASE_BYTES, budget // 16))
        left = budget - self.workers * (self.block * per_elem + self.release_bytes)
        #: bytes one worker may keep resident for one tensor (its rows and base)
        self.capacity = max(0, left // self.workers)
        self._kernel_dtypes: dict[str, torch.dtype | None] = {}

    def _per_element(self, k: int) -> int:
        """Bytes of a worker's buffers per block element, for K outputs: delta rows, base, K
        outputs, K casts (<= 8 bytes each; where the compiled kernels run, the delta rows are
        not allocated: conservative); to a GPU also the rows as stored, in pinned host memory
        and on the GPU (blocks.BlockWork._fill_gpu)."""
        t = self.t
        per_elem = (t + 1 + k) * self.item + k * 8
        if not self.cpu:
            per_elem += 2 * (t + 1) * self.stored
        return per_elem

    def kernel_rows(self, plan: TensorPlan) -> torch.dtype | None:
        """The dtype in which the compiled kernels take a tensor's checkpoint rows (the stored
        one: bf16 or fp32), or None where torch does the arithmetic (a GPU, float64, fp16 or
        mixed inputs, numba unavailable)."""
        if plan.name not in self._kernel_dtypes:
            stored = {r.dtype for r in plan.rows}
            ok = (self.cpu and plan.moves and not plan.exact
                  and plan.compute_dtype == torch.float32
                  and len(stored) == 1 and next(iter(stored)) in _KERNEL_DTYPES
                  and hasattr(torch, "_foreach_copy_") and kernels.available())
            self._kernel_dtypes[plan.name] = _KERNEL_DTYPES[plan.rows[0].dtype] if ok else None
        return self._kernel_dtypes[plan.name]

    def resident_sizes(self, plan: TensorPlan) -> tuple[int, int]:
        """Bytes of (rows, base) a worker keeps for a tensor it reads once: where the kernels
        take them, the inputs as read (bf16: half of float32 deltas), kept mapped; else the
        float deltas. The base, in the compute dtype, besides."""
        item = plan.compute_dtype.itemsize
        if self.kernel_rows(plan):
            return sum(i.itemsize for i in plan.sources) * plan.numel, plan.numel * item
        return self.t * plan.numel * item, plan.numel * item

    def single(self, plan: TensorPlan) -> bool:
        """Whether one worker handles the whole tensor (else all workers share its blocks)."""
        return (not plan.moves or plan.factored
                or sum(self.resident_sizes(plan)) <= self.capacity)

    def blocks(self, plan: TensorPlan, parts: int = 1) -> list[tuple[int, int]]:
        """Block ranges: at most `block` elements, and at least `parts` blocks when possible."""
        n = plan.numel
        size = min(self.block, max(MIN_BLOCK, -(-n // parts)))
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def passes(self, plan: TensorPlan, grams, gram_only: bool = False) -> int:
        """How many times the pass reads a tensor's inputs (2: over the budget, without grams)."""
        if gram_only:
            return 1 if plan.moves else 0
        return 2 if (grams is None and not self.single(plan)) else 1

    def cache_room(self, window: int) -> int:
        """Bytes of page cache a second pass may count on (Prefetcher's `cache`): half of what
        the RAM available to this process leaves beside its budget and a read-ahead window."""
        room = available_memory() // self.local_processes - self.bytes - window
        return max(0, room) // 2


def default_budget(local_processes: int = 1) -> int:
    """--max-memory when none is given: a quarter of the RAM available now (shared by the
    processes of this node under torchrun), at least 512 MB."""
    return max(MIN_DEFAULT_BUDGET, available_memory() // 4 // max(1, local_processes))


def budget(max_memory: str | int | None, local_processes: int = 1) -> int:
    """The pass's buffer budget in bytes: --max-memory, or the default."""
    return default_budget(local_processes) if max_memory is None else parse_size(max_memory)
