"""Many processes, many nodes: `torchrun --nproc-per-node N [--nnodes M ...] -m relex extrapolate`.

Ranks split the tensors by bytes (a tensor is never split across ranks: each rank runs the
ordinary engine on its share, so every output byte is computed exactly as one process computes
it, and no Gram matrix needs an all-reduce). Rank 0 creates the temporary output directory and
every shard file with its header; the others open the same files (every rank plans the identical
shard layout from the same headers) and pwrite their tensors at their planned offsets. Rank 0
then gathers the Gram matrices and statistics, writes the index, configs, provenance and the fit
file, and renames the directory into place: the atomic rename still holds.

Failure handling: ranks first all-gather a fingerprint of their arguments and inputs (and fail
together when they differ); every later step exchanges a status, so an error on one rank stops
all of them with that rank's one-line message; a rank that dies breaks the group's connections
(gloo reports it at the next collective), collectives time out after RELEX_DIST_TIMEOUT seconds
(default 1800), and SIGTERM (torchrun stopping the survivors) unwinds normally so the temporary
directory is removed. gloo carries the small metadata; with --device cuda the group also has
NCCL for cuda tensors (one GPU per rank: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal

from relex.errors import RelexError, first_line

#: seconds a collective waits for the slowest rank (its share of the work included)
DEFAULT_TIMEOUT = 1800


class Group:
    """The ranks of this run (a single process is a group of one)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except RelexError:
            raise
        except Exception as e:  # a rank died or timed out
            raise RelexError(f"torch.distributed rank {self.rank}: another rank stopped or did "
                             f"not answer ({first_line(e, 200)}); nothing was written") from None
        return out

    def check(self, error: str | None, what: str) -> None:
        """Exchange every rank's status; raise on all ranks when any rank failed."""
        statuses = self.all_gather(error)
        bad = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if bad:
            r, s = bad[0]
            raise RelexError(s if r == self.rank else f"rank {r} failed {what}: {s}")

    def attempt(self, what: str, fn):
        """fn() on every rank; an error on any rank stops all of them with one line (a group
        of one just runs fn)."""
        if self.size == 1:
            return fn()
        out, error = None, None
        try:
            out = fn()
        except RelexError as e:
            error = f"rank {self.rank}: {e}"
        except Exception as e:  # noqa: BLE001 - reported on every rank, one line
            error = f"rank {self.rank}: {type(e).__name__}: {first_line(e, 200)}"
        self.check(error, what)
        return out

    def broadcast(self, obj, src: int = 0):
        return self.all_gather(obj)[src] if self.size > 1 else obj

    def close(self, ok: bool = False) -> None:
        """Leave the group. After a run that succeeded on every rank, wait for all of them first:
        a rank that tears its connections down while another still finishes can make gloo
        abort that other rank's teardown."""
        if self.size > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                if ok:
                    dist.barrier()
                dist.destroy_process_group()


_GROUP: Group | None = None


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1): the one place
    relex reads torchrun's environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device: str = "cpu") -> Group:
    """This run's group, decided once per process at the entry point (the CLI, or a public
    function called without a group): the torchrun world when launched by torchrun (the
    process group is created on first use), else a group of one."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if not launched():
        _GROUP = Group()
        return _GROUP
    import torch
    import torch.distributed as dist
    size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    timeout = datetime.timedelta(seconds=float(os.environ.get("RELEX_DIST_TIMEOUT",
                                                              DEFAULT_TIMEOUT)))
    backend = "gloo"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RelexError("--device cuda: torch sees no CUDA device here")
        if max(local + 1, local_size) > torch.cuda.device_count():  # every local rank stops
            raise RelexError(f"--device cuda takes one GPU per rank: {local_size} ranks on this "
                             f"node, but torch sees {torch.cuda.device_count()} GPU(s); give "
                             f"torchrun --nproc-per-node {torch.cuda.device_count()} at most")
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except Exception as e:
        raise RelexError(f"torch.distributed: could not join the group of {size} ranks "
                         f"({first_line(e, 200)})") from None
    # torchrun stops the surviving ranks with SIGTERM when one fails: unwind like Ctrl-C so
    # the temporary output directory is removed.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)
    _GROUP = Group(rank, size, local, local_size)
    return _GROUP


def _terminate(signum, frame):
    raise KeyboardInterrupt


def reset(ok: bool = False) -> None:
    """Leave the group (end of a distributed run); ok: every rank finished the run."""
    global _GROUP
    if _GROUP is not None:
        _GROUP.close(ok)
    _GROUP = None


def device_of(device: str, g: Group) -> str:
    """One GPU per rank under torchrun: plain 'cuda' becomes cuda:LOCAL_RANK."""
    return f"cuda:{g.local_rank}" if device == "cuda" and g.size > 1 else device


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_same(g: Group, args: dict) -> None:
    """Fail on every rank, with one line, when the ranks were given different arguments or see
    different inputs."""
    if g.size == 1:
        return
    mine = fingerprint(args)
    prints = g.all_gather(mine)
    if len(set(prints)) > 1:
        odd = [r for r, p in enumerate(prints) if p != prints[0]]
        raise RelexError(f"torch.distributed: ranks disagree on arguments or inputs (rank "
                         f"{odd[0]} differs from rank 0); give every rank the same command "
                         f"line and the same files")


def split(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each item: largest first onto the least-loaded rank (ties: lowest index),
    so every rank computes the same split."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner
