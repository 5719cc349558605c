"""Save and load a fit: the per-tensor Gram matrices and where they came from.

The Gram matrix G = D D^T (T x T, float64) of each tensor is all the math needs, so a saved fit
is tiny (about T^2 * 8 bytes per tensor: 2.5 MB for a 7B model observed at 30 steps) and lets
another target, rank, fit or method be produced later with one read pass and no Gram step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from relex.version import __version__
from relex.errors import RelexError
from relex.output.model import permissions

FIT_FILE = "relex-fit.safetensors"


@dataclass(frozen=True)
class SavedFit:
    """A loaded fit: observed steps, the inputs' fingerprint and one Gram matrix per tensor."""

    path: Path
    steps: list[int]
    fingerprint: dict
    grams: dict[str, np.ndarray]
    numels: dict[str, int]

    @property
    def base(self) -> Path:
        return Path(self.fingerprint["base"]["path"])

    @property
    def checkpoints(self) -> dict[int, Path]:
        return {c["step"]: Path(c["path"]) for c in self.fingerprint["checkpoints"]}

    def select(self, steps: list[int]) -> dict[str, np.ndarray]:
        """The Gram matrices restricted to a subset of the fit's steps (the Gram of a subset of
        the rows of D is the matching sub-matrix)."""
        idx = [self.steps.index(s) for s in steps]
        return {name: g[np.ix_(idx, idx)] for name, g in self.grams.items()}


def save_fit(path: Path, steps: list[int], fingerprint: dict, grams: dict[str, np.ndarray],
             numels: dict[str, int]) -> None:
    """Write the fit to `path` (load_fit reads it back). Tensors are listed by name and the
    metadata is one entry, so the file's bytes do not depend on the process or on the order a
    pass (or torchrun's ranks) produced the Gram matrices."""
    names = sorted(grams)
    meta = {"relex_version": __version__, "steps": [int(s) for s in steps],
            "fingerprint": fingerprint, "numel": {k: int(numels[k]) for k in names}}
    tensors = {name: torch.from_numpy(np.ascontiguousarray(grams[name], dtype=np.float64))
               for name in names}
    # one metadata entry: safetensors writes the metadata map in a random order per process
    save_file(tensors, str(path), metadata={"relex": json.dumps(meta)})
    os.chmod(path, permissions())  # safetensors creates it 0600


def load_fit(path: str | Path) -> SavedFit:
    """Load OUT/relex-fit.safetensors (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / FIT_FILE
    if not path.is_file():
        raise RelexError(f"--from-fit {path}: no such fit file (relex extrapolate writes "
                         f"{FIT_FILE} into its --output directory)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["relex"])
        grams = {k: v.numpy() for k, v in load_file(str(path)).items()}
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise RelexError(f"{path}: not a relex fit file ({e})") from None
    return SavedFit(path, meta["steps"], meta["fingerprint"], grams, meta.get("numel", {}))


def check_fingerprint(saved: SavedFit, current: dict) -> None:
    """Refuse to apply a fit to inputs that changed since it was computed (the same files, by
    their place inside each checkpoint, with the same sizes; the run may have moved)."""
    old = {c["step"]: c for c in saved.fingerprint["checkpoints"]}
    pairs = [("base", saved.fingerprint["base"], current["base"])] + [
        (f"step {c['step']}", old[c["step"]], c) for c in current["checkpoints"]]
    for what, before, now in pairs:
        if _relative(before) != _relative(now):
            raise RelexError(f"--from-fit {saved.path}: the {what} checkpoint ({now['path']}) "
                             f"changed since the fit was saved; refit without --from-fit")


def _relative(fingerprint: dict) -> dict[str, int]:
    """A checkpoint's data files by their path inside it, with sizes: the same wherever the run
    directory was moved or copied to."""
    return {os.path.relpath(f, fingerprint["path"]): size
            for f, size in fingerprint["files"].items()}
