"""Where a cycle's stored rows (one snapshot each) and the pre-jump copy live: RAM or disk.

CycleStore (snapshots.py) does the arithmetic and hands the bytes to one of these two, chosen
once when it is made, through one interface: a row is stored part by part (`open_row`, `put`,
`close_row`, or `abort_row`), `read` gives the finished rows' values over an element range,
`free` drops a parameter's rows once its jump is written, and the pre-jump copy is taken
(`begin_pre`, `keep_pre`), read back (`pre_of`) and dropped (`drop_pre`). What differs is when
the pre-jump copy is taken: RamRows copies each parameter just before the jump writes it, as its
rows are freed, so RAM never holds both in full; DiskRows writes every copy to its file before
anything changes (disk space is not the constraint, and a file is read only once it is closed).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch


class RamRows:
    """Rows and the pre-jump copy in RAM, as tensors in their stored dtype."""

    #: no spill directory
    root = None

    def __init__(self):
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._specs: dict[str, tuple[torch.dtype, int]] = {}
        self._pre: dict[str, torch.Tensor] = {}
        self._best: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ rows
    def open_row(self, specs: list[tuple[str, torch.dtype, int]]) -> None:
        """Start the next row: (name, stored dtype, elements) per parameter."""
        self._specs = {name: (dtype, n) for name, dtype, n in specs}
        self._pending = {}

    def put(self, name: str, lo: int, values: torch.Tensor) -> None:
        """Elements [lo, lo + len(values)) of the open row's parameter `name`."""
        if name not in self._pending:  # one parameter's row at a time, allocated on first use
            dtype, n = self._specs[name]
            self._pending[name] = torch.empty(n, dtype=dtype)
        self._pending[name][lo:lo + values.numel()] = values

    def close_row(self) -> None:
        """The open row is complete: `read` includes it from now on."""
        for name, (dtype, n) in self._specs.items():
            row = self._pending.get(name)  # None for an empty parameter (nothing was put)
            self._rows.setdefault(name, []).append(torch.empty(n, dtype=dtype) if row is None
                                                   else row)
        self._pending = {}

    def abort_row(self) -> None:
        self._pending = {}

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """The finished rows' stored values over [lo, hi), float64 (rows x (hi - lo))."""
        return torch.stack([r[lo:hi] for r in self._rows[name]]).double()

    def free(self, name: str) -> None:
        """`name`'s jump is written: its rows are not needed any more."""
        self._rows[name] = []

    def clear(self) -> None:
        """Drop every row (a new cycle, or a failed one)."""
        self._rows, self._pending = {}, {}

    # ------------------------------------------------------------------ pre-jump copy
    def begin_pre(self, parts) -> None:
        """A jump will write `parts`: the last jump's copy goes (each is copied in keep_pre)."""
        self.drop_pre()

    def keep_pre(self, part) -> None:
        """Copy `part` now, just before the jump writes it."""
        self._pre[part.name] = part.tensor.detach().to("cpu", copy=True)

    def pre_of(self, name: str) -> torch.Tensor | None:
        return self._pre.get(name)

    def drop_pre(self) -> None:
        self._pre = {}

    # ------------------------------------------------------------------ best state
    def keep_best(self, parts) -> None:
        """Copy `parts` as the best state so far (jump="auto"'s slow-decline guard)."""
        self._best = {}
        for part in parts:
            self._best[part.name] = part.tensor.detach().to("cpu", copy=True)

    def best_of(self, name: str) -> torch.Tensor | None:
        return self._best.get(name)

    # ------------------------------------------------------------------ the whole
    def memory_bytes(self) -> int:
        """Bytes of the rows, the pre-jump copy and the best state."""
        held = [r for rows in self._rows.values() for r in rows] + list(self._pre.values()) + \
            list(self._best.values())
        return sum(t.numel() * t.element_size() for t in held)

    def close(self) -> None:
        self.clear()
        self.drop_pre()
        self._best = {}


class DiskRows:
    """Rows and the pre-jump copy as safetensors files in a directory of its own under
    `directory` (two runs may share it): one file per row, written block by block, read back
    range by range; removed after each cycle and jump, and the directory when closed or
    garbage-collected."""

    def __init__(self, directory: str | Path, rank: int = 0):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f"relex-rank{rank}-", dir=directory))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)
        self._files: list = []  # one reader per finished row
        self._writer = None
        self._pre = None  # the pre-jump file's reader, once written
        self._pre_file = None  # its writer while being written
        self._best = None  # the best state's reader (jump="auto")

    # ------------------------------------------------------------------ rows
    def open_row(self, specs: list[tuple[str, torch.dtype, int]]) -> None:
        self._writer = self._create(f"rows/{len(self._files)}", specs)

    def put(self, name: str, lo: int, values: torch.Tensor) -> None:
        self._writer.write_at(name, lo, values)

    def close_row(self) -> None:
        self._writer.close()
        self._writer = None
        self._files.append(_open(self._path(f"rows/{len(self._files)}")))

    def abort_row(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        rows = torch.stack([f.read(name, lo, hi) for f in self._files]).double()
        for f in self._files:  # mapped pages count as this process's memory: drop them
            f.release(name, lo, hi)
        return rows

    def free(self, name: str) -> None:
        """Nothing to free: the rows are on disk (removed with the cycle)."""

    def clear(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        shutil.rmtree(self.root / "rows", ignore_errors=True)

    # ------------------------------------------------------------------ pre-jump copy
    def begin_pre(self, parts) -> None:
        """A jump will write `parts`: every one is copied to disk now, before any changes."""
        self.drop_pre()
        self._pre_file = self._create("pre", [(p.name, p.tensor.dtype, p.tensor.numel())
                                              for p in parts])
        for part in parts:
            self._pre_file.write_at(part.name, 0, part.tensor.detach().to("cpu"))
        self._pre_file.close()
        self._pre_file = None
        self._pre = _open(self._path("pre"))

    def keep_best(self, parts) -> None:
        """Write `parts` as the best state so far (replacing the last one)."""
        if self._best is not None:
            self._best.close()
            self._best = None
        best = self._create("best", [(p.name, p.tensor.dtype, p.tensor.numel()) for p in parts])
        try:
            for part in parts:
                best.write_at(part.name, 0, part.tensor.detach().to("cpu"))
            best.close()
        except BaseException:
            best.abort()
            raise
        self._best = _open(self._path("best"))

    def best_of(self, name: str) -> torch.Tensor | None:
        return _whole(self._best, name)

    def keep_pre(self, part) -> None:
        """Already on disk (begin_pre)."""

    def pre_of(self, name: str) -> torch.Tensor | None:
        return _whole(self._pre, name)

    def drop_pre(self) -> None:
        if self._pre_file is not None:
            self._pre_file.abort()
            self._pre_file = None
        if self._pre is not None:
            self._pre.close()
            self._pre = None
        shutil.rmtree(self.root / "pre", ignore_errors=True)

    # ------------------------------------------------------------------ the whole
    def memory_bytes(self) -> int:
        """Nothing held in RAM (mapped pages are released as they are read)."""
        return 0

    def close(self) -> None:
        self.clear()
        self.drop_pre()
        if self._best is not None:
            self._best.close()
            self._best = None
        self._finalizer()  # removes the directory, once

    def _path(self, what: str) -> Path:
        return self.root / what / "model.safetensors"

    def _create(self, what: str, specs: list[tuple[str, torch.dtype, int]]):
        """A one-file safetensors writer for (name, dtype, elements) specs, in a fresh
        directory `what`."""
        from relex.formats import CODES
        from relex.output.model import ModelWriter
        d = self.root / what
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return ModelWriter(d, [(name, CODES[dtype], (n,)) for name, dtype, n in specs],
                           max_shard_size=1 << 62)


def _whole(reader, name: str) -> torch.Tensor | None:
    """Tensor `name` of a spilled file, read whole into RAM (None: not there)."""
    if reader is None or name not in reader.tensors:
        return None
    got = reader.read(name, 0, reader.tensors[name].numel).clone()
    reader.release(name, 0, got.numel())
    return got


def _open(path: Path):
    """A spilled file for element-range reads: relex's own mapped reader (formats/hf.py), not
    safetensors' get_slice, which took 40 ms per 2^18-element slice of a 30M-element tensor
    (a 30M-parameter jump from 10 spilled rows: 64 s)."""
    from relex.formats.hf import HFReader
    return HFReader(path.parent)
