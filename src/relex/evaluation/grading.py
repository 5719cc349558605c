"""Grading: math answers with math-verify (gold parsed first, \\boxed{} answers preferred,
parsing time-outs), pass@k, and grading responses made elsewhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

from relex.errors import RelexError
from relex.evaluation.datasets import read_rows


def grade(response: str, gold: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for a math response, graded with math-verify.

    The gold answer is parsed first (wrapped in $...$ when it is bare LaTeX); the response's
    \\boxed{} answer is preferred, the last number or expression otherwise."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise RelexError("grading needs math-verify: pip install math-verify "
                         "(or 'relex[eval]')") from None
    gold_text = gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"
    gold_parsed = parse(gold_text, parsing_timeout=5)
    pred = parse(response, parsing_timeout=5)
    extracted = str(pred[-1]) if pred else None
    if not gold_parsed or not pred:
        return extracted, False
    return extracted, bool(verify(gold_parsed, pred, timeout_seconds=5))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c,k)/C(n,k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def metrics(correct: list[list[bool]]) -> dict:
    """accuracy (first sample), avg@n, pass@k (k = 1, 2, 4, ..., n) over problems."""
    n = min(len(c) for c in correct) if correct else 0
    out = {"problems": len(correct), "samples_per_problem": n}
    if not correct or n == 0:
        return out
    out["accuracy"] = sum(c[0] for c in correct) / len(correct)
    out[f"avg@{n}"] = sum(sum(c[:n]) / n for c in correct) / len(correct)
    k = 1
    while k <= n:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(c[:n]), k) for c in correct) / len(correct)
        k *= 2
    if n & (n - 1):  # n not a power of two: report pass@n too
        out[f"pass@{n}"] = sum(any(c[:n]) for c in correct) / len(correct)
    return out


def grade_responses(path: str | Path, *, answer_field: str = "answer",
                    response_field: str = "response", id_field: str | None = None,
                    output: str | Path | None = None) -> dict:
    """Grade completions produced elsewhere (one JSON object per line).

    Each output row is the input row plus `extracted` and `correct`; rows sharing `id_field`
    are samples of one problem (for avg@n and pass@k). Writes output/graded.jsonl and
    output/summary.json when output is given; returns the metrics."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise RelexError(f"{path}: no rows")
    for f, flag in ((answer_field, "--answer-field"), (response_field, "--response-field")):
        missing = [i for i, r in enumerate(rows, 1) if f not in r]
        if missing:
            raise RelexError(f"{path}:{missing[0]}: no field '{f}' (fields: "
                             f"{', '.join(rows[missing[0] - 1])}); set {flag}")
    groups: dict = {}
    for i, r in enumerate(rows):
        extracted, ok = grade(str(r[response_field]), str(r[answer_field]))
        r.update(extracted=extracted, correct=ok)
        groups.setdefault(r.get(id_field, i) if id_field else i, []).append(ok)
    result = metrics(list(groups.values()))
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "graded.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (out / "summary.json").write_text(json.dumps({"responses": str(path), **result},
                                                     indent=1) + "\n")
    return result
