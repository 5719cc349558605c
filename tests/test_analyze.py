"""relex analyze: planted structure is recovered, drift is flagged, numbers are exact."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import relex
from conftest import load_dir, reference, save_checkpoint
from relex.analysis.backtest import module_and_layer

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def planted_run(root, steps, *, rotate=0.0, noise=0.01, slope=0.5, icpt=0.2, d=4000, seed=0):
    """Tensors whose deltas are (slope * s + icpt) * v(s) + noise, |v| = 1.

    v(s) = cos(theta) v1 + sin(theta) v2 with theta = rotate * s / max(steps): rotate = 0 is a
    fixed direction (the RELEX assumption), rotate > 0 a direction that drifts with the step.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.mlp.up_proj.weight": (d // 40, 40),
              "model.layers.1.mlp.up_proj.weight": (d // 40, 40),
              "model.layers.0.self_attn.q_proj.weight": (d // 50, 50)}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    dirs = {}
    for k, s in shapes.items():
        v1, v2 = torch.randn(2, *s, generator=g, dtype=torch.float64)
        v1 /= v1.norm()
        v2 -= (v2 * v1).sum() * v1
        v2 /= v2.norm()
        dirs[k] = (v1, v2)
    save_checkpoint(root / "base", base, CONFIG, torch.float32)
    top = max(steps)
    for s in steps:
        theta = rotate * s / top
        state = {}
        for k, b in base.items():
            v1, v2 = dirs[k]
            n = torch.randn(b.shape, generator=g, dtype=torch.float64) * noise / math.sqrt(
                b.numel())
            state[k] = b + (slope * s + icpt) * (math.cos(theta) * v1 + math.sin(theta) * v2) + n
        save_checkpoint(root / "run" / f"checkpoint-{s}", state, CONFIG, torch.float32)
    return root / "run", root / "base"


def test_planted_rank1_structure_is_recovered(tmp_path):
    steps = list(range(2, 42, 2))
    run, base = planted_run(tmp_path, steps, noise=0.5)
    res = relex.analyze(run, base=base, output=tmp_path / "rep", progress=False)
    s = res.summary
    rows = list(csv.DictReader(open(tmp_path / "rep" / "tensors.csv")))
    assert len(rows) == 3
    for row in rows:
        assert float(row["slope"]) == pytest.approx(0.5, rel=0.02)
        assert float(row["r2"]) > 0.999
        # rank-1 EV: signal sum((0.5 s + 0.2)^2) against noise 0.25 per checkpoint (float32
        # storage adds nothing visible); the noise's own share along v is 1/d, negligible
        signal = sum((0.5 * t + 0.2) ** 2 for t in steps)
        expected = signal / (signal + 0.25 * len(steps))
        assert float(row["ev_rank1"]) == pytest.approx(expected, abs=0.003)
        # the update share outside the rank-1 subspace is the noise share, on average
        outside = np.mean([0.25 / ((0.5 * t + 0.2) ** 2 + 0.25) for t in steps])
        assert float(row["outside_rank_r_mean"]) == pytest.approx(outside, rel=0.15)
    f1 = s["finding1_explained_variance"]
    assert f1["share_of_tensors_rank1_at_least"]["0.99"] == 1.0
    # a straight trajectory passes every backtest: verified to the longest horizon tested
    pairs = s["backtest"]["pairs"]
    assert s["backtest"]["verified_horizon_ratio"] == pytest.approx(
        max(p["ratio"] for p in pairs), rel=1e-3)
    assert all(p["cosine"] > 0.99 for p in pairs)
    for name in ("report.html", "explained_variance.png", "heatmaps.png", "coefficients.png",
                 "backtest.png", "summary.json", "relex-fit.safetensors"):
        assert (tmp_path / "rep" / name).stat().st_size > 500, name
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "do not predict" in html


def test_rotating_direction_is_flagged(tmp_path):
    steps = list(range(2, 42, 2))
    run, base = planted_run(tmp_path / "a", steps)
    straight = relex.analyze(run, base=base, output=tmp_path / "ra",
                             progress=False).summary["backtest"]
    run, base = planted_run(tmp_path / "b", steps, rotate=math.pi / 2)
    turning = relex.analyze(run, base=base, output=tmp_path / "rb",
                            progress=False).summary["backtest"]
    assert straight["verified_horizon_ratio"] > 3
    assert turning["verified_horizon_ratio"] < 2
    assert turning["estimated_limit_ratio"] is not None
    assert turning["estimated_limit_ratio"] < straight["verified_horizon_ratio"]


def test_oracle_sees_the_drift_after_the_window(tmp_path):
    steps = list(range(2, 62, 2))
    run, base = planted_run(tmp_path, steps, rotate=math.pi / 2)
    s = relex.analyze(run, base=base, observe_until=20, output=tmp_path / "rep",
                      progress=False).summary
    assert s["observed_steps"] == list(range(2, 22, 2))
    assert [o["step"] for o in s["oracle"]] == list(range(22, 62, 2))
    inside = [o["in_window_subspace"] for o in s["oracle"]]
    assert inside[0] > 0.95 and inside[-1] < 0.6
    assert all(a >= b - 1e-3 for a, b in zip(inside, inside[1:])), "drift grows with the step"


def test_backtest_numbers_match_a_direct_computation(tmp_path):
    """The Gram-only backtest equals predicting with the SVD reference and measuring directly."""
    steps = [1, 3, 4, 7, 9, 12, 14, 18]
    run, base = planted_run(tmp_path, steps, noise=0.3, d=2000)
    s = relex.analyze(run, base=base, output=tmp_path / "rep", progress=False).summary
    b = load_dir(base)
    ckpts = [load_dir(run / f"checkpoint-{t}") for t in steps]
    for pair in s["backtest"]["pairs"][::3]:
        n = steps.index(pair["fit_until"]) + 1
        j = steps.index(pair["target"])
        pred = reference(b, ckpts[:n], steps[:n], [steps[j]])[0]
        err2 = real2 = dot = pred2 = 0.0
        for name in b:
            dp = pred[name].ravel() - b[name].double().numpy().ravel()
            dr = ckpts[j][name].double().numpy().ravel() - b[name].double().numpy().ravel()
            err2 += ((dp - dr) ** 2).sum()
            real2 += (dr ** 2).sum()
            dot += dp @ dr
            pred2 += dp @ dp
        assert pair["rel_error"] == pytest.approx(math.sqrt(err2 / real2), abs=2e-4)
        assert pair["cosine"] == pytest.approx(dot / math.sqrt(pred2 * real2), abs=2e-4)


def test_fit_is_shared_between_analyze_and_extrapolate(run_factory, tmp_path):
    run, base = run_factory(steps=(2, 4, 6, 8, 10, 12))
    relex.analyze(run, base=base, observe_until=8, output=tmp_path / "rep", progress=False)
    # extrapolate from the analysis' fit (it covers steps 2..12): pick the window, no Gram pass
    rep = relex.extrapolate(from_fit=tmp_path / "rep", observe_until=8, targets=[30],
                            output=tmp_path / "ex", progress=False)
    assert rep.observed_steps == [2, 4, 6, 8]
    direct = relex.extrapolate(run, base=base, observe_until=8, targets=[30],
                               output=tmp_path / "direct", progress=False)
    a, d = load_dir(tmp_path / "ex/step-30"), load_dir(tmp_path / "direct/step-30")
    from conftest import assert_within_ulp
    for name in a:
        assert_within_ulp(a[name], d[name].double().numpy(), name, load_dir(base)[name]
                          .double().numpy())
    assert direct.bytes_read > 0
    # and analyze reads a fit written by extrapolate, touching no weights
    res = relex.analyze(from_fit=tmp_path / "direct", output=tmp_path / "rep2", progress=False)
    assert res.bytes_read == 0 and res.summary["observed_steps"] == [2, 4, 6, 8]
    assert res.summary["later_steps"] == []


def test_demo_trajectory(tmp_path):
    """The real GRPO trajectory of the demo: near rank-1 and linear in its early window."""
    from relex.demo.run import BASE, run_demo
    run_demo(tmp_path / "demo", steps=20, observe_until=10, progress=False)
    res = relex.analyze(tmp_path / "demo" / "run", base=BASE, observe_until=10,
                        output=tmp_path / "rep", progress=False)
    s = res.summary
    assert s["finding1_explained_variance"]["by_rank_mean"][0] > 0.8
    assert s["finding2_linearity"]["r2_mean"] > 0.95
    assert [o["step"] for o in s["oracle"]] == [20]
    assert s["backtest"]["verified_horizon_ratio"] >= 1.0


def test_module_and_layer_names():
    assert module_and_layer("model.layers.3.mlp.up_proj.weight") == ("mlp.up_proj", 3)
    assert module_and_layer("model.layers.12.self_attn.q_proj.bias") == ("self_attn.q_proj.bias",
                                                                         12)
    assert module_and_layer("lm_head.weight") == ("lm_head", None)
    assert module_and_layer("model.embed_tokens.weight") == ("embed_tokens", None)
    assert module_and_layer("transformer.h.0.attn.c_attn.weight") == ("attn.c_attn", 0)


def test_cli_analyze(tmp_path, capsys):
    from relex.cli import main
    run, base = planted_run(tmp_path, list(range(1, 11)))
    assert main(["analyze", str(run), "--base", str(base), "-o", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "verified horizon" in out and "report.html" in out
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["rank"] == 1
    assert main(["analyze", "--from-fit", str(tmp_path / "rep"), str(run), "-o",
                 str(tmp_path / "x")]) == 2
    assert "do not also give" in capsys.readouterr().err


def test_extrapolate_warns_past_the_verified_horizon(tmp_path, capsys):
    """extrapolate backtests the window it fits (from the pass's own Gram matrices): the
    horizon equals `relex analyze`'s on the same window; each target past it gets one warning
    line (CLI, Python warning, relex.json); --strict-horizon refuses and writes nothing."""
    steps = list(range(2, 26, 2))
    run, base = planted_run(tmp_path, steps, rotate=1.5, noise=0.05)
    an = relex.analyze(run, base=base, output=tmp_path / "an", progress=False).summary
    limit = an["backtest"]["verified_up_to_step"]
    ratio = an["backtest"]["verified_horizon_ratio"]
    assert steps[-1] < limit < 40 * steps[-1]
    inside, outside = steps[-1] + 1, 2 * limit
    with pytest.warns(UserWarning, match=f"target step {outside} .* beyond the verified"):
        rep = relex.extrapolate(run, base=base, targets=[inside, outside],
                                output=tmp_path / "out", progress=False)
    assert rep.horizon["verified_up_to_step"] == limit
    assert rep.horizon["verified_horizon_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert len(rep.warnings) == 1 and str(outside) in rep.warnings[0]
    prov = json.loads((tmp_path / "out" / f"step-{inside}" / "relex.json").read_text())
    assert prov["horizon"]["verified_up_to_step"] == limit and prov["horizon"]["beyond"]
    from relex import cli
    strict = ["extrapolate", str(run), "--base", str(base), "--target", str(outside), "-o",
              str(tmp_path / "strict"), "--strict-horizon"]
    assert cli.main(strict) == 2
    err = capsys.readouterr().err
    assert "--strict-horizon" in err and err.count("\n") == 1
    assert not (tmp_path / "strict").exists()
    reuse = ["extrapolate", "--from-fit", str(tmp_path / "out"), "--target", str(outside),
             "-o", str(tmp_path / "f")]
    assert cli.main(reuse) == 0
    cap = capsys.readouterr()
    assert cap.err.count("relex: warning: target step") == 1
    assert f"(up to step {limit}); 1 target(s) beyond it" in cap.out


def test_a_straight_run_verifies_far_and_warns_for_nothing(tmp_path, recwarn):
    """A fixed direction with a linear coefficient (the RELEX assumption, little noise): every
    backtest holds, the verified horizon is the largest ratio tried, and a target inside it
    gets no warning."""
    steps = list(range(2, 26, 2))
    run, base = planted_run(tmp_path, steps, rotate=0.0, noise=0.01)
    rep = relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out",
                            progress=False)
    # prefixes of 3..9 of the 12 checkpoints: the furthest backtest predicts step 24 from 6
    assert rep.horizon["verified_horizon_ratio"] == pytest.approx(24 / 6)
    assert rep.horizon["verified_up_to_step"] == 96 and rep.warnings == []
    assert not [w for w in recwarn if "verified horizon" in str(w.message)]
