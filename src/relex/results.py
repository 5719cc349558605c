"""What the public functions return: Report (extrapolate, reconstruct) and Analysis (analyze)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Report:
    """What a run wrote and measured (also printed as the CLI's summary table)."""

    output: Path
    targets: dict[int, Path]
    observed_steps: list[int]
    tensors: int
    moving: int
    copied: int
    dropped: list[str]
    bytes_read: int
    seconds: float
    stats: dict[str, dict] = field(default_factory=dict)
    rank: int = 1
    #: "hf" (model directories) or "lora" (PEFT adapter directories)
    output_format: str = "hf"
    #: adapter outputs: their r, and per target step the share of each LoRA'd tensor's
    #: extrapolated delta (Frobenius norm) the rank-r adapter keeps
    lora_rank: int | None = None
    norm_share: dict[int, dict[str, float]] = field(default_factory=dict)
    #: things the run changed or noticed on the way (a clamped --lora-rank)
    notes: list[str] = field(default_factory=list)
    #: extrapolate: how far the window's own backtest supports it (analysis.backtest.Horizon
    #: as a dict), and one line per target beyond that
    horizon: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Mean / min explained variance (at the fit's rank) and R^2 over moving tensors."""
        ev = [s["explained_variance"][self.rank - 1] for s in self.stats.values()
              if s.get("r2") is not None]
        r2 = [s["r2"] for s in self.stats.values() if s.get("r2") is not None]
        out = {"tensors": self.tensors, "trajectory_tensors": self.moving,
               "copied_tensors": self.copied, "dropped_tensors": self.dropped,
               "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3)}
        if ev:
            out.update(explained_variance_mean=float(np.mean(ev)),
                       explained_variance_min=float(np.min(ev)),
                       r2_mean=float(np.mean(r2)), r2_min=float(np.min(r2)))
        shares = [v for per in self.norm_share.values() for v in per.values()]
        if shares:
            out.update(lora_rank=self.lora_rank, norm_share_mean=float(np.mean(shares)),
                       norm_share_min=float(np.min(shares)))
        return out


@dataclass
class Analysis:
    """What `analyze` wrote: the report directory, its summary numbers, cost."""

    output: Path
    summary: dict
    bytes_read: int
    seconds: float
