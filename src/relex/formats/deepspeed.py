"""DeepSpeed checkpoints (OpenRLHF `_actor/global_stepN/`, transformers Trainer with ZeRO).

ZeRO-1/2: `mp_rank_00_model_states.pt` is `torch.save` of a dict whose "module" entry is the
model's full 16-bit state dict with HF names (DeepSpeed wraps the HF model itself); the other
entries are bookkeeping (param_shapes, ds_config, lr_scheduler, ...). We parse its pickle with
the restricted unpickler (unpickler.py; plus builtins.set / frozenset and argparse.Namespace,
which such files may hold, as inert values) and read "module" in place from the mapped file.

Native output (places) writes a tensor where resuming reads it: the module entry and, for a
trainable parameter, its fp32 master, which `engine.load_checkpoint` restores from the optimizer
files (`[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, one per data-parallel rank R; the
module alone would be undone by the next step). Each file's
`optimizer_state_dict["single_partition_of_fp32_groups"]` holds, per param group, rank R's piece
of the group's flat fp32 buffer: the group's parameters in `param_shapes` order (the optimizer's
round-robin order), each flattened and followed by its `param_alignment_paddings` entry, padded
at the end to a multiple of 2 x world size and split evenly across the ranks. ZeRO-1/2
(stage_1_and_2.py `state_dict`) save each piece without the end padding, BF16_Optimizer (ZeRO-1
with bf16 and fp32 gradient accumulation) saves it whole: either way the pieces laid end to end
are the flat buffer from element 0, which is how DeepSpeed's zero_to_fp32.py
(`_zero2_merge_trainable_params`) reads them. The Adam moments (`base_optimizer_state`) stay.

ZeRO-3 keeps only fp32 partitions in the optimizer files (`*_optim_states.pt`, interleaved per
parameter across ranks, padded): relex does not read those and names the `zero_to_fp32.py`
command DeepSpeed copies into every checkpoint root. Neither does it read model parallel
(`mp_rank_01_...`) checkpoints.
"""

from __future__ import annotations

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
from relex.formats.unpickler import Record, StoredTensor, record_class, records_of

NAME = "deepspeed"
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3 = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")

EXTRA = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
         ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
         ("argparse", "Namespace"): record_class("Namespace")}
#: what the optimizer files (`*_optim_states.pt`) pickle besides tensors: inert records
OPTIM_EXTRA = {**EXTRA, **{("deepspeed.runtime.fp16.loss_scaler", k): record_class(k)
                           for k in ("LossScaler", "DynamicLossScaler")},
               ("deepspeed.runtime.zero.config", "ZeroStageEnum"): record_class("ZeroStageEnum"),
               ("deepspeed.utils.tensor_fragment", "fragment_address"):
                   record_class("fragment_address")}
OPTIM = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def zero_to_fp32_command(path: Path) -> str:
    root, tag = path.parent, path.name
    return (f"python {root}/zero_to_fp32.py {root} {path}-hf --tag {tag} --safe_serialization, "
            f"then copy config.json and the tokenizer into {path}-hf")


def _stage(state: dict) -> int | None:
    cfg = state.get("ds_config")
    zero = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) else None


class DeepSpeedReader(ChunkedReader):
    """A DeepSpeed ZeRO-1/2 checkpoint tag directory, "module" read in place.

    >>> r = DeepSpeedReader("ckpt/_actor/global_step50")
    >>> r.read("model.embed_tokens.weight", 0, 4096)
    """

    format = NAME

    def __init__(self, path):
        super().__init__(Path(path))
        file = self.path / MODEL_STATES
        if not file.is_file():  # never opened unless a regular file (a FIFO would block)
            if file.exists() or file.is_symlink():
                raise RelexError(f"{file}: not a regular file; re-copy the checkpoint")
            if any(ZERO3.fullmatch(f.name) for f in self.path.iterdir()):
                raise RelexError(f"{self.path}: a DeepSpeed ZeRO-3 checkpoint (fp32 partitions "
                                 f"in the optimizer files), which relex does not read; convert "
                                 f"it: {zero_to_fp32_command(self.path)}")
            raise RelexError(f"{self.path}: no {MODEL_STATES}; not a DeepSpeed checkpoint")
        if (self.path / "mp_rank_01_model_states.pt").exists():
            raise RelexError(f"{self.path}: a model-parallel DeepSpeed checkpoint (mp_rank_01), "
                             f"which relex does not read; convert it: "
                             f"{zero_to_fp32_command(self.path)}")
        state = load(file, where=str(file), extra=EXTRA)
        state = state if isinstance(state, dict) else {}
        if _stage(state) == 3:
            raise RelexError(f"{file}: ZeRO-3 checkpoint (its module holds no weights); convert "
                             f"it: {zero_to_fp32_command(self.path)}")
        module = state.get("module")
        if not isinstance(module, dict) or not module:
            raise RelexError(f"{file}: no 'module' state dict inside; not a DeepSpeed model "
                             f"states file (or saved with exclude_frozen_parameters); convert "
                             f"it: {zero_to_fp32_command(self.path)}")
        self._file, self._state = file, state
        self._masters: dict[str, list[tuple[Chunk, ...]]] | None = None
        for name, t in module.items():
            if not isinstance(name, str) or not isinstance(t, StoredTensor):
                raise RelexError(f"{file}: module entry {name!r:.60} is "
                                 f"{type(t).__name__}, not a tensor; the file is corrupt")
            self._add(ChunkedTensor(name, t.dtype, t.shape, [Chunk((0,) * len(t.shape), t)],
                                    self._maps, str(file)))
        # OpenRLHF / Trainer keep config.json beside or above the tag dir only sometimes
        self.meta_dir = next((d for d in (self.path, self.path.parent)
                              if (d / "config.json").is_file()), None)

    def files(self) -> list[Path]:
        return [self._file]

    def places(self, name: str) -> list[Place]:
        """The module entry, the fp32 master in every rank's optimizer file (flat: one chunk
        per rank piece), and a frozen parameter's saved fragment: each is restored on resume."""
        t = self._chunked[name]
        places = [Place(t.shape, t.dtype, tuple(t.chunks))]
        if self._masters is None:
            self._masters = master_chunks(self.path, self._file, self._state,
                                          {n: c.shape for n, c in self._chunked.items()})
        shared = self._state.get("shared_params")
        key = name if name in self._masters else (
            shared.get(name) if isinstance(shared, dict) else None)
        for chunks in self._masters.get(key, ()):
            if chunks:  # none for an empty parameter
                places.append(Place((numel(t.shape),), chunks[0].tensor.dtype, chunks))
        frozen = self._state.get("frozen_param_fragments")
        frozen = frozen.get(name) if isinstance(frozen, dict) else None
        if isinstance(frozen, StoredTensor):
            if frozen.shape != t.shape:
                raise RelexError(f"{self._file}: frozen_param_fragments['{name}'] has shape "
                                 f"{list(frozen.shape)}, the module {list(t.shape)}; the file "
                                 f"is corrupt")
            places.append(Place(t.shape, frozen.dtype, (Chunk((0,) * len(t.shape), frozen),)))
        return places


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _int(x) -> int | None:
    """A ZeroStageEnum (an int enum, pickled as a record of its value) or an int."""
    if isinstance(x, Record) and len(x.args) == 1:
        x = x.args[0]
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def optimizer_files(path: Path, world: int) -> list[list[Path]]:
    """The optimizer files of a tag directory, one list of `world` files (by rank) per name
    prefix present (`bf16_` and/or none: DeepSpeed names them by its bf16 setting, and loads
    the set its own setting names, so every set present is written). A missing rank or a
    rank beyond `world` (another run's, or another world size's) is an error."""
    present = {}
    for f in path.iterdir():
        m = OPTIM.fullmatch(f.name)
        if m:
            present.setdefault(m.group(1) or "", {})[int(m.group(2))] = f
    sets = []
    for prefix, ranks in sorted(present.items()):
        stray = [r for r in ranks if r >= world]
        if stray:
            raise RelexError(f"{ranks[max(stray)]}: data-parallel rank {max(stray)}, but "
                             f"{MODEL_STATES} says dp_world_size {world}: the optimizer files "
                             f"are from a different world size; re-copy the checkpoint")
        missing = [r for r in range(world) if r not in ranks]
        if missing:
            name = f"{prefix}zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt"
            raise RelexError(f"{path / name}: missing (dp_world_size {world}); the checkpoint "
                             f"is incomplete: re-copy it, or use --output-format hf")
        sets.append([ranks[r] for r in range(world)])
    return sets


def master_chunks(path: Path, states_file: Path, state: dict,
                  shapes: dict[str, tuple]) -> dict[str, list[tuple[Chunk, ...]]]:
    """{parameter name: [its fp32 master as 1-D chunks (offsets (k,): where the piece starts
    in the parameter's flat elements), one tuple per optimizer file set]} of a ZeRO-1/2 tag
    directory, from the model states' `param_shapes` and each rank's
    `single_partition_of_fp32_groups` (see the module doc); {} when it keeps no optimizer
    files (resuming then rebuilds the masters from the module). shapes: the module's."""
    where = str(states_file)
    world = state.get("dp_world_size")
    if not isinstance(world, int) or world < 1:
        raise RelexError(f"{where}: no dp_world_size; not a DeepSpeed model states file")
    sets = optimizer_files(path, world)  # (ZeRO-3 tag directories the reader refuses)
    if not sets:
        opt = state.get("optimizer")
        if isinstance(opt, dict) and any("fp32" in str(k) for k in opt):
            raise RelexError(f"{where}: a DeepSpeed checkpoint without ZeRO whose optimizer "
                             f"keeps fp32 master weights in this file, which relex cannot "
                             f"write into; use --output-format hf")
        return {}
    groups = state.get("param_shapes")
    with records_of(where):
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise RelexError(f"{where}: no param_shapes beside the optimizer files; not a "
                             f"ZeRO-1/2 checkpoint relex can write into: use --output-format hf")
        order = [(g, name, tuple(int(d) for d in shape))
                 for g, group in enumerate(groups) for name, shape in group.items()]
    for g, name, shape in order:
        if shapes.get(name) != shape:
            got = "absent" if name not in shapes else f"of shape {list(shapes[name])}"
            raise RelexError(f"{where}: param_shapes has '{name}' of shape {list(shape)}, but "
                             f"the module entry is {got}; the file is corrupt")
    out: dict[str, list[tuple[Chunk, ...]]] = {}
    for files in sets:
        for name, chunks in _set_chunks(files, world, groups, where).items():
            out.setdefault(name, []).append(chunks)
    return out


def _set_chunks(files: list[Path], world: int, groups: list[dict],
                states: str) -> dict[str, tuple[Chunk, ...]]:
    """One optimizer file set's masters (master_chunks)."""
    parts, pads, slices = [], None, []
    for f in files:
        where = str(f)
        sd = load(f, where=where, extra=OPTIM_EXTRA)
        osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
        if not isinstance(osd, dict):
            raise RelexError(f"{where}: no optimizer_state_dict; not a DeepSpeed optimizer "
                             f"states file")
        if _int(osd.get("zero_stage")) == 3 or "fp32_flat_groups" in osd:
            raise RelexError(f"{where}: ZeRO-3 optimizer states, which relex does not read or "
                             f"write; use --output-format hf")
        flat = osd.get("single_partition_of_fp32_groups")
        count = osd.get("partition_count")
        counts = count if isinstance(count, list) else [count]
        if any(_int(c) != world for c in counts):
            raise RelexError(f"{where}: partition_count {count!r:.40} but {MODEL_STATES} says "
                             f"dp_world_size {world}: the files are from different runs or "
                             f"world sizes; re-copy the checkpoint")
        if (not isinstance(flat, list) or len(flat) != len(groups)
                or not all(isinstance(t, StoredTensor) and len(t.shape) == 1
                           and (t.stride == (1,) or t.numel <= 1) for t in flat)):
            raise RelexError(f"{where}: single_partition_of_fp32_groups is not one flat tensor "
                             f"for each of the {len(groups)} param groups in {states}; the "
                             f"files are from different runs")
        mine = osd.get("param_alignment_paddings")
        pads = mine if pads is None else pads
        if mine != pads:
            raise RelexError(f"{where}: param_alignment_paddings differ from rank 0's; the "
                             f"files are from different runs")
        parts.append(flat)
        slices.append(osd.get("param_slice_mappings"))
    out = {}
    for g, group in enumerate(groups):
        pad = pads[g] if isinstance(pads, list) and g < len(pads) else None
        if pad is not None and (not isinstance(pad, list) or len(pad) != len(group)
                                or not all(isinstance(p, int) and p >= 0 for p in pad)):
            raise RelexError(f"{files[0]}: param_alignment_paddings[{g}] does not list one "
                             f"padding per parameter of group {g} in {states}; the files are "
                             f"from different runs")
        pieces = [p[g] for p in parts]  # rank order: laid end to end, the group's flat buffer
        starts = [0]
        for t in pieces:
            starts.append(starts[-1] + t.numel)
        off, local = 0, [{} for _ in pieces]  # per rank: {name: (start, numel) there}
        for k, (name, shape) in enumerate(group.items()):
            n = numel(tuple(int(d) for d in shape))
            chunks = []
            for r, t in enumerate(pieces):
                lo, hi = max(off, starts[r]), min(off + n, starts[r + 1])
                if lo < hi:
                    chunks.append(Chunk((lo - off,), StoredTensor(
                        t.storage, t.offset + lo - starts[r], (hi - lo,), (1,))))
                    local[r][name] = (lo - starts[r], hi - lo)
            out[name] = tuple(chunks)
            off += n + (pad[k] if pad else 0)
        # zero_to_fp32's check: the pieces may add the end padding (up to 2 x world size)
        if off > starts[-1] or _align(off, 2 * world) != _align(starts[-1], 2 * world):
            raise RelexError(f"{files[-1]}: the fp32 partitions of param group {g} hold "
                             f"{starts[-1]} elements, but param_shapes in {states} needs {off}: "
                             f"the files are from different runs or world sizes")
        _check_slices(files, slices, g, local, states)
    return out


def _check_slices(files: list[Path], slices: list, g: int, local: list[dict], states: str):
    """Each rank's own record of where its pieces sit (`param_slice_mappings`: per group,
    {name: fragment_address(numel, start in the rank's partition)}) must
    agree with the layout derived from param_shapes: a later DeepSpeed that lays the flat
    buffer out otherwise is refused instead of written wrong."""
    for f, mapping, mine in zip(files, slices, local):
        group = mapping[g] if isinstance(mapping, list) and g < len(mapping) else None
        if not isinstance(group, dict):
            continue
        with records_of(str(f)):
            saved = {name: (a.get("start"), a.get("numel")) for name, a in group.items()
                     if isinstance(a, Record)}
        if saved != mine:
            name = next((n for n in {**saved, **mine} if saved.get(n) != mine.get(n)), None)
            raise RelexError(f"{f}: param_slice_mappings place '{name}' at (start, numel) "
                             f"{saved.get(name)} of this rank's fp32 partition, the layout of "
                             f"param_shapes in {states} at {mine.get(name)}: a DeepSpeed "
                             f"layout relex does not know; use --output-format hf")


def detect(path: Path) -> bool:
    states = path / MODEL_STATES  # any kind of file: the reader says what is wrong with it
    return path.is_dir() and (states.exists() or states.is_symlink()
                              or any(ZERO3.fullmatch(f.name) for f in path.iterdir()))


def reader(path: Path) -> DeepSpeedReader:
    return DeepSpeedReader(path)

