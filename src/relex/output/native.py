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
from dataclasses import dataclass
from pathlib import Path

import torch

from relex import formats
from relex.checkpoints.discover import LAYOUTS
from relex.errors import RelexError
from relex.formats import DTYPES
from relex.formats.base import MappedFiles
from relex.formats.checksums import crc32
from relex.formats.chunked import Chunk, Place, _fill
from relex.formats.unpickler import Storage
from relex.output.model import pwrite_all

#: files beside a step directory through which trainers find their latest checkpoint (verl,
#: Megatron: latest_checkpointed_iteration.txt; DeepSpeed / OpenRLHF: latest); copied as they
#: are, since the output keeps the step number N
POINTERS = ("latest_checkpointed_iteration.txt", "latest")


def step_directory(weights: Path) -> Path:
    """The trainer's step directory that holds `weights` (global_step_N/, checkpoint-N/,
    step_N/, ...: the nearest one, at most 3 levels up): what a trainer resumes from, so what
    native output copies. The weights directory itself when none is named like one."""
    weights = Path(weights)
    for d in (weights, *list(weights.parents)[:3]):
        if any(layout.step(d.name) is not None for layout in LAYOUTS):
            return d
    return weights


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
    for d in sorted(p for p in Path(root).rglob("*") if p.is_dir()):
        rel = d.relative_to(root)
        if rel == found[0] or len(rel.parts) > 3 or not formats.detect(d):
            continue
        try:
            with formats.open_reader(d) as r:
                if all(n in r.tensors and r.tensors[n].shape == s for n, s in names.items()):
                    found.append(rel)
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
        if not has_optimizer(root) and not allow_fresh_optimizer:
            raise RelexError(f"{root}: keeps no optimizer state (no optim* file), so resuming "
                             f"from native output would reset the optimizer; save the "
                             f"optimizer with the checkpoints, or pass --allow-fresh-optimizer")
        stores = weight_stores(root, last.path, shapes)
        for store in stores[1:]:  # the first is the one `last` reads
            with formats.open_reader(root / store) as r:
                widen(r)
        return cls(root, tuple(stores), dtypes, rel)

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
        self._files = MappedFiles(writable=True)  # the boxes _fill scatters into
        self._fds: dict[Path, int] = {}  # the files row chunks are pwritten to
        self._readers = [formats.open_reader(root / rel) for rel in template.stores]
        try:
            self.places = {n: [_split(p) for r in self._readers for p in r.places(n)]
                           for n in names}
        except BaseException:
            self.abort()
            raise
        #: the torch.save zip members written, whose CRC-32s `seal` updates
        self.members = {c.tensor.storage for ps in self.places.values() for p, _, _ in ps
                        for c in p.chunks if c.tensor.storage.crc_at}

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write flat elements [start, start + len(chunk)) of tensor `name` everywhere it is
        kept (a name not in `names` is not written: the copy keeps the last checkpoint's)."""
        if name not in self.places:
            return
        chunk = chunk.detach().to("cpu").reshape(-1)
        stop = start + chunk.numel()
        for place, rows, boxes in self.places[name]:
            src = chunk.to(DTYPES[place.dtype])
            for c in rows:
                _write_rows(c, place, start, stop, src, self._fd)
            if boxes:
                _fill(src, place.shape, start, stop, boxes, self._files, scatter=True)
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
        self._files.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for r in self._readers:
            r.close()


def _split(place: Place) -> tuple[Place, list[Chunk], list[tuple]]:
    """(place, its chunks of whole contiguous rows, the other boxes as _fill's pieces): rows
    (FSDP row shards, HF tensors, flat partitions) take one pwrite per write, other boxes
    (tensor-parallel column shards) are scattered through writable maps, which need aligned
    data."""
    rows, boxes = [], []
    for c in place.chunks:
        t = c.tensor
        if t.contiguous and tuple(t.shape[1:]) == tuple(place.shape[1:]):
            rows.append(c)
        else:
            if t.storage.offset % t.itemsize:
                raise RelexError(f"{t.storage.file}: tensor data at byte {t.storage.offset} "
                                 f"is not aligned to its dtype; relex cannot write into it: "
                                 f"use --output-format hf")
            boxes.append((c.offsets, c))
    return place, rows, boxes


def _write_rows(c: Chunk, place: Place, a: int, b: int, src: torch.Tensor, fd_of) -> None:
    """Write the part of flat elements [a, b) that falls in row chunk `c`, in one pwrite
    (fd_of: file -> a descriptor open for writing)."""
    t = c.tensor
    inner = t.numel // t.shape[0] if t.shape and t.shape[0] else 1
    first = c.offsets[0] * inner if t.shape else 0
    lo, hi = max(a, first), min(b, first + t.numel)
    if lo >= hi:
        return
    data = src[lo - a: hi - a].contiguous().view(torch.uint8).numpy()
    pwrite_all(fd_of(t.storage.file), data,
               t.storage.offset + (t.offset + lo - first) * t.itemsize)


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
