"""What the public functions return: Report (extrapolate, reconstruct) and Analysis (analyze)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from relex.checkpoints.inputs import format_steps


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


    def __str__(self) -> str:
        """The summary table the CLI prints."""
        s = self.summary()
        rows = [("targets", ", ".join(f"step {k}: {v}" for k, v in self.targets.items())),
                ("observed steps", format_steps(self.observed_steps)),
                ("tensors", f"{s['tensors']} ({s['trajectory_tensors']} fitted, "
                            f"{s['copied_tensors']} copied"
                            + (f", dropped tied {', '.join(s['dropped_tensors'])}"
                               if s["dropped_tensors"] else "") + ")"),
                ("read", f"{s['bytes_read'] / 1e9:.2f} GB in {self.seconds:.1f} s "
                         f"({s['bytes_read'] / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)")]
        h = self.horizon
        if h is not None:
            rows.append(("verified horizon", "unknown (too few checkpoints to backtest)"
                         if h["verified_horizon_ratio"] is None else
                         f"{h['verified_horizon_ratio']:.2f}x the last observed step (up to step "
                         f"{h['verified_up_to_step']})" + (f"; {len(self.warnings)} target(s) "
                                                           f"beyond it" if self.warnings else "")))
        if "norm_share_mean" in s:
            rows.append((f"adapter rank {s['lora_rank']}",
                         f"keeps {s['norm_share_mean']:.4f} of the delta's Frobenius norm on "
                         f"average, {s['norm_share_min']:.4f} at least"))
        if "explained_variance_mean" in s:
            rows.append((f"explained var. (rank {self.rank})",
                         f"mean {s['explained_variance_mean']:.4f}, min "
                         f"{s['explained_variance_min']:.4f}"))
            rows.append(("R^2 of coefficient fit",
                         f"mean {s['r2_mean']:.4f}, min {s['r2_min']:.4f}"))
        return _rows(rows)


@dataclass
class Analysis:
    """What `analyze` wrote: the report directory, its summary numbers, cost."""

    output: Path
    summary: dict
    bytes_read: int
    seconds: float

    def __str__(self) -> str:
        """The summary table the CLI prints."""
        s = self.summary
        f1, bt = s["finding1_explained_variance"], s["backtest"]
        last = s["observed_steps"][-1]
        rows = [("observed steps", format_steps(s["observed_steps"])),
                ("later steps (oracle)", format_steps(s["later_steps"]) if s["later_steps"]
                 else "none"),
                ("explained var. rank 1", f"mean {f1['by_rank_mean'][0]:.4f}, min "
                                          f"{f1['rank1_min']:.4f}" if f1["by_rank_mean"] else "-"),
                ("R^2 of coefficient line", f"mean {s['finding2_linearity']['r2_mean']}, min "
                                            f"{s['finding2_linearity']['r2_min']}"),
                ("backtest: verified horizon", f"{bt['verified_horizon_ratio']:.2f}x the window "
                                               f"(up to step {bt['verified_up_to_step']})"),
                ("backtest: estimated limit", "no limit in sight" if bt["estimated_limit_ratio"]
                 is None else f"{bt['estimated_limit_ratio']:.1f}x (step "
                              f"{int(bt['estimated_limit_ratio'] * last)})"),
                ("read", f"{self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f} s")]
        return _rows(rows)


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
