"""relex's own collectives inside a user's training run (the loop's process group)."""

from __future__ import annotations

import datetime

from relex.errors import RelexError, first_line


class LoopGroup:
    """relex's own collectives inside a user's training run: a gloo group of all ranks with a
    timeout, so a rank that stops answering makes relex give up (and disable itself) instead of
    hanging the run. Small CPU objects and float64 tensors only."""

    def __init__(self, timeout: float):
        import torch.distributed as dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.timeout = timeout
        self.pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))

    @classmethod
    def of_run(cls, timeout: float) -> LoopGroup | None:
        """The group of the training run this process is in, or None for a single process."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(timeout)

    def gather(self, obj) -> list:
        import torch.distributed as dist
        out = [None] * self.size
        self._call(dist.all_gather_object, out, obj, group=self.pg)
        return out

    def sum_(self, tensor):
        """All-reduce (sum) a CPU tensor in place."""
        import torch.distributed as dist
        self._call(dist.all_reduce, tensor, group=self.pg)
        return tensor

    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # a rank died, or did not come within the timeout
            raise RelexError(f"rank {self.rank}: another rank stopped or did not answer within "
                             f"{self.timeout:g} s ({first_line(e)})") from None
