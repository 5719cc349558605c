"""The public functions (`extrapolate`, `reconstruct`, `analyze`) that the CLI is a thin face
of: keyword arguments -> option groups (relex.options) -> the checkpoints (checkpoints/) -> a
trajectory of readers (stream/trajectory.py) -> a write job (output/job.py: plan, engine,
writers) -> step directories moved into place at once, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from relex.checkpoints.inputs import format_steps, resolve_inputs, select_steps
from relex.errors import RelexError
from relex.fit import Extrapolation, FitConfig, Reconstruction, parse_fit
from relex.formats import open_reader
from relex.keywords import takes
from relex.options import FitOptions, Inputs, OutputOptions, Resources
from relex.output.adapter import adapter_rank
from relex.output.native import Template
from relex.output.fitfile import FIT_FILE, check_fingerprint, load_fit, save_fit
from relex.output.job import WriteJob, write
from relex.output.model import atomic_directory, check_output
from relex.results import Analysis, Report
from relex.stream import torchrun
from relex.stream.engine import Engine
from relex.stream.budget import budget
from relex.stream.plan import PassPlan
from relex.stream.trajectory import Trajectory



def _parse_targets(targets) -> list[int]:
    if targets is None or (not isinstance(targets, int) and len(targets) == 0):
        raise RelexError("no --target given")
    targets = [targets] if isinstance(targets, int) else [int(t) for t in targets]
    if len(set(targets)) != len(targets):
        raise RelexError(f"--target: a step is listed twice in {targets}")
    if min(targets) < 0:
        raise RelexError("--target must be >= 0")
    return sorted(targets)


@takes(Inputs, FitOptions, Resources, OutputOptions, required=("output", "targets"))
def extrapolate(*, inputs: Inputs, fit: FitOptions, resources: Resources, out: OutputOptions,
                group: torchrun.Group | None = None) -> Report:
    """Write the model of each target step, predicted from the observed checkpoints.

    Writes output/step-S/ for every S in targets (a Hugging Face model directory with a
    relex.json provenance file) and output/relex-fit.safetensors (reusable with from_fit).
    With output_format="lora" (a LoRA run only) step-S/ is a PEFT adapter directory instead:
    the extrapolated delta compressed to rank `lora_rank`; Report.norm_share says how much of
    each delta it keeps.

    Args:
        run_dir: the run's directory (or hf://ORG/REPO), first and by position if you like.
        group: the processes sharing the work (torchrun.Group); by default the torchrun world
            when launched by torchrun, else this process alone. The CLI decides it once.
        The other keyword arguments are the options listed below.

    Returns:
        Report: the directories written, the observed steps, bytes read, per-tensor statistics.

    Example:
        >>> relex.extrapolate("runs/grpo", base="Qwen2.5-Math-1.5B", observe_until=75,
        ...                   targets=[500, 750], output="out")
    """
    config = FitConfig(fit.method, fit.rank, parse_fit(fit.fit), fit.window)
    targets = _parse_targets(fit.targets)
    group = group or torchrun.from_environment(resources.device)
    if out.output_format not in ("hf", "lora", "native"):
        raise RelexError(f"--output-format {out.output_format}: expected hf, lora or native")
    if out.output_format == "native" and out.dtype is not None:
        raise RelexError("--dtype: native output keeps each tensor in the dtype the trainer "
                         "stores it in; drop --dtype")
    if out.lora_rank is not None and out.output_format != "lora":
        raise RelexError("--lora-rank is the rank of an adapter output: add --output-format "
                         "lora")
    saved = None
    if inputs.from_fit is not None:
        saved = load_fit(inputs.from_fit)
        resolved = _resolve_for_fit(saved, inputs)
    else:
        resolved = _resolve(inputs)
    observed = list(resolved.observed)
    config.check(len(observed))
    if not fit.allow_interpolation and targets[0] <= observed[-1]:
        raise RelexError(f"--target {targets[0]} is not after the last observed step "
                         f"{observed[-1]}; pass --allow-interpolation to predict inside the window")
    traj = _open(resolved.base, resolved.observed, out.dtype, inputs.verify_checksums,
                 inputs.hf_config)
    try:
        grams = None
        if saved is not None:
            check_fingerprint(saved, traj.fingerprint())
            grams = saved.select(observed)
            _check_grams(grams, traj, saved.path)
        rule = Extrapolation(traj.steps.astype(np.float64), np.asarray(targets, float), config)
        notes: list[str] = []
        rank = (adapter_rank(traj, out.lora_rank, notes) if out.output_format == "lora"
                else None)
        for note in notes:
            warnings.warn(note, stacklevel=3)
        native = None
        if out.output_format == "native":
            native = Template.of(traj.checkpoints[-1],
                                 {p.name: p.shape for p in traj.plans
                                  if p.moves and not p.unchanged},
                                 out.allow_fresh_optimizer,
                                 inputs.run_dir if inputs.run_dir and Path(
                                     str(inputs.run_dir)).is_dir() else None)
            traj.widen(native.dtypes)
            notes += [f"resume step {t}: {native.resume_hint(Path(out.output) / f'step-{t}')}"
                      for t in targets]
        job = WriteJob("extrapolate", traj, resolved, targets, rule, config, out, resources, group,
                       grams=grams, from_fit=inputs.from_fit, adapter_rank=rank, notes=notes,
                       strict_horizon=fit.strict_horizon, native=native)
        report = write(job)
        for line in report.warnings:
            warnings.warn(line, stacklevel=3)  # the caller of the @takes wrapper
        return report
    finally:
        traj.close()


@takes(Inputs, Resources, OutputOptions, required=("output",))
def reconstruct(*, inputs: Inputs, resources: Resources, out: OutputOptions, rank: int = 1,
                group: torchrun.Group | None = None) -> Report:
    """Write the rank-`rank` projection of every observed checkpoint (is the run rank-r?).

    output/step-S/ holds theta_0 + the projection of D[S] onto the top-`rank` right singular
    vectors of the observed deltas; evaluating it against the real step S says how much of the
    RL gain the low-rank subspace carries.

    Args:
        run_dir: the run's directory (or hf://ORG/REPO).
        rank: singular components kept (default 1).
        group: as in `extrapolate`.

    Returns:
        Report, as `extrapolate`'s.

    Example:
        >>> relex.reconstruct("runs/grpo", base="models/base", rank=1, output="rank1")
    """
    config = FitConfig("relex", rank, 1, None)
    group = group or torchrun.from_environment(resources.device)
    resolved = _resolve(inputs)
    targets = list(resolved.observed)
    if len(targets) < rank:
        raise RelexError(f"--rank {rank} needs at least {rank} observed checkpoints, got "
                         f"{len(targets)}")
    traj = _open(resolved.base, resolved.observed, out.dtype, inputs.verify_checksums,
                 inputs.hf_config)
    try:
        rule = Reconstruction(traj.steps.astype(np.float64), list(range(len(targets))), config)
        return write(WriteJob("reconstruct", traj, resolved, targets, rule, config, out, resources,
                           group))
    finally:
        traj.close()


def _resolve(inputs: Inputs, later: bool = False):
    return resolve_inputs(inputs.run_dir, base=inputs.base, checkpoints=inputs.checkpoints,
                          observe_until=inputs.observe_until, steps=inputs.steps,
                          revision_pattern=inputs.revision_pattern, later=later,
                          skip_unreadable=inputs.skip_unreadable, hf_config=inputs.hf_config)


def _open(base: Path, checkpoints: dict[int, Path], dtype: str | None = None,
          verify_checksums: bool = True, hf_config: str | Path | None = None) -> Trajectory:
    """The Trajectory of `base` and the {step: path} checkpoints (LoRA ones read over `base`)."""
    traj = Trajectory(open_reader(base, hf_config=hf_config),
                      [open_reader(p, base=base, hf_config=hf_config)
                       for p in checkpoints.values()], list(checkpoints), dtype)
    for reader in (traj.base, *traj.checkpoints):
        if reader.checksums is not None:
            reader.checksums.enabled = verify_checksums
    return traj


def _resolve_for_fit(saved, inputs: Inputs):
    """The checkpoints a saved fit was computed from: where they were, or found again in the
    run directory given beside --from-fit (a run that was moved or copied)."""
    if inputs.run_dir is None and not inputs.checkpoints:
        gone = [p for p in (saved.base, *saved.checkpoints.values()) if not p.exists()]
        if gone:
            raise RelexError(f"--from-fit {saved.path}: the fit's checkpoint {gone[0]} no longer "
                             f"exists (moved?); give the run's directory too: relex extrapolate "
                             f"RUN_DIR --from-fit {inputs.from_fit} [--base DIR]")
        return resolve_inputs(base=inputs.base if inputs.base is not None else saved.base,
                              checkpoints=saved.checkpoints,
                              observe_until=inputs.observe_until, steps=inputs.steps,
                              hf_config=inputs.hf_config)
    base = inputs.base
    if base is None and saved.base.exists():
        base = saved.base
    window = inputs.steps
    if window is None and inputs.observe_until is None:
        window = saved.steps  # the fit's own steps, not later ones the run also has
    found = resolve_inputs(inputs.run_dir, base=base, checkpoints=inputs.checkpoints,
                           observe_until=inputs.observe_until, steps=window,
                           revision_pattern=inputs.revision_pattern,
                           skip_unreadable=inputs.skip_unreadable, hf_config=inputs.hf_config)
    extra = [s for s in found.observed if s not in saved.steps]
    if extra:
        raise RelexError(f"--from-fit {saved.path}: step {extra[0]} is not in the fit (its steps: "
                         f"{format_steps(saved.steps)}); pick among them with --steps or "
                         f"--observe-until, or refit without --from-fit")
    return found


def _load_fit_alone(inputs: Inputs):
    """load_fit, refusing other checkpoint sources beside it."""
    if inputs.run_dir is not None or inputs.checkpoints:
        raise RelexError("--from-fit reuses the fit's own checkpoints; do not also give "
                         "RUN_DIR or --checkpoint (--steps / --observe-until pick among them)")
    return load_fit(inputs.from_fit)


def _check_grams(grams: dict[str, np.ndarray], traj: Trajectory, path: Path) -> None:
    moving = {p.name for p in traj.plans if p.moves}
    if set(grams) != moving:
        name = sorted(set(grams) ^ moving)[0]
        raise RelexError(f"--from-fit {path}: tensor '{name}' is in the fit or the model but "
                         f"not both; refit without --from-fit")
    bad = [n for n, g in grams.items() if g.shape != (traj.T, traj.T)]
    if bad:
        raise RelexError(f"--from-fit {path}: Gram matrix of '{bad[0]}' is not {traj.T}x{traj.T}")


@takes(Inputs, (FitOptions, ["rank", "fit", "window"]),
       (Resources, ["max_memory", "device", "threads"]),
       (OutputOptions, ["output", "overwrite", "progress"]), required=("output",))
def analyze(*, inputs: Inputs, fit: FitOptions, resources: Resources,
            out: OutputOptions) -> Analysis:
    """Measure a run's geometry and backtest its extrapolation; write output/report.html.

    The observed window is the checkpoints picked by observe_until / steps (default: all);
    checkpoints after it are used as the oracle. One streaming pass computes every tensor's
    Gram matrix over all of them (saved as output/relex-fit.safetensors, reusable by
    `extrapolate --from-fit` and `analyze --from-fit`, which then reads no weights at all).

    Args:
        run_dir: the run's directory (or hf://ORG/REPO); the options are listed below.

    Returns:
        Analysis: the report directory, its summary numbers (summary.json), bytes read, time.

    Example:
        >>> relex.analyze("runs/grpo", base="models/base", observe_until=75, output="report")
    """
    if torchrun.launched():
        raise RelexError("analyze runs in one process; torchrun is for extrapolate and "
                         "reconstruct")
    from relex.analysis.backtest import RunAnalysis, analyze_tensor
    from relex.analysis.report import write_report
    config = FitConfig("relex", fit.rank, parse_fit(fit.fit), fit.window)
    started = time.perf_counter()
    output = Path(out.output)
    if inputs.from_fit is not None:
        saved = _load_fit_alone(inputs)
        observed = select_steps(saved.steps, inputs.observe_until, inputs.steps)
        all_steps = observed + [s for s in saved.steps if s > observed[-1]]
        config.check(len(observed))
        check_output(output, out.overwrite, [], 0)
        grams, numels, bytes_read = saved.select(all_steps), saved.numels, 0
        fingerprint = dict(saved.fingerprint, checkpoints=[
            c for c in saved.fingerprint["checkpoints"] if c["step"] in all_steps])
    else:
        resolved = _resolve(inputs, later=True)
        observed = list(resolved.observed)
        all_steps = observed + [s for s in resolved.available if s > observed[-1]]
        config.check(len(observed))
        check_output(output, out.overwrite, [resolved.base, *resolved.available.values()], 0)
        traj = _open(resolved.base, {s: resolved.available[s] for s in all_steps},
                     verify_checksums=inputs.verify_checksums, hf_config=inputs.hf_config)
        try:
            grams, bytes_read = _grams_only(traj, resources, out.progress)
            numels = {p.name: p.numel for p in traj.plans}
            fingerprint = traj.fingerprint()
        finally:
            traj.close()
    steps_arr = np.asarray(all_steps, dtype=np.float64)
    tensors = [analyze_tensor(name, numels.get(name, 0), g, steps_arr, len(observed), config)
               for name, g in grams.items()]
    run = RunAnalysis(all_steps, len(observed), config, tensors)
    with atomic_directory(output, out.overwrite) as tmp:
        summary = write_report(run, tmp, title=f"relex analyze: "
                                               f"{inputs.run_dir or inputs.from_fit}")
        save_fit(tmp / FIT_FILE, all_steps, fingerprint, grams, numels)
        seconds = time.perf_counter() - started
    return Analysis(output, summary, bytes_read, seconds)


def _grams_only(traj: Trajectory, resources: Resources, progress: bool):
    """The Gram pass alone: every tensor's Gram matrix and the bytes read."""
    engine = Engine(traj, PassPlan(list(traj.plans), 0, None, budget(resources.max_memory),
                                   device=resources.device, workers=resources.threads))
    with tqdm(total=engine.bytes_to_read(), unit="B", unit_scale=True, unit_divisor=1024,
              desc="relex analyze", disable=None if progress else True, leave=False) as bar:
        result = engine.run([], progress=bar.update)
    return result.grams, result.bytes_read
