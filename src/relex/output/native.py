"""Write a target into a copy of the run's own last checkpoint (--output-format native).

Every trainer can resume from its own checkpoint; only relex's in-loop hooks keep Adam's moments,
the LR schedule, the data order and the RNG across a jump. Native output gives the same to any
trainer relex reads: `step-S/` holds a copy of the last observed step directory (under its own
name, beside the trainer's "latest" pointer files), whose model weights are the extrapolated
ones, written at the byte offsets the formats already know (formats' `places`: every copy of a
tensor: each rank's replica, an HF export beside the shards, DeepSpeed's fp32 masters). Nothing
else changes: the step counter stays the last real step N, as in the loop.

Files are copied with copy_file_range, which shares the data blocks on filesystems that can
(btrfs, XFS: a reflink), and copies them elsewhere; never hard-linked, since a trainer that
rewrote a linked file in place would modify the input run.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from relex import formats
from relex.checkpoints.discover import LAYOUTS
from relex.errors import RelexError
from relex.formats import DTYPES
from relex.formats.base import numel
from relex.formats.checksums import crc32
from relex.formats.chunked import Chunk, Place
from relex.formats.unpickler import Storage
from relex.output.model import pwrite_all

#: files beside a step directory through which trainers find their latest checkpoint (verl,
#: Megatron: latest_checkpointed_iteration.txt; DeepSpeed / OpenRLHF: latest); copied as they
#: are, since the output keeps the step number N
POINTERS = ("latest_checkpointed_iteration.txt", "latest")
MEGATRON_ITERATION = re.compile(r"iter_\d+")


def step_directory(weights: Path) -> Path:
    """The trainer's step directory that holds `weights` (global_step_N/, checkpoint-N/,
    step_N/, ...: the nearest one, at most 3 levels up): what a trainer resumes from, so what
    native output copies. The weights directory itself when none is named like one. A
    Megatron iter_N/ inside another trainer's step directory (NeMo-RL's
    step_N/policy/weights/iter_0000000/) belongs to it: the trainer resumes from step_N/."""
    weights = Path(weights)
    named = [d for d in (weights, *list(weights.parents)[:3])
             if any(layout.step(d.name) is not None for layout in LAYOUTS)]
    if len(named) > 1 and MEGATRON_ITERATION.fullmatch(named[0].name):
        return named[1]
    return named[0] if named else weights


def has_optimizer(root: Path) -> bool:
    """Whether a step directory keeps optimizer state (a file or directory named optim*:
    optimizer.pt, optim_world_size_*, *_optim_states.pt, optimizer_0/, policy/optimizer/)."""
    return any("optim" in p.name for p in Path(root).rglob("*"))


def weight_stores(root: Path, read_from: Path, names: dict[str, tuple]) -> list[Path]:
    """The directories under `root` (relative paths) holding a full copy of the tensors
    `names` ({name: shape}), `read_from` (the one the fit read) first: an HF export beside a
    trainer's shards is a second copy that must not keep the old weights."""
    read_from = Path(read_from).resolve()
    found = [read_from.relative_to(Path(root).resolve())]
    seen = {read_from}
    for d in sorted(p for p in Path(root).rglob("*") if p.is_dir()):
        rel = d.relative_to(root)
        if rel == found[0] or len(rel.parts) > 3 or not formats.detect(d):
            continue
        try:
            with formats.open_reader(d) as r:
                if r.path.resolve() in seen:  # a save dir standing for the one it points at
                    continue
                if all(n in r.tensors and r.tensors[n].shape == s for n, s in names.items()):
                    found.append(rel)
                    seen.add(r.path.resolve())
        except RelexError:  # an optimizer DCP directory, an adapter, ...: not a model copy
            continue
    return found


@dataclass(frozen=True)
class Template:
    """What native output copies: the last observed step directory, the model copies inside
    it (relative paths, the one the fit read first) and the dtype each fitted tensor is kept
    in at its widest (the pass computes in it; each copy gets its own dtype)."""

    root: Path
    stores: tuple[Path, ...]
    dtypes: dict[str, str]
    #: where the copy goes inside step-S/: the step directory's path in the run directory
    #: (`_actor/global_step50` for OpenRLHF), so that step-S/ is a run directory the trainer
    #: resumes from as it would from its own
    rel: Path
    #: opens the copy of the model store the fit read (stores[0]) as the fit opened it
    #: (formats.base.Reader.reopen: Megatron's HF config, ...)
    reopen: Callable[[Path], formats.Reader]

    @classmethod
    def of(cls, last: formats.Reader, shapes: dict[str, tuple],
           allow_fresh_optimizer: bool = False, run_dir: Path | None = None) -> Template:
        """The template of a run whose last observed checkpoint `last` reads; shapes: the
        fitted tensors. Formats relex cannot write into refuse here."""
        dtypes: dict[str, str] = {}

        def widen(reader: formats.Reader) -> None:  # formats that cannot be written refuse
            for name in shapes:
                for place in reader.places(name):
                    old = dtypes.get(name)
                    if old is None or DTYPES[place.dtype].itemsize > DTYPES[old].itemsize:
                        dtypes[name] = place.dtype

        widen(last)
        root = step_directory(last.path)
        rel = Path(root.name)
        if run_dir is not None and root.resolve().is_relative_to(Path(run_dir).resolve()) \
                and root.resolve() != Path(run_dir).resolve():
            rel = root.resolve().relative_to(Path(run_dir).resolve())
        elif (root.parent / "latest").is_file():  # a DeepSpeed save dir (OpenRLHF's _actor/)
            rel = Path(root.parent.name) / root.name
        if not (has_optimizer(root) or last.keeps_optimizer()) and not allow_fresh_optimizer:
            raise RelexError(f"{root}: keeps no optimizer state (no optim* file), so resuming "
                             f"from native output would reset the optimizer; save the "
                             f"optimizer with the checkpoints, or pass --allow-fresh-optimizer")
        stores = weight_stores(root, last.path, shapes)
        for store in stores[1:]:  # the first is the one `last` reads
            with formats.open_reader(root / store) as r:
                widen(r)
        return cls(root, tuple(stores), dtypes, rel, last.reopen)

    def resume_hint(self, out: Path) -> str:
        """How the detected trainer resumes from `out` (a step-S/ directory)."""
        where = Path(out) / self.rel
        if (self.root / "trainer_state.json").is_file():
            return (f"transformers Trainer / TRL: trainer.train(resume_from_checkpoint="
                    f"\"{where}\")")
        if (self.root / "actor").is_dir():
            return (f"verl: trainer.resume_mode=resume_path trainer.resume_from_path={where}")
        if (self.root / "mp_rank_00_model_states.pt").is_file():
            if self.rel.parent.name == "_actor":
                return f"OpenRLHF: --load_checkpoint --ckpt_path {out}"
            return f"DeepSpeed: engine.load_checkpoint(\"{where.parent}\")  # reads 'latest'"
        if re.fullmatch(r"step_\d+", self.root.name):
            return f"NeMo-RL: checkpointing.checkpoint_dir={where.parent}"
        if MEGATRON_ITERATION.fullmatch(self.root.name):
            return (f"slime / Megatron-LM: --load {where.parent}  (reads "
                    f"latest_checkpointed_iteration.txt)")
        return f"resume the trainer from {where}"


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (what one copy of it takes)."""
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree file by file with copy_file_range (reflinks where the
    filesystem shares blocks), keeping permissions and times."""
    def copy(a, b):
        with open(a, "rb") as fa, open(b, "wb") as fb:
            left = os.fstat(fa.fileno()).st_size
            try:
                while left > 0:
                    n = os.copy_file_range(fa.fileno(), fb.fileno(), min(left, 1 << 30))
                    if n == 0:
                        break
                    left -= n
            except OSError:  # a filesystem pair without it: a plain copy
                fa.seek(0)
                fb.seek(0)
                fb.truncate()
                shutil.copyfileobj(fa, fb, 16 << 20)
        shutil.copystat(a, b)
        return b
    shutil.copytree(src, dst, copy_function=copy, symlinks=False)


class NativeWriter:
    """Writes one target's tensors into `directory`/<step dir name>/, a copy of the template.

    names:
    the tensors to write ({name: numel}, the fitted ones; every other byte stays the last real
    checkpoint's). write_at takes a chunk in any dtype at least as wide as the stored ones and
    writes it to every place, cast to each place's dtype. Under torchrun the creator (rank 0)
    copies the template; the others open the copy and write the tensors in `owned`.
    """

    def __init__(self, directory: Path, template: Template, names: dict[str, int],
                 create: bool = True, owned: set[str] | None = None):
        self.directory = Path(directory)
        root = self.directory / template.rel
        if create:
            root.parent.mkdir(parents=True, exist_ok=True)
            copy_tree(template.root, root)
            for pointer in POINTERS:
                if (template.root.parent / pointer).is_file():
                    shutil.copy2(template.root.parent / pointer, root.parent / pointer)
        self.owned = set(owned) if owned is not None else None
        self.sizes = dict(names)
        self._written = dict.fromkeys(names, 0)
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}  # the files written, each opened once
        self._readers = []
        try:
            for i, rel in enumerate(template.stores):  # the first: the format the fit read
                self._readers.append(template.reopen(root / rel) if i == 0
                                     else formats.open_reader(root / rel))
            self.places = {n: [_checked(p) for r in self._readers for p in r.places(n)]
                           for n in names}
        except BaseException:
            self.abort()
            raise
        #: the torch.save zip members written, whose CRC-32s `seal` updates
        self.members = {c.tensor.storage for ps in self.places.values() for p in ps
                        for c in p.chunks if c.tensor.storage.crc_at}

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write flat elements [start, start + len(chunk)) of tensor `name` everywhere it is
        kept (a name not in `names` is not written: the copy keeps the last checkpoint's)."""
        if name not in self.places:
            return
        chunk = chunk.detach().to("cpu").reshape(-1)
        stop = start + chunk.numel()
        for place in self.places[name]:
            src = chunk.to(DTYPES[place.dtype])
            for c in place.chunks:
                _write_box(c, place.shape, start, stop, src, self._fd)
        with self._lock:
            self._written[name] += chunk.numel()

    def close(self) -> None:
        """Check completeness and flush."""
        self.abort()
        short = [n for n, size in self.sizes.items() if self._written[n] != size
                 and (self.owned is None or n in self.owned)]
        if short:
            raise RuntimeError(f"tensor {short[0]} got {self._written[short[0]]} of "
                               f"{self.sizes[short[0]]} elements")

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_WRONLY)
            return self._fds[file]

    def seal(self) -> None:
        """After every rank has written (the leader, at the end): update the CRC-32 of each
        torch.save zip member written (torch.load does not check it; zip tools and relex
        do)."""
        for member in self.members:
            _rewrite_crc(member)

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for r in self._readers:
            r.close()


def _checked(place: Place) -> Place:
    """A place whose boxes are all contiguous stored tensors (what every format keeps), so
    each write is a few pwrites (_write_box)."""
    for c in place.chunks:
        if not c.tensor.contiguous:
            raise RelexError(f"{c.tensor.storage.file}: a piece of shape {list(c.tensor.shape)} "
                             f"is stored with strides {list(c.tensor.stride)}; relex writes "
                             f"only contiguous pieces: use --output-format hf")
    return place


def _write_box(c: Chunk, shape: tuple[int, ...], a: int, b: int, src: torch.Tensor,
               fd_of) -> None:
    """Write the part of flat elements [a, b) of a tensor of `shape` (src: their values)
    that falls in box `c`, a contiguous stored tensor, by pwrite (fd_of: file -> a descriptor
    open for writing). The whole rows of the range inside the box are one contiguous run of
    the box's bytes: one pwrite; a partial first or last row is the same problem one
    dimension down. pwrite rather than writable maps: tensor-parallel pieces in Megatron and
    DCP files start at any byte, where a dtype view of a map cannot."""
    t = c.tensor

    def put(at: int, values: torch.Tensor) -> None:  # values: the box's elements at..
        data = values.contiguous().view(torch.uint8).numpy()
        pwrite_all(fd_of(t.storage.file), data,
                   t.storage.offset + (t.offset + at) * t.itemsize)

    _box(shape, c.offsets, t.shape, a, b, src, 0, put)


def _box(shape, offs, size, a: int, b: int, src: torch.Tensor, at: int, put) -> None:
    """_write_box for the box (offs, size) of a tensor of `shape`, whose first element is
    element `at` of the stored box."""
    if a >= b:
        return
    if not shape:
        put(at, src.reshape(1))
        return
    inner, box_inner = numel(shape[1:]), numel(size[1:])
    if tuple(size[1:]) == tuple(shape[1:]):  # the box holds whole rows: one run
        lo, hi = max(a, offs[0] * inner), min(b, (offs[0] + size[0]) * inner)
        if lo < hi:
            put(at + lo - offs[0] * inner, src[lo - a: hi - a])
        return
    first, last = -(-a // inner), b // inner  # the rows [a, b) covers whole
    lo, hi = max(first, offs[0]), min(last, offs[0] + size[0])
    if lo < hi:
        rows = src[lo * inner - a: hi * inner - a].view(hi - lo, *shape[1:])
        put(at + (lo - offs[0]) * box_inner,
            rows[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(offs[1:], size[1:]))])
    for row in sorted({a // inner, (b - 1) // inner}):  # partial rows, one level down
        r_a, r_b = max(a, row * inner), min(b, (row + 1) * inner)
        if (r_b - r_a < inner) and offs[0] <= row < offs[0] + size[0]:
            _box(shape[1:], offs[1:], size[1:], r_a - row * inner, r_b - row * inner,
                 src[r_a - a: r_b - a], at + (row - offs[0]) * box_inner, put)


def _rewrite_crc(st: Storage) -> None:
    nbytes = st.numel * st.dtype.itemsize
    crc, pos = 0, st.offset
    with open(st.file, "r+b") as f:
        fd = f.fileno()
        while pos < st.offset + nbytes:
            block = os.pread(fd, min(64 << 20, st.offset + nbytes - pos), pos)
            crc, pos = crc32(block, crc), pos + len(block)
        for at in st.crc_at:
            os.pwrite(fd, crc.to_bytes(4, "little"), at)
