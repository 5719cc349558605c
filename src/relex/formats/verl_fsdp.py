"""verl FSDP1/FSDP2 actor checkpoints: `model_world_size_W_rank_R.pt` rank files, read in place.

Each rank file is `torch.save(model.state_dict())` on that rank: a dict of DTensors whose local
tensors are that rank's shard (placements `Shard(d)` on a 1-D mesh, or `(Replicate(), Shard(d))`
for HSDP), or plain tensors (a full copy on every rank). A global tensor is its shards laid end
to end along d in mesh order (torch.chunk semantics: uneven last shards, possibly empty ones),
as verl's own merger assembles them. Every rank's pickle is parsed without executing it
(torchzip.py), and each tensor's dtype, shape, placements and mesh must agree on all ranks; tensor
bytes are read only from the ranks along the sharded mesh dim (the replicate dim holds copies),
range by range from the mapped files, so memory stays bounded however big the rank files are.
Config and tokenizer come from `huggingface/` beside the rank files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from relex.errors import RelexError
from relex.formats.base import numel
from relex.formats.chunked import (
    Chunk,
    ChunkedReader,
    ChunkedTensor,
    Place,
)
from relex.formats.torchzip import load
from relex.formats.unpickler import (
    DTensorRecord,
    Record,
    StoredTensor,
    records_of,
    short,
)

NAME = "verl_fsdp"
RANK_FILE = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")


def _hint(path: Path) -> str:
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {path} "
            f"--target_dir {path}/huggingface")


def rank_files(path: Path) -> tuple[int, dict[int, Path]]:
    """(world size, {rank: file}) of the rank files in `path`, checked for consistency."""
    found: dict[int, dict[int, Path]] = {}
    for f in path.iterdir():
        m = RANK_FILE.fullmatch(f.name)
        if m and f.is_file():
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not found:
        raise RelexError(f"{path}: no model_world_size_W_rank_R.pt files")
    if len(found) > 1:
        raise RelexError(f"{path}: rank files of several world sizes ({sorted(found)}); keep "
                         f"the files of one save only")
    (world, files), = found.items()
    config = path / "fsdp_config.json"
    if config.is_file():
        try:
            declared = json.loads(config.read_text()).get("world_size")
        except (json.JSONDecodeError, AttributeError) as e:
            raise RelexError(f"{config}: not valid JSON ({e}); re-copy the checkpoint") from None
        if declared is not None and declared != world:
            raise RelexError(f"{config}: world_size {declared} but the rank files say "
                             f"model_world_size_{world}; the directory mixes two saves")
    missing = [r for r in range(world) if r not in files]
    if missing or len(files) != world:
        first = missing[0] if missing else max(files)
        raise RelexError(f"{path}: model_world_size_{world}_rank_{first}.pt is missing (or "
                         f"extra); re-copy the checkpoint with all {world} rank files")
    return world, files


def _mesh_shape(spec: Record, world: int) -> tuple[int, ...] | None:
    """The device mesh's shape from a DTensorSpec (old torch: a `mesh` tensor; new: a layout)."""
    mesh = spec.get("mesh")
    if not isinstance(mesh, Record):
        return None
    ranks = mesh.get("mesh")
    if isinstance(ranks, StoredTensor):
        return ranks.shape
    layout = mesh.get("_layout")
    if isinstance(layout, Record):
        axes = layout.get("axes")
        if isinstance(axes, tuple) and all(isinstance(a, Record) for a in axes):
            shape = tuple(numel(_flat(a.get("shape", ()))) for a in axes)
            if numel(shape) == world:
                return shape
    return None


def _flat(x):
    if isinstance(x, int):
        return (x,)
    return tuple(i for part in x for i in _flat(part))


def _placements(spec: Record, where: str, name: str) -> list[tuple[str, int | None]]:
    out = []
    for p in spec.get("placements") or ():
        kind = getattr(p, "kind", type(p).__name__)
        if kind == "Shard":
            out.append(("shard", p.get("dim")))
        elif kind == "Replicate":
            out.append(("replicate", None))
        else:
            raise RelexError(f"{where}: tensor '{name}' has a {kind} placement (FSDP with tensor "
                             f"parallelism), which relex does not read; convert the checkpoint "
                             f"to HF first with verl's merger")
    if not out or sum(k == "shard" for k, _ in out) > 1:
        raise RelexError(f"{where}: tensor '{name}' has placements {short(out)}, which relex "
                         f"does not read (one Shard dim at most); convert the checkpoint to HF "
                         f"first")
    return out


class VerlFSDPReader(ChunkedReader):
    """A verl FSDP actor directory (`global_step_N/actor`), read shard by shard in place.

    >>> r = VerlFSDPReader("runs/grpo/global_step_50/actor")
    >>> r.read("model.embed_tokens.weight", 0, 4096)   # a view of rank 0's mapped file
    """

    format = NAME

    def __init__(self, path):
        super().__init__(Path(path))
        self.world, self._all = rank_files(self.path)
        hf = self.path / "huggingface"
        self.meta_dir = hf if (hf / "config.json").is_file() else None
        # every rank's pickle is parsed (it is small): placements are checked on all of them;
        # tensor bytes are read only from the ranks along the sharded mesh dim
        self._states: dict[int, dict] = {}
        self._read: set[int] = {0}
        for rank in range(self.world):
            with records_of(str(self._all[rank])):
                self._states[rank] = self._state(rank)
        for name, value in self._states[0].items():
            with records_of(str(self.path)):
                self._add(self._assemble(name, value))

    def _state(self, rank: int) -> dict:
        file = self._all[rank]
        state = load(file)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise RelexError(f"{file}: not a model state dict (expected a dict of tensors); "
                             f"is this an optimizer or extra-state file renamed?")
        for name, value in state.items():
            if not isinstance(value, (StoredTensor, DTensorRecord)):
                raise RelexError(f"{file}: entry '{short(name)}' is a {type(value).__name__}, "
                                 f"not a tensor; not a model state dict")
        if rank and set(state) != set(self._states[0]):
            name = min(set(state) ^ set(self._states[0]))
            raise RelexError(f"{file}: tensor '{short(name)}' is in this rank file or in "
                             f"{self._all[0].name} but not both; the rank files come from "
                             f"different saves or one is damaged")
        return state

    def _layout(self, rank: int, name: str) -> tuple:
        """How rank `rank` says tensor `name` is laid out: (dtype, global shape, placements,
        mesh shape); every rank must say the same."""
        value, file = self._states[rank][name], str(self._all[rank])
        if isinstance(value, StoredTensor):
            return value.dtype, value.shape, None, None
        spec = value.get("_spec")
        if not isinstance(spec, Record):
            raise RelexError(f"{file}: DTensor '{name}' without a spec; the file is corrupt or "
                             f"from an unsupported torch version")
        shape = tuple(value.args[1]) if len(value.args) > 1 else None
        return (value.args[0] if value.args else None, shape, _placements(spec, file, name),
                _mesh_shape(spec, self.world))

    def _assemble(self, name: str, value) -> ChunkedTensor:
        where = str(self._all[0])
        layout = self._layout(0, name)
        for rank in range(self.world):
            other = self._layout(rank, name)
            if other != layout:
                raise RelexError(f"{self._all[rank]}: tensor '{name}' is laid out as "
                                 f"{short(other)} here but as {short(layout)} in "
                                 f"{self._all[0].name} (dtype, shape, placements, mesh); the "
                                 f"rank files come from different saves or one is damaged")
            self._check_coordinate(rank, self._states[rank][name], layout[3])
        if isinstance(value, StoredTensor):  # a plain tensor: the same full copy on every rank
            return ChunkedTensor(name, value.dtype, value.shape,
                                 [Chunk((0,) * len(value.shape), value)], self._maps, where)
        spec = value.get("_spec")
        local = value.get("_local_tensor")
        if not isinstance(spec, Record) or not isinstance(local, StoredTensor):
            raise RelexError(f"{where}: DTensor '{name}' without a local tensor or spec; the "
                             f"file is corrupt or from an unsupported torch version")
        shape, placements = layout[1], layout[2]
        mesh = layout[3] or ((self.world,) if len(placements) == 1 else None)
        if mesh is None or len(mesh) != len(placements) or numel(mesh) != self.world:
            raise RelexError(f"{where}: DTensor '{name}': device mesh {mesh} does not match "
                             f"world size {self.world}; convert with: {_hint(self.path)}")
        shard = [i for i, (k, _) in enumerate(placements) if k == "shard"]
        if not shard:
            return ChunkedTensor(name, local.dtype, local.shape,
                                 [Chunk((0,) * len(local.shape), local)], self._maps, where)
        axis, dim = shard[0], placements[shard[0]][1]
        if shape is None or not isinstance(dim, int) or not 0 <= dim < len(shape):
            raise RelexError(f"{where}: DTensor '{name}': bad shard dim {short(dim)}; the file "
                             f"is corrupt")
        chunks, pos = [], 0
        for coord in range(mesh[axis]):
            # Row-major mesh: the rank whose coordinates are 0 except `coord` on the shard axis.
            rank = coord * numel(mesh[axis + 1:])
            state = self._states[rank]
            self._read.add(rank)
            part = state[name].get("_local_tensor") if isinstance(state[name], Record) else None
            if not isinstance(part, StoredTensor) or len(part.shape) != len(shape) or any(
                    s != g for i, (s, g) in enumerate(zip(part.shape, shape)) if i != dim):
                raise RelexError(f"{self._all[rank]}: tensor '{name}': local shard of shape "
                                 f"{list(getattr(part, 'shape', []))} does not fit global shape "
                                 f"{list(shape)}; the rank files come from different saves")
            offsets = [0] * len(shape)
            offsets[dim] = pos
            chunks.append(Chunk(tuple(offsets), part))
            pos += part.shape[dim]
        return ChunkedTensor(name, local.dtype, shape, chunks, self._maps, where)

    def places(self, name: str) -> list[Place]:
        """Every rank's copy: the pass reads one rank per shard, but each rank resumes from
        its own file, so a write goes to the replicas too (one Place; chunks may repeat)."""
        t = self._chunked[name]
        _, shape, placements, mesh = self._layout(0, name)
        shard = [i for i, (k, _) in enumerate(placements or []) if k == "shard"]
        chunks = []
        for rank in range(self.world):
            value = self._states[rank][name]
            local = value.get("_local_tensor") if isinstance(value, Record) else value
            if not shard:
                chunks.append(Chunk((0,) * len(local.shape), local))
                continue
            mesh = mesh or (self.world,)
            axis, dim = shard[0], placements[shard[0]][1]
            step = numel(mesh[axis + 1:])
            offsets = [0] * len(shape)
            offsets[dim] = sum(self._states[c * step][name].get("_local_tensor").shape[dim]
                               for c in range(rank // step % mesh[axis]))
            chunks.append(Chunk(tuple(offsets), local))
        return [Place(t.shape, t.dtype, tuple(chunks))]

    def _check_coordinate(self, rank: int, value, mesh: tuple[int, ...] | None) -> None:
        """A rank file's DTensors know their mesh coordinates (torch >= 2.8): check the name."""
        spec = value.get("_spec") if isinstance(value, Record) else None
        dmesh = spec.get("mesh") if isinstance(spec, Record) else None
        coord = dmesh.get("_coordinate_on_dim") if isinstance(dmesh, Record) else None
        if coord is None:
            return
        mesh = mesh or (self.world,)
        expect, r = [], rank
        for size in reversed(mesh):
            expect.append(r % size)
            r //= size
        if tuple(coord) != tuple(reversed(expect)):
            raise RelexError(f"{self._all[rank]}: holds the shard of mesh coordinate "
                             f"{short(tuple(coord))}, not rank {rank}'s; were the files renamed?")

    def files(self) -> list[Path]:
        return [self._all[r] for r in sorted(self._read)]


def detect(path: Path) -> bool:
    return path.is_dir() and any(RANK_FILE.fullmatch(f.name) for f in path.iterdir())


def reader(path: Path) -> VerlFSDPReader:
    return VerlFSDPReader(path)
