"""`relex eval`: score models on a verifiable-reward dataset, or grade responses made elsewhere.

Generation runs on vLLM when it is installed and a GPU is present, otherwise on transformers
(batched `generate`, CPU or GPU). Math answers are graded with math-verify (gold parsed first,
\\boxed{} answers preferred, parsing time-outs), the demo's arithmetic task by exact match.
Per-sample results are appended to OUT/<model>/samples.jsonl after every batch, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relex.errors import RelexError

QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
#: short names for common math benchmarks on the Hugging Face hub: repo, split, question, answer
HUB_DATASETS = {
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("yentinglin/aime_2025", "train", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
}
#: the demo's task: its held-out test set (as in `relex demo`) and a disjoint dev set
ARITHMETIC = {"arithmetic": 1234, "arithmetic-dev": 4321}


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


# ---------------------------------------------------------------------- datasets
def load_dataset(spec: str, *, question_field: str | None = None, answer_field: str = "answer",
                 split: str | None = None, limit: int | None = None) -> Dataset:
    """A local JSONL/JSON/Parquet file, a hub dataset (short name or repo id), or 'arithmetic'."""
    if spec in ARITHMETIC:
        from relex import arithmetic as A
        probs = A.heldout(500, seed=ARITHMETIC[spec])
        answers = ["".join(map(str, row)) for row in probs.answers().tolist()]
        items = [Problem(f"{a:03d}+{b:03d}=", ans, {"a": a, "b": b}) for a, b, ans in
                 zip(probs.a.tolist(), probs.b.tolist(), answers)]
        return Dataset(spec, items[:limit], "arithmetic")
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise RelexError(f"--dataset {spec}: no such file")
        rows = _read_rows(path)
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


def _read_rows(path: Path) -> list[dict]:
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


# ---------------------------------------------------------------------- grading
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


def grade_arithmetic(response: str, gold: str) -> tuple[str | None, bool]:
    digits = "".join(c for c in response if c.isdigit())[:4] or None
    return digits, digits == gold


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


# ---------------------------------------------------------------------- generation
def format_prompt(tokenizer, question: str, template: str) -> str:
    """auto: the model's chat template if it has one, else the question; qwen-math: the same
    with Qwen's boxed-answer instruction; raw: the question; anything with {question}: used as
    a format string."""
    if "{question}" in template:
        return template.format(question=question)
    if template == "raw":
        return question
    if template not in ("auto", "qwen-math"):
        raise RelexError(f"--template {template}: expected auto, qwen-math, raw or a string "
                         f"with {{question}}")
    content = question + ("\n" + QWEN_MATH_INSTRUCTION if template == "qwen-math" else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return content


def pick_backend(backend: str) -> str:
    if backend == "auto":
        import importlib.util
        return "vllm" if (importlib.util.find_spec("vllm") and torch.cuda.is_available()) \
            else "transformers"
    if backend not in ("vllm", "transformers"):
        raise RelexError(f"--backend {backend}: expected auto, vllm or transformers")
    return backend


class TransformersGenerator:
    """Batched sampling with transformers (left padding; CPU, or CUDA when available)."""

    def __init__(self, model_dir: Path, template: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
        self.model.eval()
        self.template = template

    def prompt(self, question: str) -> str:
        return format_prompt(self.tok, question, self.template)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[list[str]]:
        torch.manual_seed(seed)
        templated = getattr(self.tok, "chat_template", None) and self.template != "raw"
        enc = self.tok(prompts, return_tensors="pt", padding=True,
                       add_special_tokens=not templated).to(self.model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) \
            if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(**enc, max_new_tokens=max_tokens, num_return_sequences=n,
                                  pad_token_id=self.tok.pad_token_id, **sampling)
        texts = self.tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator:
    """vLLM's offline engine (GPU). Not exercised by the test suite (no GPU in CI)."""

    def __init__(self, model_dir: Path, template: str):
        from vllm import LLM
        self.llm = LLM(model=str(model_dir), dtype="auto")
        self.tok = self.llm.get_tokenizer()
        self.template = template

    def prompt(self, question: str) -> str:
        return format_prompt(self.tok, question, self.template)

    def generate(self, prompts, n, temperature, max_tokens, seed):
        from vllm import SamplingParams
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        return [[o.text for o in r.outputs] for r in self.llm.generate(prompts, params)]

    def close(self):
        import gc
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()


class ArithmeticGenerator:
    """The demo's 13-token models: token prompts, 4 generated digits, no tokenizer files."""

    def __init__(self, model_dir: Path, template: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.model.eval()

    def prompt(self, question: str) -> str:
        return question

    def generate(self, prompts, n, temperature, max_tokens, seed):
        from relex import arithmetic as A
        a = torch.tensor([int(p[:3]) for p in prompts]).repeat_interleave(n)
        b = torch.tensor([int(p[4:7]) for p in prompts]).repeat_interleave(n)
        gen = torch.Generator().manual_seed(seed)
        tokens = A.generate(self.model, A.Problems(a, b).prompts(), temperature, gen)
        texts = ["".join(map(str, row)) for row in tokens.tolist()]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


# ---------------------------------------------------------------------- evaluation
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
        kind = ArithmeticGenerator if data.task == "arithmetic" else (
            VLLMGenerator if pick_backend(backend) == "vllm" else TransformersGenerator)
        gen = kind(model_dir, template)
        grader = grade_arithmetic if data.task == "arithmetic" else grade
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


def grade_responses(path: str | Path, *, answer_field: str = "answer",
                    response_field: str = "response", id_field: str | None = None,
                    output: str | Path | None = None) -> dict:
    """Grade completions produced elsewhere (one JSON object per line).

    Each output row is the input row plus `extracted` and `correct`; rows sharing `id_field`
    are samples of one problem (for avg@n and pass@k). Writes output/graded.jsonl and
    output/summary.json when output is given; returns the metrics."""
    path = Path(path)
    rows = _read_rows(path)
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


def quiet_transformers() -> None:
    """transformers draws a progress bar per model load; relex shows its own."""
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
