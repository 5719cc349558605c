"""A write job: one streaming pass whose results land in step directories.

The public functions (relex.api) build a WriteJob from the user's options; `write` plans the
pass (stream/plan.py), splits the tensors among the ranks under torchrun, opens one writer per
target (a model or an adapter directory), runs the engine, gathers the ranks' statistics, and
finishes the directories (fit file, config and tokenizer, relex.json) before they are moved into
place at once.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from relex.analysis.backtest import verified_horizon
from relex.errors import RelexError
from relex.fit import FitConfig
from relex.formats import DTYPES
from relex.options import OutputOptions, Resources
from relex.output.adapter import AdapterWriter, delta_outputs
from relex.output.finish import copy_model_files, metadata_source, write_provenance
from relex.output.fitfile import FIT_FILE, save_fit
from relex.output.model import ModelWriter, atomic_directory, check_output, parse_size
from relex.output.native import NativeWriter, Template, tree_bytes
from relex.results import Report
from relex.stream import torchrun
from relex.stream.engine import Engine
from relex.stream.budget import budget
from relex.stream.plan import FitRule, PassPlan
from relex.stream.trajectory import Trajectory


@dataclass
class WriteJob:
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
    #: refuse targets beyond the verified horizon (--strict-horizon)
    strict_horizon: bool = False
    #: write into copies of this step directory instead (--output-format native)
    native: Template | None = None

    @property
    def output_format(self) -> str:
        return "native" if self.native else "lora" if self.adapter_rank is not None else "hf"


def write(job: WriteJob) -> Report:
    """Plan the pass, stream it, write and finalize; under torchrun each rank does its share
    (stream/torchrun.py)."""
    traj, group, output = job.traj, job.group, Path(job.out.output)
    device = torchrun.device_of(job.resources.device, group)
    _check_arguments(job, device)
    inputs = [job.inputs.base, *job.inputs.observed.values()]
    inputs += [job.native.root] if job.native else []
    group.attempt("checking the output", lambda: check_output(
        output, job.out.overwrite, inputs, _output_bytes(job)) if group.leader else None)
    started = time.perf_counter()
    # a saved fit: the horizon is known (and --strict-horizon can refuse) before the pass
    checked = _horizon(job, job.grams) if job.grams is not None else None
    owner = torchrun.split([sum(i.nbytes for i in (p.sources if p.moves else (p.base,)))
                            for p in traj.plans], group.size)
    plan = PassPlan([p for p, r in zip(traj.plans, owner) if r == group.rank], len(job.targets),
                    job.rule, budget(job.resources.max_memory, group.local_size),
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
        horizon, beyond = checked or _horizon(job, result.grams)
        report = Report(output, {s: output / f"step-{s}" for s in job.targets},
                        list(map(int, traj.steps)), len(traj.plans),
                        sum(p.moves and not p.unchanged for p in traj.plans),
                        sum(not p.moves or p.unchanged for p in traj.plans),
                        traj.dropped, result.bytes_read, time.perf_counter() - started,
                        result.stats, job.config.rank,
                        output_format=job.output_format,
                        lora_rank=job.adapter_rank, notes=list(job.notes),
                        horizon=horizon, warnings=beyond)
        if job.adapter_rank is not None:
            report.norm_share = {s: {name: shares[k] for name, shares in result.kept.items()
                                     if name in writers[0].ranks}
                                 for k, s in enumerate(job.targets)}
        group.attempt("finalizing the output",
                      lambda: _finalize(job, tmp, dirs, report, result, writers) if group.leader
                      else None)
    report.seconds = time.perf_counter() - started
    return report


def _horizon(job: WriteJob, grams: dict) -> tuple[dict | None, list[str]]:
    """The verified horizon of the fitted window and one line per target beyond it; with
    strict_horizon such a target is an error (raised inside the temporary output, so nothing
    is written)."""
    if job.mode != "extrapolate":
        return None, []
    steps = [int(s) for s in job.traj.steps]
    h = verified_horizon(grams, steps, job.config)
    beyond = h.beyond(job.targets, steps[-1])
    if h.ratio is None:
        lines = [f"the verified horizon is unknown ({h.rule}): no backtest supports step "
                 f"{', '.join(map(str, beyond))}"] if beyond else []
    else:
        lines = [f"target step {t} is {t / steps[-1]:.1f}x the last observed step {steps[-1]}, "
                 f"beyond the verified horizon of {h.ratio:.2f}x (step {h.up_to_step}): this "
                 f"window's backtest does not support it; score it (relex sweep / relex eval) "
                 f"or observe longer" for t in beyond]
    if lines and job.strict_horizon:
        raise RelexError(f"--strict-horizon: {lines[0]}; nothing was written")
    return h.as_dict(), lines


def _check_arguments(job: WriteJob, device: str) -> None:
    """Under torchrun: every rank was given the same arguments and sees the same inputs."""
    out = job.out
    torchrun.check_same(job.group, {
        "mode": job.mode, "targets": job.targets, "config": repr(job.config),
        "output": str(Path(out.output).resolve()), "overwrite": out.overwrite,
        "max_memory": job.resources.max_memory, "max_shard_size": out.max_shard_size,
        "device": device.split(":")[0], "from_fit": str(job.from_fit),
        "grams": job.grams is not None, "inputs": job.traj.fingerprint(),
        "plans": [(p.name, p.out_dtype) for p in job.traj.plans]})


def _output_bytes(job: WriteJob) -> int:
    """Bytes the outputs will take (the free-space check)."""
    plans, k = job.traj.plans, job.adapter_rank
    if job.native:
        return tree_bytes(job.native.root) * len(job.targets)
    size = sum(p.numel * DTYPES[p.out_dtype].itemsize for p in plans
               if k is None or (p.exact and not p.factored))
    if k is not None:
        size += sum(4 * k * sum(p.shape) for p in plans if p.factored)
    return size * len(job.targets)


def _open_writers(job: WriteJob, dirs: dict[int, Path], owned: set[str]) -> list:
    """One writer per target; rank 0 creates the files before the other ranks open them."""
    group, traj, writers = job.group, job.traj, []
    specs = [(p.name, p.out_dtype, p.shape) for p in traj.plans]
    shard = parse_size(job.out.max_shard_size)

    def open_all(create: bool) -> None:
        for d in dirs.values():
            if create:
                d.mkdir()
            if job.native:
                writers.append(NativeWriter(d, job.native, {
                    p.name: p.numel for p in traj.plans if p.name in job.native.dtypes},
                    create=create, owned=owned))
            elif job.adapter_rank is not None:
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


def _finalize(job: WriteJob, tmp: Path, dirs: dict[int, Path], report: Report, result,
              writers: list) -> None:
    """The fit file, and each step directory's config, tokenizer and relex.json (native
    output: the CRC-32s of what every rank wrote, by the writer of each target)."""
    traj = job.traj
    save_fit(tmp / FIT_FILE, list(map(int, traj.steps)), traj.fingerprint(),
             job.grams if job.grams is not None else result.grams,
             {p.name: p.numel for p in traj.plans})
    meta_src = metadata_source(traj)
    for (step, d), writer in zip(dirs.items(), writers):
        if job.native:
            writer.seal()
        elif job.adapter_rank is None:
            copy_model_files(meta_src, d, traj)
        write_provenance(d / "relex.json", report, traj, job.config, step, job.mode,
                         job.from_fit, job.native)
