"""DeepSpeed checkpoints (OpenRLHF `_actor/global_stepN/`, transformers Trainer with ZeRO).

ZeRO-1/2: `mp_rank_00_model_states.pt` is `torch.save` of a dict whose "module" entry is the
model's full 16-bit state dict with HF names (DeepSpeed wraps the HF model itself); the other
entries are bookkeeping (param_shapes, ds_config, lr_scheduler, ...). We parse its pickle with
the restricted unpickler (unpickler.py; plus builtins.set / frozenset and argparse.Namespace,
which such files may hold, as inert values) and read "module" in place from the mapped file.

ZeRO-3 keeps only fp32 partitions in the optimizer files (`*_optim_states.pt`, interleaved per
parameter across ranks, padded): relex does not read those and names the `zero_to_fp32.py`
command DeepSpeed copies into every checkpoint root. Neither does it read model parallel
(`mp_rank_01_...`) checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

from relex.errors import RelexError
from relex.formats.chunked import (
    Chunk,
    ChunkedReader,
    ChunkedTensor,
)
from relex.formats.torchzip import load
from relex.formats.unpickler import StoredTensor, record_class

NAME = "deepspeed"
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3 = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")

EXTRA = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
         ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
         ("argparse", "Namespace"): record_class("Namespace")}


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
        self._file = file
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


def detect(path: Path) -> bool:
    states = path / MODEL_STATES  # any kind of file: the reader says what is wrong with it
    return path.is_dir() and (states.exists() or states.is_symlink()
                              or any(ZERO3.fullmatch(f.name) for f in path.iterdir()))


def reader(path: Path) -> DeepSpeedReader:
    return DeepSpeedReader(path)

