"""`relex watch`: follow a live run directory for trainers without callbacks (verl, OpenRLHF).

At each new complete checkpoint it reruns `relex.analyze` on the complete checkpoints so far and
reports explained variance, R^2, the backtest's verified horizon, and whether the target step
lies inside it; with write_when_verified it writes the target with `relex.extrapolate` as soon
as it does, then stops.

A checkpoint still being written is never read:
- verl writes `latest_checkpointed_iteration.txt` last: steps <= its number are complete;
- NeMo-RL writes `tmp_step_N` and renames it at the end: tmp* directories are ignored (relex's
  discovery does not match them);
- otherwise a checkpoint counts once the names, sizes and mtimes of its files are the same at two
  polls in a row.
A directory without checkpoints is waited on, a missing one is an error (a mistyped path would
otherwise wait silently); a checkpoint that disappears is reported and left out. `once` looks
twice, a short interval apart, so that a finished run is analysed in one call while a checkpoint
still being written is still not read. Outputs are written atomically by relex.analyze /
relex.extrapolate, so Ctrl-C leaves no half-written directory.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relex import api
from relex.errors import RelexError
from relex.output.model import refuse_existing

VERL_TRACKER = "latest_checkpointed_iteration.txt"
ONCE_SETTLE_S = 2.0  # with once: the most seconds between the two looks


def _signature(path: Path) -> tuple:
    """(relative name, size, mtime) of every file under path; changes while it is written."""
    out = []
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            out.append((os.path.relpath(os.path.join(root, f), path), st.st_size,
                        st.st_mtime_ns))
    return tuple(sorted(out))


class Follower:
    """Which checkpoints of a live run directory are complete, poll after poll."""

    def __init__(self, run_dir: str | Path, echo: Callable[[str], None] = print):
        self.run_dir, self.echo = Path(run_dir), echo
        self._last: dict[int, tuple] = {}
        self.complete: dict[int, Path] = {}
        self._waiting_said = False

    def poll(self) -> dict[int, Path]:
        """Complete checkpoints now (step -> weights directory)."""
        from relex.checkpoints.discover import discover
        try:
            if not self.run_dir.is_dir():
                raise RelexError(f"{self.run_dir}: does not exist yet")
            found = discover(self.run_dir, strict=False)  # partial steps: not yet
        except RelexError as e:  # no checkpoints yet, or only partial ones
            found = {}
            if not self._waiting_said:
                self.echo(f"relex watch: waiting for checkpoints ({e})")
                self._waiting_said = True
        found = {s: p for s, p in found.items()
                 if not any(part.startswith("tmp") for part in p.relative_to(self.run_dir).parts)}
        tracker = self._verl_tracker()
        for step in sorted(set(self.complete) - set(found)):
            self.echo(f"relex watch: checkpoint {step} ({self.complete.pop(step)}) disappeared; "
                      f"continuing without it")
        now = {}
        for step, path in found.items():
            sig = _signature(path)
            if tracker is not None and step <= tracker or tracker is None and sig and self._last.get(step) == sig:
                now[step] = path
            self._last[step] = sig
        self.complete = dict(sorted(now.items()))
        return self.complete

    def _verl_tracker(self) -> int | None:
        try:
            return int((self.run_dir / VERL_TRACKER).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


@dataclass
class WatchResult:
    history: list[dict] = field(default_factory=list)  # one row per refreshed analysis
    written: Path | None = None  # the extrapolated output, when it was written


def watch(run_dir: str | Path, *, base: str | Path, target: int,
          write_when_verified: bool = False, output: str | Path | None = None,
          report: str | Path | None = None, interval: float = 60.0,
          max_polls: int | None = None, timeout: float | None = None, rank: int = 1,
          once: bool = False, echo: Callable[[str], None] = print) -> WatchResult:
    """Follow run_dir until the target is verified and written, max_polls, or timeout (s).

    report: where the latest analysis (report.html, summary.json) and watch.json go (default:
    a temporary directory). output: where the target model goes (OUT/step-S), required with
    write_when_verified. once: two polls, min(interval, ONCE_SETTLE_S) apart, since a checkpoint
    counts as complete only once it is unchanged between two polls.
    """
    if not Path(run_dir).is_dir():
        problem = "is not a directory" if Path(run_dir).exists() else "does not exist"
        raise RelexError(f"{run_dir}: {problem}; to wait for a run that has not started yet, "
                         f"create it first (mkdir -p {run_dir})")
    if write_when_verified and output is None:
        raise RelexError("relex watch --write-when-verified needs --output DIR")
    if write_when_verified:
        refuse_existing(output, overwrite=False, can_overwrite=False)
    if interval <= 0:
        raise RelexError(f"--interval {interval}: must be > 0 seconds")
    if once:
        max_polls, interval = 2, min(interval, ONCE_SETTLE_S)
    follower = Follower(run_dir, echo)
    result = WatchResult()
    started, polls, analysed = time.monotonic(), 0, None
    with tempfile.TemporaryDirectory(prefix="relex-watch-") as tmp:
        report = Path(report) if report is not None else Path(tmp) / "report"
        while True:
            polls += 1
            complete = follower.poll()
            steps = sorted(s for s in complete if s > 0)
            if len(steps) >= 2 and steps != analysed:
                row = _refresh(complete, steps, base, target, rank, report, echo)
                if row is not None:
                    analysed = steps
                    result.history.append(row)
                    _write_json(report / "watch.json", result.history)
                    if write_when_verified and row["target_verified"]:
                        result.written = _write(complete, steps, base, target, rank,
                                                Path(output), echo)
                        if result.written is not None:
                            return result
            if (max_polls is not None and polls >= max_polls
                    or timeout is not None and time.monotonic() - started + interval > timeout):
                if not result.history and len(steps) < 2:
                    echo(f"relex watch: nothing analysed: {len(steps)} complete checkpoint(s) "
                         f"after step 0, at least 2 needed")
                return result
            time.sleep(interval)


def _refresh(complete, steps, base, target, rank, report, echo) -> dict | None:
    try:
        summary = api.analyze(checkpoints={s: complete[s] for s in steps}, base=base,
                                output=report, overwrite=True, rank=rank,
                                progress=False).summary
    except (RelexError, OSError) as e:  # e.g. a checkpoint removed while it was read
        echo(f"relex watch: analysis at step {steps[-1]} failed ({e}); retrying next poll")
        return None
    bt = summary["backtest"]
    row = {"step": steps[-1], "checkpoints": len(steps),
           "explained_variance": summary["finding1_explained_variance"][
               "rank1_param_weighted_mean"],
           "r2": summary["finding2_linearity"]["r2_mean"],
           "verified_horizon": bt["verified_horizon_ratio"],
           "verified_up_to_step": bt["verified_up_to_step"], "target": target,
           "target_verified": target <= bt["verified_up_to_step"], "time": time.time()}
    echo(f"relex watch: step {row['step']} ({row['checkpoints']} checkpoints): explained "
         f"variance {row['explained_variance']:.4f}, R^2 {row['r2']:.4f}, verified up to step "
         f"{row['verified_up_to_step']} ({row['verified_horizon']:.2f}x); target {target} "
         f"{'inside' if row['target_verified'] else 'outside'} the verified horizon")
    return row


def _write(complete, steps, base, target, rank, output, echo) -> Path | None:
    try:
        api.extrapolate(checkpoints={s: complete[s] for s in steps}, base=base,
                          targets=[target], output=output, rank=rank, progress=False,
                          allow_interpolation=target <= steps[-1])
    except (RelexError, OSError) as e:
        echo(f"relex watch: writing step {target} failed ({e}); retrying next poll")
        return None
    echo(f"relex watch: wrote {output / f'step-{target}'} (verified horizon covers step "
         f"{target})")
    return output / f"step-{target}"


def _write_json(path: Path, rows: list[dict]) -> None:
    """Replace path atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)
