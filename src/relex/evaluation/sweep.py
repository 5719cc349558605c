"""`relex sweep`: extrapolate to many steps in one pass, score each on a dev set, keep the best.

Users do not want the checkpoint of step 500, they want the best model. A straight-line
extrapolation eventually overshoots (demo: accuracy 0.90 at 300 steps, 0.40 at 800), so the
target step is a hyper-parameter to choose on held-out data, like a merge coefficient.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from relex.analysis.backtest import beyond_horizon
from relex.api import extrapolate
from relex.checkpoints.discover import discover
from relex.errors import RelexError
from relex.evaluation.datasets import load_dataset
from relex.evaluation.evaluate import evaluate
from relex.checkpoints import hub
from relex.evaluation.generation import require
from relex.keywords import takes
from relex.options import EvalOptions, FitOptions, Inputs, OutputOptions, Resources
from relex.output.model import atomic_directory, check_output


@dataclass
class SweepResult:
    output: Path
    scores: dict[int, float]  # target step -> dev score of the extrapolated model
    real: dict[int, float]  # step -> dev score of a real checkpoint, where one exists
    best_step: int
    best_dir: Path
    metric: str
    #: the window's verified horizon (Report.horizon) and the targets beyond it
    horizon: dict | None = None
    beyond: list[int] = field(default_factory=list)


@takes((Inputs, ["run_dir", "base", "revision_pattern", "checkpoints", "observe_until",
                 "steps"]),
       (FitOptions, ["targets", "method", "rank", "fit", "window"]), EvalOptions,
       (Resources, ["max_memory", "device", "threads"]),
       (OutputOptions, ["output", "overwrite", "progress"]),
       required=("targets", "dataset", "output"))
def sweep(*, inputs: Inputs, fit: FitOptions, evaluation: EvalOptions, resources: Resources,
          out: OutputOptions, keep_all: bool = False, real: bool = True,
          metric: str | None = None) -> SweepResult:
    """Extrapolate to every target (one streaming pass), score each on `dataset`, keep the best.

    Writes output/best -> the best step's model directory, output/summary.json, sweep.png and
    per-sample evaluations under output/eval/. Real checkpoints at the target steps (when the
    run has them) are scored too, for the plot.

    Args:
        run_dir: the run's directory (or hf://ORG/REPO); the options are listed below.
        keep_all: keep every candidate's model directory, not only the best.
        real: also score the run's real checkpoints at the target steps.
        metric: what to maximise: accuracy (default with n=1), avg@n (default with n > 1) or
            pass@k.

    Returns:
        SweepResult: the score of each target, of the real checkpoints, and the best step.

    Example:
        >>> relex.sweep("runs/grpo", base="models/base", observe_until=75,
        ...             targets=[200, 300, 500], dataset="dev.jsonl", output="sweep")
    """
    targets = sorted(set(int(t) for t in fit.targets))
    if len(targets) < 2:
        raise RelexError("--targets: a sweep needs at least two target steps")
    ev = evaluation
    data = load_dataset(ev.dataset, question_field=ev.question_field,
                        answer_field=ev.answer_field, split=ev.split,
                        limit=ev.limit)  # fail fast, before the long pass
    require(ev.backend, data.task)
    metric = metric or ("accuracy" if ev.n == 1 else f"avg@{ev.n}")
    output, run_dir = Path(out.output), inputs.run_dir
    local = [p for p in (run_dir, inputs.base) if p is not None and not hub.is_hub(p)]
    check_output(output, out.overwrite, [Path(p) for p in local], 0)
    if not real or run_dir is None:
        found = {}
    elif hub.is_hub(run_dir):  # only the real checkpoints at the targets are downloaded
        found = hub.checkpoints(run_dir, lambda s: s in targets, inputs.revision_pattern)
    else:
        found = discover(run_dir)
    with atomic_directory(output, out.overwrite) as tmp:
        with warnings.catch_warnings():  # targets past the horizon: in the summary instead
            warnings.simplefilter("ignore", UserWarning)
            report = extrapolate(targets=targets, output=tmp / "candidates",
                                 progress=out.progress, **vars(inputs), **vars(resources),
                                 **{k: v for k, v in vars(fit).items() if k != "targets"})
        beyond = beyond_horizon((report.horizon or {}).get("verified_up_to_step"), targets,
                                report.observed_steps[-1])
        models = [tmp / "candidates" / f"step-{t}" for t in targets]
        reals = [found[t] for t in targets if t in found]
        common = dict(vars(ev), progress=out.progress)
        scores = evaluate(models, output=tmp / "eval" / "extrapolated", **common)
        real_scores = evaluate(reals, output=tmp / "eval" / "real", **common) \
            if reals else []
        if metric not in scores[0].metrics:
            raise RelexError(f"--metric {metric}: not measured (have "
                             f"{', '.join(k for k in scores[0].metrics if '@' in k or k == 'accuracy')})")
        by_step = {t: s.metrics[metric] for t, s in zip(targets, scores)}
        real_by_step = {t: s.metrics[metric] for t, s in
                        zip([t for t in targets if t in found], real_scores)}
        best = max(targets, key=lambda t: (by_step[t], -t))  # ties: the earlier step
        for t in targets:
            if t != best and not keep_all:
                shutil.rmtree(tmp / "candidates" / f"step-{t}")
        (tmp / "best").symlink_to(Path("candidates") / f"step-{best}")
        summary = {"dataset": data.name, "problems": len(data.problems), "metric": metric,
                   "method": fit.method, "targets": targets, "scores": by_step,
                   "real_scores": real_by_step, "best_step": best, "best_score": by_step[best],
                   "kept": "all" if keep_all else [best], "horizon": report.horizon,
                   "beyond_verified_horizon": beyond}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot(by_step, real_by_step, best, metric, data.name, tmp / "sweep.png")
    return SweepResult(output, by_step, real_by_step, best,
                       output / "candidates" / f"step-{best}", metric, report.horizon, beyond)


def plot(scores: dict[int, float], real: dict[int, float], best: int, metric: str,
         dataset: str, path: Path) -> None:
    from relex.analysis.report import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted(scores)
    ax.plot(xs, [scores[x] for x in xs], "o-", label="extrapolated")
    if real:
        rx = sorted(real)
        ax.plot(rx, [real[x] for x in rx], "s--", color="black", label="real checkpoint")
    ax.plot([best], [scores[best]], "*", ms=16, color="tab:red", label=f"best: step {best}")
    ax.set_xlabel("target step")
    ax.set_ylabel(f"{metric} on {dataset}")
    ax.set_title("relex sweep: dev score of the extrapolated models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
