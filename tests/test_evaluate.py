"""relex eval / sweep: grading, metrics, generation on CPU, resume, responses files, sweep."""

import itertools
import json
import math
import sys
import types

import pytest

import relex
from relex import cli
from relex.errors import RelexError
from relex.evaluation.datasets import load_dataset
from relex.evaluation.evaluate import evaluate
from relex.evaluation.grading import grade, grade_responses, metrics, pass_at_k


@pytest.mark.parametrize("gold,response", [
    ("\\frac{1}{2}", "so the answer is \\boxed{0.5}"),
    ("0.5", "\\boxed{\\frac12}"),
    ("\\dfrac{3}{4}", "\\boxed{\\tfrac{3}{4}}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}"),
    ("[1,3)", "\\boxed{[1, 3)}"),
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}"),
    ("10", "\\boxed{10\\text{ cm}}"),
    ("1000", "\\boxed{1,000}"),
    ("1,000,000", "\\boxed{1000000}"),
    ("5", "First \\boxed{\\boxed{5}}"),
    ("\\text{(B)}", "\\boxed{B}"),
    ("x^2+1", "\\boxed{1+x^2}"),
    ("-\\frac{\\pi}{2}", "\\boxed{-\\pi/2}"),
    ("80\\%", "\\boxed{0.8}"),
    ("12", "We get 7 then 12. The answer is 12."),
])
def test_equivalent_answers_are_correct(gold, response):
    extracted, ok = grade(response, gold)
    assert ok, (gold, response, extracted)
    assert extracted is not None


@pytest.mark.parametrize("gold,response", [
    ("12", "\\boxed{13}"),
    ("(1,3]", "\\boxed{[1,3]}"),
    ("\\{1,2\\}", "\\boxed{\\{1,2,3\\}}"),
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("2\\sqrt{2}", "\\boxed{2\\sqrt{3}}"),
    ("5", "I do not know"),
])
def test_wrong_answers_are_wrong(gold, response):
    assert not grade(response, gold)[1]


def test_pass_at_k_matches_brute_force():
    for n, c, k in [(8, 3, 1), (8, 3, 2), (8, 3, 4), (5, 0, 2), (5, 5, 3), (6, 2, 6), (4, 1, 3)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_metrics():
    m = metrics([[True, False, False, True], [False, False, False, False], [True] * 4])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)


@pytest.fixture
def tiny_chat_model(tmp_path):
    from conftest import tiny_model, write_tokenizer
    model = tiny_model("qwen2")
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture
def problems_file(tmp_path):
    f = tmp_path / "dev.jsonl"
    rows = [{"id": i, "problem": f"{i} 1 2", "solution": str(i)} for i in range(5)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_generation_on_cpu_and_resume(tiny_chat_model, problems_file, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    kw = dict(answer_field="solution", n=2, temperature=1.0, max_tokens=5, batch_size=2,
              output=out, progress=False)
    first = evaluate([tiny_chat_model], str(problems_file), **kw)[0]
    samples = [json.loads(x) for x in (out / "tiny" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10
    assert {(s["problem"], s["sample"]) for s in samples} == {(i, j) for i in range(5)
                                                              for j in range(2)}
    assert all(s["prompt"].startswith("0 1 2 ") or s["prompt"][0].isdigit() for s in samples)
    assert first.metrics["problems"] == 5 and first.metrics["samples_per_problem"] == 2
    assert {"accuracy", "avg@2", "pass@1", "pass@2"} <= set(first.metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["tiny"]["avg@2"] == first.metrics["avg@2"]

    # resume: nothing left to do, so the model is not even loaded
    from relex.evaluation import evaluate as E
    monkeypatch.setattr(E.TransformersGenerator, "__init__",
                        lambda *a: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = evaluate([tiny_chat_model], str(problems_file), **kw)[0]
    assert again.metrics == first.metrics
    monkeypatch.undo()

    # an interruption after two problems (last line cut short): only the rest is generated
    lines = (out / "tiny" / "samples.jsonl").read_text().splitlines()
    (out / "tiny" / "samples.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    calls = []
    orig = E.TransformersGenerator.generate

    def counting(self, prompts, *a):
        calls.append(len(prompts))
        return orig(self, prompts, *a)
    monkeypatch.setattr(E.TransformersGenerator, "generate", counting)
    resumed = evaluate([tiny_chat_model], str(problems_file), **kw)[0]
    assert sum(calls) == 3 and resumed.metrics["problems"] == 5
    # other settings in the same directory are refused rather than mixed
    with pytest.raises(RelexError, match="other settings.*temperature"):
        evaluate([tiny_chat_model], str(problems_file), **{**kw, "temperature": 0.5})


def test_greedy_generation_is_deterministic(tiny_chat_model, problems_file):
    a = evaluate([tiny_chat_model], str(problems_file), answer_field="solution", max_tokens=4,
                 progress=False)[0]
    b = evaluate([tiny_chat_model], str(problems_file), answer_field="solution", max_tokens=4,
                 progress=False)[0]
    assert [s["response"] for s in a.samples] == [s["response"] for s in b.samples]
    with pytest.raises(RelexError, match="identical samples"):
        evaluate([tiny_chat_model], str(problems_file), answer_field="solution", n=4,
                 progress=False)


def test_responses_file(tmp_path):
    f = tmp_path / "r.jsonl"
    rows = [{"qid": "a", "gold": "\\frac12", "text": "\\boxed{0.5}", "extra": 1},
            {"qid": "a", "gold": "\\frac12", "text": "\\boxed{2}", "extra": 2},
            {"qid": "b", "gold": "3", "text": "\\boxed{3}", "extra": 3},
            {"qid": "b", "gold": "3", "text": "\\boxed{3.0}", "extra": 4}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = grade_responses(f, answer_field="gold", response_field="text", id_field="qid",
                        output=tmp_path / "out")
    assert m["problems"] == 2 and m["avg@2"] == pytest.approx(0.75) and m["pass@2"] == 1.0
    graded = [json.loads(x) for x in (tmp_path / "out/graded.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, False, True, True]
    assert all(g["extra"] == r["extra"] and g["qid"] == r["qid"] for g, r in zip(graded, rows))
    with pytest.raises(RelexError, match="no field 'answer'"):
        grade_responses(f)


def test_datasets(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
    d = load_dataset(str(f), question_field="q", answer_field="a")
    assert [p.answer for p in d.problems] == ["2", "4"] and d.task == "math"
    with pytest.raises(RelexError, match="no field 'answer'.*--answer-field"):
        load_dataset(str(f), question_field="q")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"problem": ["1+2"], "answer": ["3"]}), tmp_path / "d.parquet")
    assert load_dataset(str(tmp_path / "d.parquet")).problems[0].question == "1+2"


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    fake = types.ModuleType("datasets")

    def offline(*a, **k):
        raise ConnectionError("no network")
    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RelexError, match="could not load HuggingFaceH4/MATH-500.*offline"):
        load_dataset("math500")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RelexError, match="need the `datasets` package"):
        load_dataset("someone/some-dataset")


def test_arithmetic_task_scores_the_demo_base():
    from relex.demo.run import BASE
    s = evaluate([BASE], "arithmetic", progress=False)[0]
    assert s.metrics["accuracy"] == pytest.approx(0.346, abs=1e-9)  # as printed by relex demo
    assert s.samples[0]["prompt"].endswith("=") and len(s.samples[0]["response"]) == 4


def test_sweep_keeps_the_best(tmp_path):
    from relex.demo.run import BASE, run_demo
    run_demo(tmp_path / "demo", steps=20, observe_until=6, progress=False)
    run = tmp_path / "demo" / "run"
    res = relex.sweep(run, base=BASE, observe_until=6, targets=[10, 20, 60, 200],
                      dataset="arithmetic-dev", limit=200, output=tmp_path / "sw",
                      progress=False)
    summary = json.loads((tmp_path / "sw/summary.json").read_text())
    assert summary["best_step"] == res.best_step
    assert res.scores[res.best_step] == max(res.scores.values())
    assert set(res.real) == {10, 20}  # the real checkpoints that exist at those steps
    assert (tmp_path / "sw/best/model.safetensors").is_file()
    kept = sorted(p.name for p in (tmp_path / "sw/candidates").glob("step-*"))
    assert kept == [f"step-{res.best_step}"]
    assert (tmp_path / "sw/sweep.png").stat().st_size > 5000
    res2 = relex.sweep(run, base=BASE, observe_until=6, targets=[10, 20], keep_all=True,
                       dataset="arithmetic-dev", limit=50, output=tmp_path / "sw2",
                       progress=False)
    assert len(list((tmp_path / "sw2/candidates").glob("step-*"))) == 2
    assert res2.best_step in (10, 20)
    with pytest.raises(RelexError, match="overlaps the input"):
        relex.sweep(run, base=BASE, observe_until=6, targets=[10, 20], dataset="arithmetic-dev",
                    output=run / "sweep", overwrite=True, progress=False)


@pytest.mark.slow
def test_sweep_finds_the_demo_plateau(tmp_path):
    """The full demo run: the best target sits on the plateau, not at the far end."""
    from relex.demo.run import BASE, run_demo
    run_demo(tmp_path / "demo", progress=False)
    res = relex.sweep(tmp_path / "demo" / "run", base=BASE, observe_until=60,
                      targets=[100, 200, 300, 400, 600, 800], dataset="arithmetic-dev",
                      output=tmp_path / "sw", progress=False)
    assert 200 <= res.best_step <= 400
    assert res.scores[res.best_step] > res.scores[800] + 0.3
    assert res.scores[res.best_step] > max(res.real.values()) - 0.1
    assert not math.isnan(res.scores[600])


def test_cli_eval(tmp_path, capsys):
    from relex.cli import main
    from relex.demo.run import BASE
    assert main(["eval", str(BASE), "--dataset", "arithmetic", "--limit", "50", "-q"]) == 0
    assert "demo-base" in capsys.readouterr().out
    assert main(["eval", "--dataset", "arithmetic"]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["transformers", "math_verify"])
def test_missing_generation_library_stops_before_any_work(missing, problems_file, tmp_path,
                                                          monkeypatch, capsys):
    """Without transformers (or math-verify) sweep and eval stop in one line naming the extra,
    before the long extrapolation: the run directory is never even read."""
    monkeypatch.setitem(sys.modules, missing, None)  # import now raises ImportError
    pretty = missing.replace("_", "-")
    code = cli.main(["sweep", str(tmp_path / "no-run"), "--base", str(tmp_path / "no-base"),
                     "--targets", "10,20", "--dataset", str(problems_file), "--answer-field",
                     "solution", "--backend",
                     "transformers", "-o", str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"needs {pretty}" in err and "relex[eval]" in err
    assert not (tmp_path / "sw").exists()
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code = cli.main(["eval", str(model), "--dataset", str(problems_file), "--answer-field",
                     "solution", "--backend",
                     "transformers"])
    err = capsys.readouterr().err
    assert code == 2 and f"needs {pretty}" in err
