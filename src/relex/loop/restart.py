"""The restart loop, for trainers relex has no hook in: jump from the trainer's own checkpoints.

Each call of `jump` (`relex jump`) is one cycle of what the in-loop Accelerator does: fit the
checkpoints the run wrote since the last jump (the jumped weights are that cycle's base, as
the Accelerator's cycle-start snapshot is), write the model `ahead` steps further into a copy
of the run's last checkpoint (native output: Adam's moments, the LR schedule, data order and
RNG kept), and say how the trainer resumes from it. The user stops the trainer, runs `relex
jump`, resumes; OUTPUT/jump-K/ keeps every jump and OUTPUT/jump-K/jump.json what the next
cycle needs (the real step the trainer resumes at and where the jumped weights are).
"""

from __future__ import annotations

import json
from pathlib import Path

from relex.api import extrapolate
from relex.checkpoints.discover import discover
from relex.errors import RelexError
from relex.keywords import takes
from relex.options import FitOptions, Inputs, OutputOptions, Resources
from relex.results import Report

JUMP_FILE = "jump.json"


def previous_jump(output: Path) -> tuple[int, dict | None]:
    """(number of jumps in `output`, the last one's jump.json or None)."""
    done = sorted((int(d.name.split("-")[1]), d) for d in Path(output).glob("jump-*")
                  if d.name.split("-")[1].isdigit() and (d / JUMP_FILE).is_file())
    if not done:
        return 0, None
    k, d = done[-1]
    return k, json.loads((d / JUMP_FILE).read_text())


@takes((Inputs, ["run_dir", "base"]), (FitOptions, ["method", "fit", "window"]),
       (Resources, ["max_memory", "threads"]),
       (OutputOptions, ["output", "progress", "allow_fresh_optimizer"]),
       required=("run_dir", "base", "output"))
def jump(*, inputs: Inputs, fit: FitOptions, resources: Resources, out: OutputOptions,
         ahead: int) -> Report:
    """Jump a run `ahead` steps past its latest checkpoint, into a checkpoint it resumes from.

    The cycle observed is every checkpoint of run_dir after the step the last jump resumed at
    (all of them the first time, fitted from `base`; later from the jumped weights). Writes
    output/jump-K/step-S/ (native output; S counts from the cycle's start) and
    output/jump-K/jump.json; Report.notes holds the trainer's resume command.

    Example:
        >>> relex.jump("runs/grpo", base="models/base", ahead=40, output="jumps")
    """
    if ahead <= 0:
        raise RelexError(f"--ahead {ahead}: expected a positive number of steps")
    output = Path(out.output)
    k, last = previous_jump(output)
    start, base = (0, inputs.base) if last is None else (last["resume_step"], last["model"])
    found = dict(discover(inputs.run_dir))
    cycle = {s: p for s, p in sorted(found.items()) if s > start}
    if len(cycle) < 2:
        raise RelexError(f"{inputs.run_dir}: {len(cycle)} checkpoint(s) after step {start} "
                         f"(where the run resumed from jump-{k}); relex jump fits at least 2: "
                         f"let the trainer save more, then run it again" if last else
                         f"{inputs.run_dir}: {len(cycle)} checkpoint(s); relex jump fits at "
                         f"least 2: let the trainer save more, then run it again")
    offsets = {s - start: p for s, p in cycle.items()}
    target = max(offsets) + ahead
    where = output / f"jump-{k + 1}"
    report = extrapolate(checkpoints=offsets, base=base, targets=[target], output=where,
                         output_format="native", allow_fresh_optimizer=out.allow_fresh_optimizer,
                         method=fit.method, fit=fit.fit, window=fit.window,
                         max_memory=resources.max_memory, threads=resources.threads,
                         progress=out.progress, allow_interpolation=False)
    prov = json.loads((where / f"step-{target}" / "relex.json").read_text())["native"]
    stores = prov["model_copies"]
    record = {
        "jump": k + 1, "resume_step": max(cycle), "cycle_steps": sorted(cycle),
        "ahead": ahead, "steps_ahead_in_total": (last or {}).get("steps_ahead_in_total", 0)
        + ahead, "model": str((where / f"step-{target}" / prov["directory"] / stores[0])
                              .resolve()),
        "resume": prov["resume"]}
    (where / JUMP_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return report
