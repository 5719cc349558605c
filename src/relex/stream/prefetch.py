"""Read-ahead: the input ranges the pass needs next are asked for before the workers reach them.

Reading overlaps computing: a Prefetcher's thread asks the readers (Reader.prefetch) for each
file's next ranges, 8 MiB per file and request, up to 512 MiB ahead of the furthest worker, so the
kernel reads in large sequential requests while the workers compute; a second pass that the page
cache can hold is not asked for, so meanwhile the disk reads the tensors that follow (up to that
tensor's size further ahead).
"""

from __future__ import annotations

import threading

from relex.stream.trajectory import TensorPlan, Trajectory

#: bytes of each source file asked ahead of use in one request (PREFETCH_WINDOW: how far ahead,
#: in bytes of all sources together); see Prefetcher. Measured on the 0.5B x 30 run (30.6 GB,
#: beyond RAM, page cache dropped; CPU-bound on this shared 2-core machine): RELEX_PREFETCH=off
#: took 0.96x and 1.40x the time with prefetch in two rounds; free (no RSS), so kept.
PREFETCH_CHUNK = 8 << 20
PREFETCH_WINDOW = 512 << 20


class Prefetcher:
    """Asks the readers for the input ranges the pass will need next, ahead of use.

    The engine reads tensors in a known order (each one once, or twice when it does not fit
    the budget); the readers' prefetch() starts reading each file's next range in large requests
    while the current blocks are computed, so reading overlaps computing. Workers report how far
    they got (advance); a thread of its own asks for the ranges up to PREFETCH_WINDOW bytes
    ahead of the furthest worker (see `cache` for second passes). Asking blocks while the disk's
    queue is full: when the workers asked, the 0.5B x 30 embedding's second pass (page cache)
    took 10 s instead of 4 as soon as the disk had the following tensors to read meanwhile.
    """

    def __init__(self, traj: Trajectory, passes: list[tuple[TensorPlan, int]], cache: int,
                 chunk: int = PREFETCH_CHUNK, window: int = PREFETCH_WINDOW):
        self.traj, self.window = traj, window
        # A second pass right after the first reads the page cache when the tensor fits it:
        # nothing to ask the disk for, so while it runs the disk reads the tensors that follow,
        # up to the tensor's size further ahead (on the 0.5B x 30 benchmark the disk sat idle
        # for the 4 s of the embedding's second pass). The cache must then hold the tensor and
        # as much read ahead: a tensor over `cache` bytes (Budget.cache_room: half of what
        # the RAM available to this process leaves beside its budget and window) is asked for
        # again.
        #: (plan name, pass) -> (its first byte in the order of asking, bytes per element)
        self._start: dict[tuple[str, int], tuple[int, int]] = {}
        self._todo: list[tuple[int, TensorPlan, int, int]] = []  # (end byte, plan, a, b)
        pos = 0
        for plan, npass in passes:
            srcs = plan.sources if plan.moves and not plan.factored else (plan.base,)
            per_elem = sum(i.itemsize for i in srcs)
            step = max(1, chunk // max(i.itemsize for i in srcs))
            for k in range(npass):
                self._start[(plan.name, k)] = (pos, per_elem)
                if k and plan.numel * per_elem <= cache:
                    continue
                for a in range(0, plan.numel, step):
                    b = min(a + step, plan.numel)
                    self._todo.append((pos + b * per_elem, plan, a, b))
                pos += plan.numel * per_elem
        self._next = 0
        self._horizon = -1
        self._closed = False
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def advance(self, plan: TensorPlan, npass: int, element: int) -> None:
        """A worker reached `element` of `plan` in pass `npass`: ask for what lies ahead."""
        start = self._start.get((plan.name, npass))
        if start is None:
            return
        horizon = start[0] + element * start[1] + self.window
        with self._wake:
            if horizon > self._horizon:
                self._horizon = horizon
                self._wake.notify()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="relex-prefetch",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        readers = (self.traj.base, *self.traj.checkpoints)
        while True:
            with self._wake:
                while not self._closed and not self._due():
                    self._wake.wait()
                if self._closed:
                    return
                _, p, a, b = self._todo[self._next]
                self._next += 1
            for reader in readers[: len(p.sources) if p.moves and not p.factored else 1]:
                if self._closed:  # each ask can wait on the disk's queue: stop promptly
                    return
                try:
                    reader.prefetch(p.name, a, b)
                except Exception:  # noqa: BLE001, S110 - a hint: the workers' reads report errors
                    pass

    def _due(self) -> bool:
        return self._next < len(self._todo) and self._todo[self._next][0] <= self._horizon

    def close(self) -> None:
        """Stop asking (the pass is over, or failed); returns once the thread has stopped."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

