"""The compiled Gram kernels against float64 numpy, and the pass without them (numba missing)."""

import numpy as np
import pytest
import torch

import relex
from relex.stream import kernels
from test_extrapolate import STEPS, check_outputs

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="compiled kernels unavailable (no numba, or RELEX_GRAM=numpy)")


def _ref(d: np.ndarray) -> np.ndarray:
    d = d.astype(np.float64)
    return d @ d.T


# T not a multiple of the 4-row tiles; m not a multiple of the vector width or of CHUNK
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 30, 75])
@pytest.mark.parametrize("m", [1, 7, kernels.CHUNK, 3 * kernels.CHUNK + 13])
def test_gram_matches_float64(t, m):
    x = np.random.default_rng(t * 1000 + m).standard_normal((t, m)).astype(np.float32)
    g = kernels.gram(x)
    assert g.dtype == np.float64 and g.shape == (t, t)
    np.testing.assert_array_equal(g, g.T)
    ref = _ref(x)
    # float32 products summed in float32 over at most CHUNK columns, chunks in float64
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()


def _rows(bf16, t, m, seed):
    """Checkpoint-like rows near a base (one value across zero: a different binade), as stored
    (bf16 or fp32), their kernel input, and the base as float32."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, generator=gen) * 0.05
    rows = base + 1e-3 * torch.randn(t, m, generator=gen)
    rows[0, 0] = -base[0]
    dt = torch.bfloat16 if bf16 else torch.float32
    rows, base = rows.to(dt), base.to(dt).float()
    raw = rows.view(torch.int16).numpy().view(np.uint16) if bf16 else rows.numpy()
    return rows, raw, base


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("t,m", [(3, 5), (30, 2 * kernels.CHUNK + 100)])
def test_delta_gram_is_the_gram_of_the_deltas(bf16, t, m):
    rows, raw, base = _rows(bf16, t, m, t + m)
    g = kernels.delta_gram(raw, base.numpy(), bf16)
    ref = _ref((rows.double() - base.double()).numpy())  # exact deltas, float64 products
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()
    np.testing.assert_array_equal(g, g.T)
    with pytest.raises(ValueError, match="do not match"):
        kernels.delta_gram(raw, base.numpy()[:-1], bf16)


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("t,m,k", [(1, 7, 1), (3, 5, 2), (30, 2 * kernels.CHUNK + 100, 1),
                                   (75, kernels.CHUNK + 1, 3)])
def test_delta_combine_is_base_plus_weighted_deltas(bf16, t, m, k):
    rows, raw, base = _rows(bf16, t, m, 7 * t + m)
    w = np.random.default_rng(t).standard_normal((k, t)).astype(np.float32) * 10
    out = np.full((k, m), np.nan, np.float32)
    kernels.delta_combine(raw, base.numpy(), w, out, bf16)
    d = (rows.double() - base.double()).numpy()  # exact
    b, w64 = base.double().numpy(), w.astype(np.float64)
    ref = b + w64 @ d
    # float32 deltas (one rounding each), t products summed in float32, plus the base: the
    # classic bound of a float32 dot product, elementwise
    bound = (t + 2) * np.finfo(np.float32).eps * (np.abs(b) + np.abs(w64) @ np.abs(d))
    assert (np.abs(out - ref) <= bound).all()
    with pytest.raises(ValueError, match="do not match"):
        kernels.delta_combine(raw, base.numpy(), w[:, :-1], out, bf16)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_reach_the_gram(bad):
    x = np.ones((6, 3000), np.float32)
    x[4, 2999] = bad
    g = kernels.gram(x)
    assert not np.isfinite(g[4, 4]) and not np.isfinite(g[0, 4])
    assert np.isfinite(g[0, 0])
    for bf16 in (True, False):  # and through the fused path, from a checkpoint's rows
        rows = torch.from_numpy(x).to(torch.bfloat16 if bf16 else torch.float32)
        raw = (rows.view(torch.int16).numpy().view(np.uint16) if bf16 else rows.numpy())
        g = kernels.delta_gram(raw, np.zeros(3000, np.float32), bf16)
        assert not np.isfinite(g[4, 4]) and not np.isfinite(g[0, 4]) and np.isfinite(g[0, 0])
        out = np.zeros((1, 3000), np.float32)  # and into the outputs
        kernels.delta_combine(raw, np.zeros(3000, np.float32), np.ones((1, 6), np.float32),
                              out, bf16)
        assert not np.isfinite(out[0, 2999]) and np.isfinite(out[0, :2999]).all()


def test_pass_without_kernels_is_within_one_ulp(run_factory, tmp_path, monkeypatch):
    """Where numba cannot load, torch converts and numpy's BLAS computes the Gram matrices."""
    run, base = run_factory(base_dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "_compiled", False)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [30])


def test_a_compile_failure_falls_back_with_a_warning(monkeypatch, caplog):
    """Where numba imports but cannot compile (an unusual platform), relex warns once and uses
    numpy instead of failing inside a worker thread."""
    import numba

    def broken(**_):
        def wrap(fn):
            def call(*a, **k):
                raise RuntimeError("LLVM ERROR: simulated")
            return call
        return wrap
    for name in kernels._COMPILED:
        monkeypatch.setitem(kernels.__dict__, name, kernels.__dict__[name])
    monkeypatch.setattr(numba, "njit", broken)
    monkeypatch.setattr(kernels, "_compiled", None)
    with caplog.at_level("WARNING", logger="relex.stream.kernels"):
        assert kernels.available() is False
    assert "simulated" in caplog.text
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(kernels.gram(x), _ref(x), rtol=1e-5)
