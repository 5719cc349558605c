"""The compiled Gram kernels against float64 numpy, and the pass without them (numba missing)."""

import numpy as np
import pytest
import torch

import relex
from relex import kernels
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


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("t,m", [(3, 5), (30, 2 * kernels.CHUNK + 100)])
def test_delta_gram_equals_torch_subtraction(bf16, t, m):
    gen = torch.Generator().manual_seed(t + m)
    base = torch.randn(m, generator=gen) * 0.05
    rows = base + 1e-3 * torch.randn(t, m, generator=gen)
    rows[0, 0] = -base[0]  # sign change: not in the same binade as the base value
    dt = torch.bfloat16 if bf16 else torch.float32
    rows, base = rows.to(dt), base.to(dt).float()
    want = rows.float() - base  # what the torch path computes
    raw = rows.view(torch.int16).numpy().view(np.uint16) if bf16 else rows.numpy()
    d = np.full((t, m), np.nan, np.float32)
    g = kernels.delta_gram(raw, base.numpy(), d, True, bf16)
    np.testing.assert_array_equal(d, want.numpy())
    ref = _ref(want.numpy())
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()
    # without keeping the deltas: the same Gram matrix; without the Gram: the same deltas
    np.testing.assert_array_equal(kernels.delta_gram(raw, base.numpy(), None, True, bf16), g)
    d2 = np.zeros((t, m), np.float32)
    assert kernels.delta_gram(raw, base.numpy(), d2, False, bf16) is None
    np.testing.assert_array_equal(d2, d)


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
        g = kernels.delta_gram(raw, np.zeros(3000, np.float32), None, True, bf16)
        assert not np.isfinite(g[4, 4]) and not np.isfinite(g[0, 4]) and np.isfinite(g[0, 0])


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
    for name in ("_tiles", "_mirror", "_delta_gram"):
        monkeypatch.setitem(kernels.__dict__, name, kernels.__dict__[name])
    monkeypatch.setattr(numba, "njit", broken)
    monkeypatch.setattr(kernels, "_compiled", None)
    with caplog.at_level("WARNING", logger="relex.kernels"):
        assert kernels.available() is False
    assert "simulated" in caplog.text
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(kernels.gram(x), _ref(x), rtol=1e-5)
