"""What one streaming pass does, decided before it starts.

The caller (relex.api) builds a PassPlan from the user's options, the trajectory and the
process group; the engine receives it finished and only executes it. Nothing is assigned into
the engine afterwards, and the engine calls back only into the plan's fit rule (relex.fit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from relex.fit import TensorFit
from relex.stream.trajectory import TensorPlan

#: a tensor's Gram matrix (T x T) -> its weights (K x T) and statistics
FitRule = Callable[[np.ndarray], TensorFit]


@dataclass(frozen=True)
class PassPlan:
    """One pass over `tensors` (this process's share under torchrun).

    targets: outputs per tensor (K; 0 for the Gram step alone); fit: the rule that turns each
    Gram matrix into weights, None for the Gram step alone (analysis); grams: the Gram matrices
    of a saved fit (no Gram step), else None; lora_rank: write adapters of this r (factored
    tensors compressed to it) instead of merged tensors; delta_out: tensors written as their
    extrapolated delta, in the given dtype code (lora_B biases of an adapter); budget: bytes of
    buffers; device: where the arithmetic runs; workers: threads (None: the engine's default);
    local_processes: this run's processes on this machine, which share its RAM.
    """

    tensors: list[TensorPlan]
    targets: int
    fit: FitRule | None
    budget: int
    grams: dict[str, np.ndarray] | None = None
    lora_rank: int | None = None
    delta_out: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    workers: int | None = None
    local_processes: int = 1

