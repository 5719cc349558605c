"""`relex sweep`: extrapolate to many steps in one pass, score each on a dev set, keep the best.

Users do not want the checkpoint of step 500, they want the best model. A straight-line
extrapolation eventually overshoots (demo: accuracy 0.90 at 300 steps, 0.40 at 800), so the
target step is a hyper-parameter to choose on held-out data, like a merge coefficient.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from relex.api import extrapolate
from relex.checkpoints.discover import discover
from relex.errors import RelexError
from relex.evaluation.datasets import load_dataset
from relex.evaluation.evaluate import evaluate
from relex.checkpoints import hub
from relex.output.model import atomic_directory, check_output


@dataclass
class SweepResult:
    output: Path
    scores: dict[int, float]  # target step -> dev score of the extrapolated model
    real: dict[int, float]  # step -> dev score of a real checkpoint, where one exists
    best_step: int
    best_dir: Path
    metric: str


def sweep(run_dir: str | Path | None = None, *, targets: list[int], dataset: str,
          output: str | Path, base: str | Path | None = None,
          checkpoints: list[str] | None = None, observe_until: int | None = None,
          steps: str | list[int] | None = None, method: str = "relex", rank: int = 1,
          fit: str = "linear", window: int | None = None, keep_all: bool = False,
          real: bool = True, metric: str | None = None, n: int = 1, temperature: float = 0.0,
          max_tokens: int = 1024, template: str = "auto", backend: str = "auto",
          seed: int = 0, limit: int | None = None, question_field: str | None = None,
          answer_field: str = "answer", split: str | None = None, overwrite: bool = False,
          max_memory: str | int | None = None, device: str = "cpu",
          revision_pattern: str = hub.DEFAULT_PATTERN, progress: bool = True) -> SweepResult:
    """Extrapolate to every target (one streaming pass), score each on `dataset`, keep the best.

    Writes output/best -> the best step's model directory, output/summary.json, sweep.png and
    per-sample evaluations under output/eval/. Real checkpoints at the target steps (when the
    run has them) are scored too, for the plot. `metric`: accuracy, or avg@n when n > 1.
    """
    targets = sorted(set(int(t) for t in targets))
    if len(targets) < 2:
        raise RelexError("--targets: a sweep needs at least two target steps")
    data = load_dataset(dataset, question_field=question_field, answer_field=answer_field,
                        split=split, limit=limit)  # fail fast, before the long pass
    metric = metric or ("accuracy" if n == 1 else f"avg@{n}")
    output = Path(output)
    local = [p for p in (run_dir, base) if p is not None and not hub.is_hub(p)]
    check_output(output, overwrite, [Path(p) for p in local], 0)
    if not real or run_dir is None:
        found = {}
    elif hub.is_hub(run_dir):  # only the real checkpoints at the targets are downloaded
        found = hub.checkpoints(run_dir, lambda s: s in targets, revision_pattern)
    else:
        found = discover(run_dir)
    with atomic_directory(output, overwrite) as tmp:
        extrapolate(run_dir, targets=targets, output=tmp / "candidates", base=base,
                          checkpoints=checkpoints, observe_until=observe_until, steps=steps,
                          method=method, rank=rank, fit=fit, window=window,
                          max_memory=max_memory, device=device,
                          revision_pattern=revision_pattern, progress=progress)
        models = [tmp / "candidates" / f"step-{t}" for t in targets]
        reals = [found[t] for t in targets if t in found]
        common = dict(n=n, temperature=temperature, max_tokens=max_tokens, template=template,
                      backend=backend, seed=seed, progress=progress, limit=limit,
                      question_field=question_field, answer_field=answer_field, split=split)
        scores = evaluate(models, dataset, output=tmp / "eval" / "extrapolated", **common)
        real_scores = evaluate(reals, dataset, output=tmp / "eval" / "real", **common) \
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
                   "method": method, "targets": targets, "scores": by_step,
                   "real_scores": real_by_step, "best_step": best, "best_score": by_step[best],
                   "kept": "all" if keep_all else [best]}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot(by_step, real_by_step, best, metric, data.name, tmp / "sweep.png")
    return SweepResult(output, by_step, real_by_step, best,
                       output / "candidates" / f"step-{best}", metric)


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
