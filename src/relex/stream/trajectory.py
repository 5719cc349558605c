"""The base model and the observed checkpoints of one run, checked against each other.

A Trajectory decides, for every tensor of the base model, what relex will do with it: follow its
trajectory through the checkpoints (float tensors), copy it from the base (integer buffers), or
drop it (an lm_head tied to the input embeddings). Checking happens on headers only, before any
tensor data is read, so bad input fails in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from relex.formats import DTYPES, FLOAT_CODES, Reader, TensorMeta, lora
from relex.errors import RelexError

LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its base entry, its entry in each observed checkpoint, output dtype.

    `rows` is empty for tensors copied from the base (non-float tensors). `kinds` says per
    checkpoint how its reader holds the tensor (Reader.delta_kind: "full", "zero", "delta",
    "factors"; empty means all "full").
    """

    name: str
    base: TensorMeta
    rows: tuple[TensorMeta, ...]
    out_dtype: str
    kinds: tuple[str, ...] = ()

    @property
    def factored(self) -> bool:
        """Every checkpoint's delta is a LoRA product or zero: the Gram matrix comes from the
        factors and no delta is ever materialised (stream/factors.py)."""
        return self.moves and all(k in ("factors", "zero") for k in self.kinds) and \
            bool(self.kinds)

    @property
    def unchanged(self) -> bool:
        """Every checkpoint says its delta is zero (a LoRA run's weight no adapter touches):
        the output is the base, which reports count as copied, not fitted."""
        return bool(self.kinds) and all(k == "zero" for k in self.kinds)

    @property
    def exact(self) -> bool:
        """Some checkpoint gives its delta directly (Reader.delta): the engine asks for it
        instead of subtracting the base from a merged, rounded tensor."""
        return self.moves and any(k != "full" for k in self.kinds)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def moves(self) -> bool:
        return bool(self.rows)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Precision of delta rows, Gram products and theta_0 + W @ D.

        float32 for half-precision outputs; float64 for float32/float64 outputs (or inputs),
        whose last bit float32 arithmetic cannot get right: the Gram's float32 rounding moved
        some float32 outputs by 1.1 ulp in the tests."""
        wide = self.out_dtype in ("F32", "F64") or any(
            i.dtype == "F64" for i in (self.base, *self.rows))
        return torch.float64 if wide else torch.float32

    @property
    def sources(self) -> tuple[TensorMeta, ...]:
        """Base first, then the observed checkpoints: the rows a block read fetches."""
        return (self.base, *self.rows)


def is_tied(base: Reader, checkpoints: list[Reader]) -> bool:
    """Whether lm_head shares the input embedding (so it is dropped from inputs and output).

    config.json decides when it says so; when it is silent, transformers' default (tied) applies
    exactly when the base itself has no lm_head.weight.
    """
    for ckpt in (base, *checkpoints):
        cfg = ckpt.config or {}
        tie = cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings"))
        if tie is not None:
            return bool(tie)
    return LM_HEAD not in base.tensors


def parse_dtype(name: str | None) -> str | None:
    """'bf16' / 'bfloat16' / 'float32' ... -> safetensors dtype code (None passes through)."""
    if name is None:
        return None
    aliases = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
               "fp32": "F32", "float32": "F32", "float": "F32", "fp64": "F64", "float64": "F64"}
    code = aliases.get(name.lower(), name.upper())
    if code not in FLOAT_CODES:
        raise RelexError(f"--dtype {name}: expected one of bf16, fp16, fp32, fp64")
    return code


class Trajectory:
    """Base + observed checkpoints at increasing steps, with a plan for every output tensor.

    steps: (T,) int array of the observed steps; plans: output tensors in write order (widest
    dtype first, then base order, so every tensor in the written files stays aligned).
    """

    def __init__(self, base: Reader, checkpoints: list[Reader], steps: list[int],
                 dtype: str | None = None):
        if len(checkpoints) != len(steps):
            raise ValueError("one step per checkpoint")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise RelexError(f"steps must be increasing and distinct, got {list(steps)}")
        if steps and steps[0] <= 0:
            raise RelexError(f"observed steps must be > 0 (step 0 is the base), got {steps[0]}")
        self.base = base
        self.checkpoints = checkpoints
        self.steps = np.asarray(steps, dtype=np.int64)
        self.tied = is_tied(base, checkpoints)
        self.dropped = [LM_HEAD] if self.tied and LM_HEAD in base.tensors else []
        out_code = parse_dtype(dtype)
        skip = {LM_HEAD} if self.tied else set()
        for ckpt in checkpoints:
            self._check_names(ckpt, skip)
        lora.check_same_adapters(checkpoints, list(steps))
        plans = []
        for order, (name, b) in enumerate(base.tensors.items()):
            if name in skip:
                continue
            rows = tuple(c.tensors[name] for c in checkpoints)
            for ckpt, row in zip(checkpoints, rows):
                self._check_tensor(ckpt, b, row)
            moves = b.is_float
            kinds = tuple(c.delta_kind(name) for c in checkpoints) if moves else ()
            plans.append((order, TensorPlan(name, b, rows if moves else (),
                                            (out_code or b.dtype) if moves else b.dtype,
                                            kinds if any(k != "full" for k in kinds) else ())))
        plans.sort(key=lambda p: (-DTYPES[p[1].out_dtype].itemsize, p[0]))
        self.plans: list[TensorPlan] = [p for _, p in plans]

    def _check_names(self, ckpt: Reader, skip: set[str]) -> None:
        have, want = set(ckpt.tensors) - skip, set(self.base.tensors) - skip
        fix = "base and checkpoints must be the same architecture (is --base the right model?)"
        if want - have:
            name = sorted(want - have)[0]
            raise RelexError(f"{ckpt.path}: tensor '{name}' of the base model {self.base.path} is "
                             f"missing ({len(want - have)} missing in all); {fix}")
        if have - want:
            name = sorted(have - want)[0]
            raise RelexError(f"{ckpt.path}: tensor '{name}' is not in the base model "
                             f"{self.base.path} ({len(have - want)} such tensors); {fix}")

    @staticmethod
    def _check_tensor(ckpt: Reader, base: TensorMeta, row: TensorMeta) -> None:
        if row.shape != base.shape:
            hint = getattr(ckpt, "shape_hint", None)  # optional: how the reader knows shapes
            raise RelexError(f"{ckpt.path}: tensor '{row.name}' has shape {list(row.shape)} but "
                             f"the base has {list(base.shape)}; same architecture and vocab "
                             f"size needed (is --base the right model?)"
                             + (f"; {hint(row.name)}" if hint else ""))
        if base.is_float != row.is_float or (not base.is_float and base.dtype != row.dtype):
            raise RelexError(f"{ckpt.path}: tensor '{row.name}' is {row.dtype} but {base.dtype} "
                             f"in the base; only float tensors may change dtype")

    def widen(self, dtypes: dict[str, str]) -> None:
        """Compute and write the fitted tensors in these dtypes ({name: code}; native output:
        the widest copy the trainer keeps, fp32 masters beside bf16 weights)."""
        self.plans = [replace(p, out_dtype=dtypes[p.name]) if p.moves and p.name in dtypes
                      else p for p in self.plans]

    @property
    def T(self) -> int:
        return len(self.checkpoints)

    def _source(self, source: int) -> Reader:
        return self.base if source == 0 else self.checkpoints[source - 1]

    def read(self, plan: TensorPlan, source: int, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of source `source` (0 = base, t + 1 = checkpoint t) of a
        tensor: flat, stored dtype, read-only (see Reader.read)."""
        return self._source(source).read(plan.name, start, stop)

    def release(self, plan: TensorPlan, start: int, stop: int, sources: int | None = None) -> None:
        """Hand back elements [start, stop) of the first `sources` sources (default all) of a
        tensor (see Reader.release)."""
        for source in range(len(plan.sources) if sources is None else sources):
            self._source(source).release(plan.name, start, stop)

    def verify(self) -> None:
        """After a pass: every reader checks the bytes it read (see Reader.verify)."""
        for ckpt in (self.base, *self.checkpoints):
            ckpt.verify()

    def fingerprint(self) -> dict:
        """What a saved fit was computed from: paths, formats, file sizes."""
        return {"base": self.base.fingerprint(),
                "checkpoints": [{"step": int(s), **c.fingerprint()}
                                for s, c in zip(self.steps, self.checkpoints)]}

    def close(self) -> None:
        for ckpt in (self.base, *self.checkpoints):
            ckpt.close()
