"""The Python API (`extrapolate`, `reconstruct`) that the CLI is a thin face of: from a run's
checkpoints to ready-to-serve model directories.

Both plan one streaming pass (stream/plan.py) and run it (stream/engine.py), write one Hugging
Face model directory per requested step under `output` (step-S/; for a LoRA run, optionally a
PEFT adapter directory instead: output/adapter.py), save the fit (relex-fit.safetensors)
beside them, and only then move the whole output into place, so an interrupted run leaves
nothing behind.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from relex.version import __version__
from relex.stream import torchrun
from relex.output.adapter import AdapterWriter, delta_outputs
from relex.checkpoints import hub
from relex.formats import DTYPES, lora, open_reader
from relex.stream.budget import available_memory
from relex.stream.engine import Engine
from relex.errors import RelexError
from relex.fit import Extrapolation, FitConfig, Reconstruction
from relex.output.fitfile import FIT_FILE, check_fingerprint, load_fit, save_fit
from relex.checkpoints.inputs import resolve_inputs, select_steps
from relex.stream.plan import FitRule, PassPlan
from relex.stream.trajectory import Trajectory
from relex.output.model import ModelWriter, atomic_directory, check_output, parse_size

#: non-weight files of a model directory that a served model needs (config, tokenizer, template)
MODEL_FILES = re.compile(
    r"(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\..*|merges\.txt|.*\.tiktoken|chat_template\..*|"
    r"preprocessor_config\.json|processor_config\.json|(configuration|modeling|tokenization)_.*\.py)")
#: the smallest default --max-memory (bytes)
MIN_DEFAULT_BUDGET = 512 * 10**6
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


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


def extrapolate(run_dir: str | Path | None = None, *, output: str | Path,
                targets: int | list[int], base: str | Path | None = None,
                checkpoints: list[str] | dict[int, str | Path] | None = None,
                observe_until: int | None = None, steps: str | list[int] | None = None,
                revision_pattern: str = hub.DEFAULT_PATTERN,
                method: str = "relex", rank: int = 1, fit: str = "linear",
                window: int | None = None, dtype: str | None = None,
                allow_interpolation: bool = False, overwrite: bool = False,
                max_memory: str | int | None = None, max_shard_size: str | int = "5GB",
                device: str = "cpu", threads: int | None = None,
                from_fit: str | Path | None = None, progress: bool = True,
                output_format: str = "hf", lora_rank: int | None = None,
                skip_unreadable: bool = False, verify_checksums: bool = True,
                group: torchrun.Group | None = None) -> Report:
    """Write the model of each target step, predicted from the observed checkpoints.

    Writes output/step-S/ for every S in targets (a Hugging Face model directory with a relex.json
    provenance file) and output/relex-fit.safetensors (reusable with from_fit).

    output_format="lora" (a LoRA run only): step-S/ is a PEFT adapter directory instead, the
    extrapolated delta compressed to rank `lora_rank` (default: the run's r; at most T * r,
    the delta's rank); Report.norm_share says how much of each delta it keeps.

    skip_unreadable: leave out (with a warning) discovered checkpoints that cannot be opened,
    instead of stopping; verify_checksums=False skips the CRC-32 check of torch.save tensor
    bytes (docs/robustness.md). Both also apply to reconstruct and analyze.

    group: the processes sharing the work (torchrun.Group); by default the torchrun world when
    launched by torchrun, else this process alone. The CLI decides it once and passes it.

    >>> relex.extrapolate("runs/grpo", base="Qwen2.5-Math-1.5B", observe_until=75,
    ...                   targets=[500, 750], output="out")
    """
    config = FitConfig(method, rank, parse_fit(fit), window)
    targets = _parse_targets(targets)
    group = group or torchrun.from_environment(device)
    if output_format not in ("hf", "lora"):
        raise RelexError(f"--output-format {output_format}: expected hf or lora")
    if lora_rank is not None and output_format != "lora":
        raise RelexError("--lora-rank is the rank of an adapter output: add --output-format "
                         "lora")
    if from_fit is not None:
        saved = _load_fit_alone(from_fit, run_dir, checkpoints)
        inputs = resolve_inputs(base=base if base is not None else saved.base,
                                checkpoints=saved.checkpoints, observe_until=observe_until,
                                steps=steps)
    else:
        saved = None
        inputs = resolve_inputs(run_dir, base=base, checkpoints=checkpoints,
                                observe_until=observe_until, steps=steps,
                                revision_pattern=revision_pattern,
                                skip_unreadable=skip_unreadable)
    observed = list(inputs.observed)
    config.check(len(observed))
    if not allow_interpolation and targets[0] <= observed[-1]:
        raise RelexError(f"--target {targets[0]} is not after the last observed step "
                         f"{observed[-1]}; pass --allow-interpolation to predict inside the window")
    traj = _open(inputs.base, inputs.observed, dtype, verify_checksums)
    try:
        if saved is not None:
            check_fingerprint(saved, traj.fingerprint())
            grams = saved.select(observed)
            _check_grams(grams, traj, saved.path)
        rule = Extrapolation(traj.steps.astype(np.float64), np.asarray(targets, float), config)
        notes: list[str] = []
        adapter_rank = (_adapter_rank(traj, lora_rank, notes) if output_format == "lora"
                        else None)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return _write(traj, inputs, targets, rule, config, output, overwrite, max_memory,
                      max_shard_size, device, threads, progress,
                      grams if saved is not None else None, mode="extrapolate",
                      from_fit=from_fit, adapter_rank=adapter_rank, notes=notes, group=group)
    finally:
        traj.close()


def reconstruct(run_dir: str | Path | None = None, *, output: str | Path,
                base: str | Path | None = None,
                checkpoints: list[str] | dict[int, str | Path] | None = None,
                observe_until: int | None = None, steps: str | list[int] | None = None,
                revision_pattern: str = hub.DEFAULT_PATTERN,
                rank: int = 1, dtype: str | None = None, overwrite: bool = False,
                max_memory: str | int | None = None, max_shard_size: str | int = "5GB",
                device: str = "cpu", threads: int | None = None,
                progress: bool = True, skip_unreadable: bool = False,
                verify_checksums: bool = True, group: torchrun.Group | None = None) -> Report:
    """Write the rank-`rank` projection of every observed checkpoint (is the run rank-r?).

    output/step-S/ holds theta_0 + the projection of D[S] onto the top-`rank` right singular
    vectors of the observed deltas; evaluating it against the real step S says how much of the
    RL gain the low-rank subspace carries.
    """
    config = FitConfig("relex", rank, 1, None)
    group = group or torchrun.from_environment(device)
    inputs = resolve_inputs(run_dir, base=base, checkpoints=checkpoints,
                            observe_until=observe_until, steps=steps,
                            revision_pattern=revision_pattern, skip_unreadable=skip_unreadable)
    targets = list(inputs.observed)
    if len(targets) < rank:
        raise RelexError(f"--rank {rank} needs at least {rank} observed checkpoints, got "
                         f"{len(targets)}")
    traj = _open(inputs.base, inputs.observed, dtype, verify_checksums)
    try:
        rule = Reconstruction(traj.steps.astype(np.float64), list(range(len(targets))), config)
        return _write(traj, inputs, targets, rule, config, output, overwrite, max_memory,
                      max_shard_size, device, threads, progress, None, mode="reconstruct",
                      group=group)
    finally:
        traj.close()


def _open(base: Path, checkpoints: dict[int, Path], dtype: str | None = None,
          verify_checksums: bool = True) -> Trajectory:
    """The Trajectory of `base` and the {step: path} checkpoints (LoRA ones read over `base`)."""
    traj = Trajectory(open_reader(base), [open_reader(p, base=base)
                                          for p in checkpoints.values()], list(checkpoints), dtype)
    for reader in (traj.base, *traj.checkpoints):
        if reader.checksums is not None:
            reader.checksums.enabled = verify_checksums
    return traj


def _adapter_rank(traj: Trajectory, lora_rank: int | None, notes: list[str]) -> int:
    """The r of an adapter output: lora_rank (default the run's r), clamped to T * r, the rank
    of any extrapolated delta (and said in `notes`). Refuses runs that are not all LoRA."""
    for step, ckpt in zip(traj.steps, traj.checkpoints):
        if ckpt.format != "lora":
            raise RelexError(f"--output-format lora: the checkpoint of step {step} ({ckpt.path})"
                             f" is a {ckpt.format} checkpoint, not a LoRA adapter; an adapter "
                             f"output needs a LoRA run (drop --output-format lora to write "
                             f"model directories)")
    last = traj.checkpoints[-1]
    if last.dora:
        raise RelexError(f"--output-format lora: {last.path} is a DoRA adapter, whose "
                         f"extrapolated delta (rows rescaled by the magnitude vector) is not a "
                         f"low-rank product; drop --output-format lora to write model "
                         f"directories")
    r_max = max((ad.rank for ad in last.adapters.values()), default=0)
    if r_max == 0:
        raise RelexError(f"--output-format lora: {last.path} adapts no weight (only full "
                         f"tensors); drop --output-format lora")
    k = int(lora.read_config(last.path)["r"]) if lora_rank is None else int(lora_rank)
    if k < 1:
        raise RelexError(f"--lora-rank {k}: give a positive rank")
    if k > traj.T * r_max:
        notes.append(f"--lora-rank {k} is more than T*r = {traj.T}*{r_max} = "
                     f"{traj.T * r_max}, the rank of the extrapolated delta: using "
                     f"{traj.T * r_max}")
        k = traj.T * r_max
    return k


def _load_fit_alone(from_fit, run_dir, checkpoints):
    """load_fit, refusing other checkpoint sources beside it."""
    if run_dir is not None or checkpoints:
        raise RelexError("--from-fit reuses the fit's own checkpoints; do not also give "
                         "RUN_DIR or --checkpoint (--steps / --observe-until pick among them)")
    return load_fit(from_fit)


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


def _write(traj: Trajectory, inputs, targets: list[int], rule: FitRule, config: FitConfig,
           output, overwrite: bool, max_memory, max_shard_size, device: str,
           threads: int | None, progress: bool, grams: dict | None, mode: str,
           group: torchrun.Group, from_fit=None, adapter_rank: int | None = None,
           notes: list[str] | None = None) -> Report:
    """Plan the pass, stream it, write and finalize; under torchrun each rank does its share
    (torchrun.py).

    adapter_rank: write PEFT adapter directories of this r (AdapterWriter) instead of models."""
    output = Path(output)
    device = torchrun.device_of(device, group)
    torchrun.check_same(group, {
        "mode": mode, "targets": targets, "config": repr(config), "output": str(output.resolve()),
        "overwrite": overwrite, "max_memory": max_memory, "max_shard_size": max_shard_size,
        "device": device.split(":")[0], "from_fit": str(from_fit), "grams": grams is not None,
        "inputs": traj.fingerprint(), "plans": [(p.name, p.out_dtype) for p in traj.plans]})
    out_bytes = sum(p.numel * DTYPES[p.out_dtype].itemsize for p in traj.plans
                    if adapter_rank is None or (p.exact and not p.factored))
    if adapter_rank is not None:
        out_bytes += sum(4 * adapter_rank * sum(p.shape) for p in traj.plans if p.factored)
    group.attempt("checking the output", lambda: check_output(
        output, overwrite, [inputs.base, *inputs.observed.values()], out_bytes * len(targets))
        if group.leader else None)
    shard = parse_size(max_shard_size)
    started = time.perf_counter()
    owner = torchrun.split([sum(i.nbytes for i in (p.sources if p.moves else (p.base,)))
                            for p in traj.plans], group.size)
    plan = PassPlan([p for p, r in zip(traj.plans, owner) if r == group.rank], len(targets),
                    rule, _budget(max_memory, group.local_size), grams=grams,
                    lora_rank=adapter_rank,
                    delta_out=delta_outputs(traj) if adapter_rank is not None else {},
                    device=device, workers=threads, local_processes=group.local_size)
    engine = Engine(traj, plan)
    owned = {p.name for p in plan.tensors}
    specs = [(p.name, p.out_dtype, p.shape) for p in traj.plans]
    meta_src = _metadata_source(traj)
    with (atomic_directory(output, overwrite) if group.leader else nullcontext()) as tmp:
        tmp = Path(group.broadcast(str(tmp) if group.leader else None))
        dirs = {s: tmp / f"step-{s}" for s in targets}
        writers = []

        def open_writers(create: bool) -> None:
            for d in dirs.values():
                if create:
                    d.mkdir()
                if adapter_rank is not None:
                    writers.append(AdapterWriter(d, traj, adapter_rank, create=create,
                                                 owned=owned))
                else:
                    writers.append(ModelWriter(d, specs, shard, create=create, owned=owned))

        try:
            # rank 0 creates the shard files before the other ranks open them
            group.attempt("creating the output",
                          lambda: open_writers(True) if group.leader else None)
            group.attempt("opening the output",
                          lambda: None if group.leader else open_writers(False))

            def stream():
                with tqdm(total=engine.bytes_to_read(), unit="B", unit_scale=True,
                          unit_divisor=1024, desc=f"relex {mode}", leave=False,
                          disable=None if progress and group.leader else True) as bar:
                    result = engine.run(writers, progress=bar.update)
                for w in writers:
                    w.close()
                return result

            result = group.attempt("computing its tensors", stream)
        finally:
            for w in writers:
                w.abort()
        if group.size > 1:  # rank 0 gathers every rank's Gram matrices and statistics
            parts = group.all_gather((result.grams, result.stats, result.bytes_read,
                                      result.kept))
            merged = {k: v for part in parts for k, v in part[0].items()}
            stats = {k: v for part in parts for k, v in part[1].items()}
            kept = {k: v for part in parts for k, v in part[3].items()}
            result.grams = {p.name: merged[p.name] for p in traj.plans if p.name in merged}
            result.stats = {p.name: stats[p.name] for p in traj.plans if p.name in stats}
            result.kept = {p.name: kept[p.name] for p in traj.plans if p.name in kept}
            result.bytes_read = sum(part[2] for part in parts)
        report = Report(output, {s: output / f"step-{s}" for s in targets},
                        list(map(int, traj.steps)), len(traj.plans),
                        sum(p.moves for p in traj.plans), sum(not p.moves for p in traj.plans),
                        traj.dropped, result.bytes_read, time.perf_counter() - started,
                        result.stats, config.rank,
                        output_format="hf" if adapter_rank is None else "lora",
                        lora_rank=adapter_rank, notes=list(notes or []))
        if adapter_rank is not None:
            report.norm_share = {s: {name: shares[k] for name, shares in result.kept.items()
                                     if name in writers[0].ranks}
                                 for k, s in enumerate(targets)}

        def finalize():
            if not group.leader:
                return
            save_fit(tmp / FIT_FILE, list(map(int, traj.steps)), traj.fingerprint(),
                     grams if grams is not None else result.grams,
                     {p.name: p.numel for p in traj.plans})
            for step, d in dirs.items():
                if adapter_rank is None:
                    _copy_model_files(meta_src, d, traj)
                _write_provenance(d / "relex.json", report, traj, config, step, mode, from_fit)

        group.attempt("finalizing the output", finalize)
    report.seconds = time.perf_counter() - started
    return report


def _metadata_source(traj: Trajectory) -> Path:
    """Config and tokenizer come from the last observed checkpoint when it has them (what the
    trainer actually ran), else from the base."""
    for ckpt in (traj.checkpoints[-1], traj.base):
        if ckpt.meta_dir is not None and (ckpt.meta_dir / "config.json").is_file():
            return ckpt.meta_dir
    return traj.base.meta_dir or traj.base.path


def _copy_model_files(src: Path, dst: Path, traj: Trajectory) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and MODEL_FILES.fullmatch(f.name):
            shutil.copyfile(f, dst / f.name)
    cfg_file = dst / "config.json"
    if not cfg_file.is_file():
        raise RelexError(f"{src}: has no config.json, so the output would not load; copy the "
                         f"base model's config.json there")
    codes = {p.out_dtype for p in traj.plans if p.moves}
    if len(codes) == 1:  # record the dtype the weights are actually written in
        cfg = json.loads(cfg_file.read_text())
        name = _TORCH_NAMES[codes.pop()]
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = name
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_provenance(path: Path, report: Report, traj: Trajectory, config: FitConfig,
                      step: int, mode: str, from_fit) -> None:
    prov = {
        "relex_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "step": step,
        "method": config.method,
        "rank": config.rank,
        "fit": config.fit_name,
        "window": config.window,
        "observed_steps": report.observed_steps,
        "base": str(traj.base.path.resolve()),
        "checkpoints": {str(s): str(c.path.resolve()) for s, c in
                        zip(traj.steps, traj.checkpoints)},
        "dtypes": sorted({p.out_dtype for p in traj.plans}),
        "tied_embeddings": traj.tied,
        "from_fit": str(from_fit) if from_fit is not None else None,
        "summary": report.summary(),
        "tensors": report.stats,
    }
    if report.output_format == "lora":
        prov["output_format"] = "lora"
        prov["lora"] = {"rank": report.lora_rank, "norm_share": report.norm_share.get(step, {}),
                        "notes": report.notes}
    path.write_text(json.dumps(prov, indent=1) + "\n")


@dataclass
class Analysis:
    """What `analyze` wrote: the report directory, its summary numbers, cost."""

    output: Path
    summary: dict
    bytes_read: int
    seconds: float


def analyze(run_dir: str | Path | None = None, *, output: str | Path,
            base: str | Path | None = None,
            checkpoints: list[str] | dict[int, str | Path] | None = None,
            observe_until: int | None = None, steps: str | list[int] | None = None,
            revision_pattern: str = hub.DEFAULT_PATTERN,
            rank: int = 1, fit: str = "linear", window: int | None = None,
            from_fit: str | Path | None = None, overwrite: bool = False,
            max_memory: str | int | None = None, device: str = "cpu", threads: int | None = None,
            progress: bool = True, skip_unreadable: bool = False,
            verify_checksums: bool = True) -> Analysis:
    """Measure a run's geometry and backtest its extrapolation; write output/report.html.

    The observed window is the checkpoints picked by observe_until / steps (default: all);
    checkpoints after it are used as the oracle. One streaming pass computes every tensor's
    Gram matrix over all of them (saved as output/relex-fit.safetensors, reusable by
    `extrapolate --from-fit` and `analyze --from-fit`, which then reads no weights at all).
    """
    if torchrun.launched():
        raise RelexError("analyze runs in one process; torchrun is for extrapolate and "
                         "reconstruct")
    from relex.analysis.backtest import RunAnalysis, analyze_tensor
    from relex.analysis.report import write_report
    config = FitConfig("relex", rank, parse_fit(fit), window)
    started = time.perf_counter()
    output = Path(output)
    bytes_read = 0
    if from_fit is not None:
        saved = _load_fit_alone(from_fit, run_dir, checkpoints)
        observed = select_steps(saved.steps, observe_until, steps)
        all_steps = observed + [s for s in saved.steps if s > observed[-1]]
        config.check(len(observed))
        check_output(output, overwrite, [], 0)
        grams, numels, fingerprint = saved.select(all_steps), saved.numels, saved.fingerprint
        fingerprint = dict(fingerprint, checkpoints=[c for c in fingerprint["checkpoints"]
                                                     if c["step"] in all_steps])
    else:
        inputs = resolve_inputs(run_dir, base=base, checkpoints=checkpoints,
                                observe_until=observe_until, steps=steps,
                                revision_pattern=revision_pattern, later=True,
                                skip_unreadable=skip_unreadable)
        observed = list(inputs.observed)
        all_steps = observed + [s for s in inputs.available if s > observed[-1]]
        config.check(len(observed))
        check_output(output, overwrite, [inputs.base, *inputs.available.values()], 0)
        traj = _open(inputs.base, {s: inputs.available[s] for s in all_steps},
                     verify_checksums=verify_checksums)
        try:
            engine = Engine(traj, PassPlan(list(traj.plans), 0, None, _budget(max_memory),
                                           device=device, workers=threads))
            with tqdm(total=engine.bytes_to_read(), unit="B", unit_scale=True,
                      unit_divisor=1024, desc="relex analyze",
                      disable=None if progress else True, leave=False) as bar:
                result = engine.run([], progress=bar.update)
            grams, bytes_read = result.grams, result.bytes_read
            numels = {p.name: p.numel for p in traj.plans}
            fingerprint = traj.fingerprint()
        finally:
            traj.close()
    steps_arr = np.asarray(all_steps, dtype=np.float64)
    tensors = [analyze_tensor(name, numels.get(name, 0), g, steps_arr, len(observed), config)
               for name, g in grams.items()]
    run = RunAnalysis(all_steps, len(observed), config, tensors)
    with atomic_directory(output, overwrite) as tmp:
        summary = write_report(run, tmp, title=f"relex analyze: {run_dir or from_fit}")
        save_fit(tmp / FIT_FILE, all_steps, fingerprint, grams, numels)
        summary_seconds = time.perf_counter() - started
    return Analysis(output, summary, bytes_read, summary_seconds)
