"""Write Hugging Face model directories tensor chunk by tensor chunk, atomically.

safetensors' own writers take whole tensors in memory (a 70B embedding is 2 GB); relex knows every
output tensor's name, dtype and shape before it computes any of them, so it plans the shards up
front with huggingface_hub's splitter (the one transformers uses, hence the same file names),
writes each shard's header first and then streams data in order. Peak memory is one chunk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from relex.formats import DTYPES
from relex.formats.base import numel
from relex.formats.hf import SAFE_INDEX, SAFE_WEIGHTS
from relex.errors import RelexError


def parse_size(text: str | int) -> int:
    """'512MB', '5GB', '1.5GiB', 1000 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise RelexError(f"'{text}': expected a size such as 512MB or 5GB") from None
    if value <= 0:
        raise RelexError(f"'{text}': size must be positive")
    return int(value)


def pwrite_all(fd: int, data, pos: int) -> None:
    """Write all of `data` (a buffer) at byte `pos` of `fd` (pwrite may write less)."""
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


class ModelWriter:
    """Writes the safetensors shards (+ index) of one model directory, chunk by chunk.

    specs: (name, dtype code, shape) in file order. Every shard file is created with its header
    at once; write_at() then puts a chunk of a tensor (flattened, starting at element `start`)
    at its final place with pwrite, so chunks may come in any order and from several threads.
    close() checks that every byte arrived and writes model.safetensors.index.json when there is
    more than one shard.

    >>> w = ModelWriter(d, [("a", "BF16", (4, 8))], max_shard_size=5 * 10**9)
    >>> w.write_at("a", 16, x[2:]); w.write_at("a", 0, x[:2]); w.close()

    Under torchrun every rank plans the same shards: the creator (rank 0, create=True) makes the
    files and writes headers and index; the others (create=False) open the existing files and
    write only the tensors named in `owned`, whose completeness their close() checks.
    """

    def __init__(self, directory: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 max_shard_size: int, metadata: dict[str, str] | None = None,
                 create: bool = True, owned: set[str] | None = None):
        self.create = create
        self.owned = set(owned) if owned is not None else None
        self.directory = Path(directory)
        self.specs = {name: (code, tuple(shape)) for name, code, shape in specs}
        self.sizes = {name: DTYPES[code].itemsize * numel(shape)
                      for name, (code, shape) in self.specs.items()}
        self.split = split_state_dict_into_shards_factory(
            dict(self.sizes), get_storage_size=int,
            filename_pattern=SAFE_WEIGHTS.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=max_shard_size)
        metadata = {"format": "pt", **(metadata or {})}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute data offset)
        self._fds: list[int] = []
        self._written = dict.fromkeys(self.specs, 0)
        self._lock = threading.Lock()
        for file_name, names in self.split.filename_to_tensors.items():
            header, offset = {}, 0
            for name in names:
                code, shape = self.specs[name]
                header[name] = {"dtype": code, "shape": list(shape),
                                "data_offsets": [offset, offset + self.sizes[name]]}
                offset += self.sizes[name]
            header["__metadata__"] = metadata
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
            if create:
                fd = os.open(self.directory / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o666)
                self._fds.append(fd)
                os.write(fd, len(raw).to_bytes(8, "little") + raw)
                os.ftruncate(fd, 8 + len(raw) + offset)
            else:
                fd = os.open(self.directory / file_name, os.O_WRONLY)
                self._fds.append(fd)
            for name in names:
                begin = header[name]["data_offsets"][0]
                self._where[name] = (fd, 8 + len(raw) + begin)

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write `chunk` (dtype as planned) at element `start` of tensor `name`."""
        code, _ = self.specs[name]
        if chunk.dtype != DTYPES[code]:
            raise RuntimeError(f"{name}: chunk dtype {chunk.dtype}, planned {code}")
        data = chunk.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        begin = start * DTYPES[code].itemsize
        if begin + data.nbytes > self.sizes[name]:
            raise RuntimeError(f"{name}: chunk at element {start} overruns the tensor")
        fd, offset = self._where[name]
        pwrite_all(fd, data, offset + begin)
        with self._lock:
            self._written[name] += data.nbytes

    def close(self) -> None:
        """Check completeness, close the files and write the index (sharded outputs)."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        short = [n for n, size in self.sizes.items() if self._written[n] != size
                 and (self.owned is None or n in self.owned)]
        if short:
            raise RuntimeError(f"tensor {short[0]} got {self._written[short[0]]} of "
                               f"{self.sizes[short[0]]} bytes")
        if self.split.is_sharded and self.create:
            index = {"metadata": {"total_parameters": sum(numel(s) for _, s in
                                                          self.specs.values()),
                                  **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True)
                                                     + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def permissions(mode: int = 0o666) -> int:
    """`mode` filtered by the process umask (what a plain open() would have created)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask



def refuse_existing(final: str | Path, overwrite: bool, can_overwrite: bool = True) -> None:
    """The one check that an output directory does not exist yet (or may be replaced)."""
    if Path(final).exists() and not overwrite:
        hint = " or pass --overwrite (overwrite=True from Python)" if can_overwrite else ""
        raise RelexError(f"{final}: output directory exists; choose another output directory"
                         f"{hint}")


def check_output(final: Path, overwrite: bool, inputs: list[Path], needed_bytes: int) -> None:
    """Refuse early (before any work) what atomic_directory would refuse late."""
    final = Path(final)
    refuse_existing(final, overwrite)
    if final.exists() and not final.is_dir():
        raise RelexError(f"{final}: exists and is not a directory")
    resolved = final.resolve()
    for path in inputs:
        p = Path(path).resolve()
        if p == resolved or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise RelexError(f"--output {final} overlaps the input {path}; write outputs "
                             f"elsewhere (inputs are never modified)")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise RelexError(f"{final}: needs {needed_bytes / 1e9:.2f} GB but {parent} has only "
                         f"{free / 1e9:.2f} GB free")


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success rename it to `final`.

    On any exception (Ctrl-C included) the temporary directory is removed and `final` is left
    exactly as it was. With overwrite, an existing `final` is replaced only after the new one is
    complete.
    """
    final = Path(final)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, permissions(0o777))
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / final.name)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
