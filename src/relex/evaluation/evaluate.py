"""`relex eval`: score models on a verifiable-reward dataset.

Per-sample results are appended to OUT/<model>/samples.jsonl after every batch, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from relex.errors import RelexError
from relex.evaluation.datasets import Dataset, load_dataset
from relex.evaluation.generation import (TransformersGenerator, VLLMGenerator, pick_backend,
                                         require,
                                         quiet_transformers)
from relex.evaluation.grading import grade, grade_responses, metrics

__all__ = ["ModelScore", "evaluate", "evaluate_model", "grade_responses"]


@dataclass
class ModelScore:
    model: str
    label: str
    metrics: dict
    samples: list[dict] = field(default_factory=list)


def evaluate_model(model_dir: Path, data: Dataset, *, n: int = 1, temperature: float = 0.0,
                   max_tokens: int = 1024, template: str = "auto", backend: str = "auto",
                   seed: int = 0, batch_size: int = 16, out_dir: Path | None = None,
                   label: str | None = None, progress=None) -> ModelScore:
    """Sample n responses per problem, grade them, and return the metrics.

    With out_dir, samples.jsonl there is appended batch by batch and reused on a second call
    with the same settings (resume)."""
    model_dir = Path(model_dir)
    if n > 1 and temperature <= 0:
        raise RelexError(f"--n {n} with greedy decoding gives {n} identical samples; set "
                         f"--temperature > 0")
    settings = {"model": str(model_dir.resolve()), "dataset": data.name, "problems":
                len(data.problems), "n": n, "temperature": temperature,
                "max_tokens": max_tokens, "template": template, "seed": seed}
    done: dict[int, list[dict]] = {}
    if out_dir is not None:
        done = _resume(out_dir, settings)
    todo = [i for i in range(len(data.problems)) if len(done.get(i, [])) < n]
    if todo:
        if data.task == "arithmetic":
            from relex.demo import arithmetic
            kind, grader = arithmetic.Generator, arithmetic.grade
        else:
            kind = VLLMGenerator if pick_backend(backend) == "vllm" else TransformersGenerator
            grader = grade
        gen = kind(model_dir, template)
        step = len(todo) if kind is VLLMGenerator else batch_size
        for start in range(0, len(todo), step):
            batch = todo[start:start + step]
            prompts = [gen.prompt(data.problems[i].question) for i in batch]
            outs = gen.generate(prompts, n, temperature, max_tokens, seed + batch[0])
            rows = []
            for i, prompt, responses in zip(batch, prompts, outs):
                for j, response in enumerate(responses):
                    extracted, ok = grader(response, data.problems[i].answer)
                    rows.append({"problem": i, "sample": j, "prompt": prompt,
                                 "response": response, "gold": data.problems[i].answer,
                                 "extracted": extracted, "correct": ok})
                done[i] = [r for r in rows if r["problem"] == i]
            if out_dir is not None:
                with open(out_dir / "samples.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            if progress:
                progress(len(batch))
        if hasattr(gen, "close"):
            gen.close()
    correct = [[r["correct"] for r in sorted(done[i], key=lambda r: r["sample"])][:n]
               for i in range(len(data.problems))]
    score = ModelScore(str(model_dir), label or model_dir.name, metrics(correct),
                       [r for i in sorted(done) for r in done[i]])
    if out_dir is not None:
        (out_dir / "metrics.json").write_text(json.dumps(score.metrics, indent=1) + "\n")
    return score


def _resume(out_dir: Path, settings: dict) -> dict[int, list[dict]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sfile = out_dir / "settings.json"
    if sfile.is_file():
        old = json.loads(sfile.read_text())
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise RelexError(f"{out_dir}: holds samples made with other settings ({', '.join(diff)}"
                             f"); use another --output or delete that directory")
    else:
        sfile.write_text(json.dumps(settings, indent=1) + "\n")
    latest: dict[tuple[int, int], dict] = {}  # (problem, sample) -> its last line
    samples = out_dir / "samples.jsonl"
    if samples.is_file():
        for line in samples.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption: redo it
                continue
            latest[(row["problem"], row["sample"])] = row
    done: dict[int, list[dict]] = {}
    for (i, _), row in sorted(latest.items()):
        done.setdefault(i, []).append(row)
    return {i: rows for i, rows in done.items() if len(rows) >= settings["n"]}


def labels_for(models: list[Path]) -> list[str]:
    """Directory names, with the parent added where two models share a name."""
    names = [m.name for m in models]
    return [f"{m.parent.name}-{m.name}" if names.count(m.name) > 1 else m.name for m in models]


def evaluate(models: list[str | Path], dataset: str, *, n: int = 1, temperature: float = 0.0,
             max_tokens: int = 1024, template: str = "auto", backend: str = "auto",
             seed: int = 0, batch_size: int = 16, limit: int | None = None,
             question_field: str | None = None, answer_field: str = "answer",
             split: str | None = None, output: str | Path | None = None,
             progress: bool = True) -> list[ModelScore]:
    """Score each model directory on a dataset; with output, write per-sample JSONL (resumable)
    and output/summary.json across models."""
    from tqdm.auto import tqdm
    quiet_transformers()
    models = [Path(m) for m in models]
    for m in models:
        if not (m / "config.json").is_file():
            raise RelexError(f"{m}: not a model directory (no config.json)")
    data = load_dataset(dataset, question_field=question_field, answer_field=answer_field,
                        split=split, limit=limit)
    require(backend, data.task)
    out = Path(output) if output is not None else None
    scores = []
    for model, label in zip(models, labels_for(models)):
        with tqdm(total=len(data.problems), desc=f"eval {label}", unit="problem",
                  disable=None if progress else True, leave=False) as bar:
            scores.append(evaluate_model(
                model, data, n=n, temperature=temperature, max_tokens=max_tokens,
                template=template, backend=backend, seed=seed, batch_size=batch_size,
                out_dir=out / label if out is not None else None, label=label,
                progress=bar.update))
    if out is not None:
        summary = {"dataset": data.name, "problems": len(data.problems), "n": n,
                   "temperature": temperature, "max_tokens": max_tokens, "template": template,
                   "seed": seed, "models": {s.label: {"path": s.model, **s.metrics}
                                            for s in scores}}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return scores
