"""Datasets for `relex eval`: local JSONL / JSON / Parquet files, hub datasets by short name or
repo id, and the demo's arithmetic task."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexError

QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
#: short names for common math benchmarks on the Hugging Face hub: repo, split, question, answer
HUB_DATASETS = {
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("yentinglin/aime_2025", "train", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    row: dict  # the original record, kept in per-sample output


@dataclass(frozen=True)
class Dataset:
    name: str
    problems: list[Problem]
    task: str  # "math" (math-verify) or "arithmetic" (exact match, the demo's tokenizer-free model)


def load_dataset(spec: str, *, question_field: str | None = None, answer_field: str = "answer",
                 split: str | None = None, limit: int | None = None) -> Dataset:
    """A local JSONL/JSON/Parquet file, a hub dataset (short name or repo id), or 'arithmetic'."""
    from relex.demo import arithmetic
    if spec in arithmetic.DATASETS:
        problems = [Problem(*record) for record in arithmetic.dataset_problems(spec)]
        return Dataset(spec, problems[:limit], "arithmetic")
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise RelexError(f"--dataset {spec}: no such file")
        rows = read_rows(path)
    else:
        rows, question_field, answer_field = _hub_rows(spec, split, question_field, answer_field)
    if not rows:
        raise RelexError(f"--dataset {spec}: no rows")
    qf = question_field or next((f for f in ("question", "problem", "prompt") if f in rows[0]),
                                None)
    for f, flag in ((qf, "--question-field"), (answer_field, "--answer-field")):
        if f is None or f not in rows[0]:
            raise RelexError(f"--dataset {spec}: rows have no field '{f}' (fields: "
                             f"{', '.join(rows[0])}); set {flag}")
    problems = [Problem(str(r[qf]), str(r[answer_field]), r) for r in rows]
    return Dataset(path.stem if path.suffix else spec, problems[:limit], "math")


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RelexError("reading Parquet needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RelexError(f"{path}:{i}: not a JSON object ({e.msg})") from None
    return rows


def _hub_rows(spec, split, question_field, answer_field):
    repo, default_split, qf, af = HUB_DATASETS.get(spec, (spec, "test", None, answer_field))
    try:
        import datasets
    except ImportError:
        raise RelexError(f"--dataset {spec}: hub datasets need the `datasets` package (pip "
                         f"install datasets), or pass a local JSONL/Parquet file") from None
    try:
        ds = datasets.load_dataset(repo, split=split or default_split)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad split: all say the same
        raise RelexError(f"--dataset {spec}: could not load {repo} from the Hugging Face hub "
                         f"({type(e).__name__}); offline? download it elsewhere and pass the "
                         f"JSONL/Parquet file") from None
    return list(ds), question_field or qf, answer_field if answer_field != "answer" else af
