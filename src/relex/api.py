"""The Python API (`extrapolate`, `reconstruct`) that the CLI is a thin face of: from a run's
checkpoints to ready-to-serve model directories.

Both plan one streaming pass (stream/plan.py) and run it (stream/engine.py), write one Hugging
Face model directory per requested step under `output` (step-S/; for a LoRA run, optionally a
PEFT adapter directory instead: output/adapter.py), save the fit (relex-fit.safetensors)
beside them, and only then move the whole output into place, so an interrupted run leaves
nothing behind.
"""

from __future__ import annotations

import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from relex.checkpoints.inputs import resolve_inputs, select_steps
from relex.errors import RelexError
from relex.fit import Extrapolation, FitConfig, Reconstruction
from relex.formats import DTYPES, open_reader
from relex.options import FitOptions, Inputs, OutputOptions, Resources, takes
from relex.output.adapter import AdapterWriter, adapter_rank, delta_outputs
from relex.output.finish import copy_model_files, metadata_source, write_provenance
from relex.output.fitfile import FIT_FILE, check_fingerprint, load_fit, save_fit
from relex.output.model import ModelWriter, atomic_directory, check_output, parse_size
from relex.stream import torchrun
from relex.stream.engine import Engine, available_memory
from relex.stream.plan import FitRule, PassPlan
from relex.stream.trajectory import Trajectory

#: the smallest default --max-memory (bytes)
MIN_DEFAULT_BUDGET = 512 * 10**6


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


def parse_fit(fit: str) -> int:
    """'linear' -> 1, 'poly2' -> 2, 'poly3' -> 3 (polynomial degree of the coefficient fit)."""
    if fit == "linear":
        return 1
    m = re.fullmatch(r"poly(\d+)", fit)
    if not m:
        raise RelexError(f"--fit {fit}: expected linear or polyN (e.g. poly2)")
    return int(m.group(1))


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
    if out.output_format not in ("hf", "lora"):
        raise RelexError(f"--output-format {out.output_format}: expected hf or lora")
    if out.lora_rank is not None and out.output_format != "lora":
        raise RelexError("--lora-rank is the rank of an adapter output: add --output-format "
                         "lora")
    saved = None
    if inputs.from_fit is not None:
        saved = _load_fit_alone(inputs)
        resolved = resolve_inputs(base=inputs.base if inputs.base is not None else saved.base,
                                  checkpoints=saved.checkpoints,
                                  observe_until=inputs.observe_until, steps=inputs.steps)
    else:
        resolved = _resolve(inputs)
    observed = list(resolved.observed)
    config.check(len(observed))
    if not fit.allow_interpolation and targets[0] <= observed[-1]:
        raise RelexError(f"--target {targets[0]} is not after the last observed step "
                         f"{observed[-1]}; pass --allow-interpolation to predict inside the window")
    traj = _open(resolved.base, resolved.observed, out.dtype, inputs.verify_checksums)
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
            warnings.warn(note, stacklevel=2)
        job = _Job("extrapolate", traj, resolved, targets, rule, config, out, resources, group,
                   grams=grams, from_fit=inputs.from_fit, adapter_rank=rank, notes=notes)
        return _write(job)
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
    traj = _open(resolved.base, resolved.observed, out.dtype, inputs.verify_checksums)
    try:
        rule = Reconstruction(traj.steps.astype(np.float64), list(range(len(targets))), config)
        return _write(_Job("reconstruct", traj, resolved, targets, rule, config, out, resources,
                           group))
    finally:
        traj.close()


def _resolve(inputs: Inputs, later: bool = False):
    return resolve_inputs(inputs.run_dir, base=inputs.base, checkpoints=inputs.checkpoints,
                          observe_until=inputs.observe_until, steps=inputs.steps,
                          revision_pattern=inputs.revision_pattern, later=later,
                          skip_unreadable=inputs.skip_unreadable)


def _open(base: Path, checkpoints: dict[int, Path], dtype: str | None = None,
          verify_checksums: bool = True) -> Trajectory:
    """The Trajectory of `base` and the {step: path} checkpoints (LoRA ones read over `base`)."""
    traj = Trajectory(open_reader(base), [open_reader(p, base=base)
                                          for p in checkpoints.values()], list(checkpoints), dtype)
    for reader in (traj.base, *traj.checkpoints):
        if reader.checksums is not None:
            reader.checksums.enabled = verify_checksums
    return traj


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


def default_budget(local_processes: int = 1) -> int:
    """--max-memory when none is given: a quarter of the RAM available now (shared by the
    processes of this node under torchrun), at least 512 MB."""
    return max(MIN_DEFAULT_BUDGET, available_memory() // 4 // max(1, local_processes))


def _budget(max_memory, local_processes: int = 1) -> int:
    return default_budget(local_processes) if max_memory is None else parse_size(max_memory)


@dataclass
class _Job:
    """Everything `_write` needs: the pass to run and where its results go."""

    mode: str
    traj: Trajectory
    inputs: Any
    targets: list[int]
    rule: FitRule
    config: FitConfig
    out: OutputOptions
    resources: Resources
    group: torchrun.Group
    grams: dict | None = None
    from_fit: Any = None
    #: write PEFT adapter directories of this r (AdapterWriter) instead of models
    adapter_rank: int | None = None
    notes: list[str] = field(default_factory=list)


def _write(job: _Job) -> Report:
    """Plan the pass, stream it, write and finalize; under torchrun each rank does its share
    (stream/torchrun.py)."""
    traj, group, output = job.traj, job.group, Path(job.out.output)
    device = torchrun.device_of(job.resources.device, group)
    _check_arguments(job, device)
    group.attempt("checking the output", lambda: check_output(
        output, job.out.overwrite, [job.inputs.base, *job.inputs.observed.values()],
        _output_bytes(job)) if group.leader else None)
    started = time.perf_counter()
    owner = torchrun.split([sum(i.nbytes for i in (p.sources if p.moves else (p.base,)))
                            for p in traj.plans], group.size)
    plan = PassPlan([p for p, r in zip(traj.plans, owner) if r == group.rank], len(job.targets),
                    job.rule, _budget(job.resources.max_memory, group.local_size),
                    grams=job.grams, lora_rank=job.adapter_rank,
                    delta_out=delta_outputs(traj) if job.adapter_rank is not None else {},
                    device=device, workers=job.resources.threads,
                    local_processes=group.local_size)
    engine = Engine(traj, plan)
    with (atomic_directory(output, job.out.overwrite) if group.leader else nullcontext()) as tmp:
        tmp = Path(group.broadcast(str(tmp) if group.leader else None))
        dirs = {s: tmp / f"step-{s}" for s in job.targets}
        writers = _open_writers(job, dirs, {p.name for p in plan.tensors})
        try:
            def stream():
                with tqdm(total=engine.bytes_to_read(), unit="B", unit_scale=True,
                          unit_divisor=1024, desc=f"relex {job.mode}", leave=False,
                          disable=None if job.out.progress and group.leader else True) as bar:
                    result = engine.run(writers, progress=bar.update)
                for w in writers:
                    w.close()
                return result

            result = group.attempt("computing its tensors", stream)
        finally:
            for w in writers:
                w.abort()
        _gather(group, result, traj)
        report = Report(output, {s: output / f"step-{s}" for s in job.targets},
                        list(map(int, traj.steps)), len(traj.plans),
                        sum(p.moves for p in traj.plans), sum(not p.moves for p in traj.plans),
                        traj.dropped, result.bytes_read, time.perf_counter() - started,
                        result.stats, job.config.rank,
                        output_format="hf" if job.adapter_rank is None else "lora",
                        lora_rank=job.adapter_rank, notes=list(job.notes))
        if job.adapter_rank is not None:
            report.norm_share = {s: {name: shares[k] for name, shares in result.kept.items()
                                     if name in writers[0].ranks}
                                 for k, s in enumerate(job.targets)}
        group.attempt("finalizing the output",
                      lambda: _finalize(job, tmp, dirs, report, result) if group.leader else None)
    report.seconds = time.perf_counter() - started
    return report


def _check_arguments(job: _Job, device: str) -> None:
    """Under torchrun: every rank was given the same arguments and sees the same inputs."""
    out = job.out
    torchrun.check_same(job.group, {
        "mode": job.mode, "targets": job.targets, "config": repr(job.config),
        "output": str(Path(out.output).resolve()), "overwrite": out.overwrite,
        "max_memory": job.resources.max_memory, "max_shard_size": out.max_shard_size,
        "device": device.split(":")[0], "from_fit": str(job.from_fit),
        "grams": job.grams is not None, "inputs": job.traj.fingerprint(),
        "plans": [(p.name, p.out_dtype) for p in job.traj.plans]})


def _output_bytes(job: _Job) -> int:
    """Bytes the outputs will take (the free-space check)."""
    plans, k = job.traj.plans, job.adapter_rank
    size = sum(p.numel * DTYPES[p.out_dtype].itemsize for p in plans
               if k is None or (p.exact and not p.factored))
    if k is not None:
        size += sum(4 * k * sum(p.shape) for p in plans if p.factored)
    return size * len(job.targets)


def _open_writers(job: _Job, dirs: dict[int, Path], owned: set[str]) -> list:
    """One writer per target; rank 0 creates the files before the other ranks open them."""
    group, traj, writers = job.group, job.traj, []
    specs = [(p.name, p.out_dtype, p.shape) for p in traj.plans]
    shard = parse_size(job.out.max_shard_size)

    def open_all(create: bool) -> None:
        for d in dirs.values():
            if create:
                d.mkdir()
            if job.adapter_rank is not None:
                writers.append(AdapterWriter(d, traj, job.adapter_rank, create=create,
                                             owned=owned))
            else:
                writers.append(ModelWriter(d, specs, shard, create=create, owned=owned))

    try:
        group.attempt("creating the output", lambda: open_all(True) if group.leader else None)
        group.attempt("opening the output", lambda: None if group.leader else open_all(False))
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return writers


def _gather(group: torchrun.Group, result, traj: Trajectory) -> None:
    """Under torchrun, every rank gets all ranks' Gram matrices and statistics, in tensor order."""
    if group.size == 1:
        return
    parts = group.all_gather((result.grams, result.stats, result.bytes_read, result.kept))
    order = [p.name for p in traj.plans]

    def merged(i):
        every = {k: v for part in parts for k, v in part[i].items()}
        return {name: every[name] for name in order if name in every}

    result.grams, result.stats, result.kept = merged(0), merged(1), merged(3)
    result.bytes_read = sum(part[2] for part in parts)


def _finalize(job: _Job, tmp: Path, dirs: dict[int, Path], report: Report, result) -> None:
    """The fit file, and each step directory's config, tokenizer and relex.json."""
    traj = job.traj
    save_fit(tmp / FIT_FILE, list(map(int, traj.steps)), traj.fingerprint(),
             job.grams if job.grams is not None else result.grams,
             {p.name: p.numel for p in traj.plans})
    meta_src = metadata_source(traj)
    for step, d in dirs.items():
        if job.adapter_rank is None:
            copy_model_files(meta_src, d, traj)
        write_provenance(d / "relex.json", report, traj, job.config, step, job.mode,
                         job.from_fit)


@dataclass
class Analysis:
    """What `analyze` wrote: the report directory, its summary numbers, cost."""

    output: Path
    summary: dict
    bytes_read: int
    seconds: float


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
                     verify_checksums=inputs.verify_checksums)
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
    engine = Engine(traj, PassPlan(list(traj.plans), 0, None, _budget(resources.max_memory),
                                   device=resources.device, workers=resources.threads))
    with tqdm(total=engine.bytes_to_read(), unit="B", unit_scale=True, unit_divisor=1024,
              desc="relex analyze", disable=None if progress else True, leave=False) as bar:
        result = engine.run([], progress=bar.update)
    return result.grams, result.bytes_read
