"""The per-tensor math (Gram -> weights) against a textbook float64 SVD + polyfit."""

import numpy as np
import pytest

from relex.errors import RelexError
from relex.fit import (FitConfig, Spectrum, extrapolation_weights, hat_weights,
                       reconstruction_weights)


def trajectory(steps, d=400, rank=1, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps, float)
    dirs = rng.normal(size=(rank, d))
    coefs = np.stack([(i + 1) ** -1 * (0.3 * steps + 0.5 * (i % 2) * np.sqrt(steps))
                      for i in range(rank)], axis=1)
    return coefs @ dirs + noise * rng.normal(size=(len(steps), d))


def reference_prediction(D, steps, target, rank, degree=1, window=None):
    idx = np.arange(len(steps))[-window:] if window else np.arange(len(steps))
    _, s, vt = np.linalg.svd(D, full_matrices=False)
    c = D @ vt[:rank].T
    pred = np.zeros(D.shape[1])
    for i in range(rank):
        pred += np.polyval(np.polyfit(steps[idx], c[idx, i], degree), target) * vt[i]
    return pred


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("steps", [[5, 10, 15, 20, 25, 30], [1, 2, 4, 7, 15, 16, 40]])
def test_relex_weights_match_svd_reference(rank, steps):
    steps = np.asarray(steps, float)
    D = trajectory(steps, rank=rank)
    fit = extrapolation_weights(D @ D.T, steps, np.array([100.0, 333.0]), FitConfig(rank=rank))
    for k, target in enumerate([100.0, 333.0]):
        np.testing.assert_allclose(fit.weights[k] @ D,
                                   reference_prediction(D, steps, target, rank),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("degree,window", [(1, 4), (2, None), (3, 5)])
def test_window_and_polynomial_fit(degree, window):
    steps = np.array([3, 6, 9, 12, 15, 18, 21.0])
    D = trajectory(steps, rank=2)
    fit = extrapolation_weights(D @ D.T, steps, np.array([50.0]),
                                FitConfig(rank=2, degree=degree, window=window))
    np.testing.assert_allclose(fit.weights[0] @ D,
                               reference_prediction(D, steps, 50.0, 2, degree, window),
                               rtol=1e-8, atol=1e-8)


def test_linear_weights_is_per_parameter_least_squares():
    steps = np.array([10, 20, 30, 45, 60.0])
    D = trajectory(steps, rank=3, noise=0.3)
    fit = extrapolation_weights(D @ D.T, steps, np.array([200.0]),
                                FitConfig(method="linear-weights"))
    per_param = np.array([np.polyval(np.polyfit(steps, D[:, j], 1), 200.0)
                          for j in range(D.shape[1])])
    np.testing.assert_allclose(fit.weights[0] @ D, per_param, rtol=1e-9, atol=1e-9)


def test_two_point_linear_weights_is_classic_extrapolation():
    # theta_a + alpha (theta_b - theta_a), alpha = (S - a) / (b - a)
    h = hat_weights(np.array([10.0, 30.0]), np.array([90.0]), 1, None)
    np.testing.assert_allclose(h, [[1 - 4.0, 4.0]])


def test_reconstruction_projects_on_top_subspace():
    steps = np.arange(1, 9.0)
    D = trajectory(steps, rank=3)
    u, s, vt = np.linalg.svd(D, full_matrices=False)
    for r in (1, 2):
        fit = reconstruction_weights(D @ D.T, [0, 3, 7], steps, FitConfig(rank=r))
        ref = (D @ vt[:r].T @ vt[:r])[[0, 3, 7]]
        np.testing.assert_allclose(fit.weights @ D, ref, rtol=1e-9, atol=1e-9)


def test_sign_of_singular_vectors_does_not_matter():
    steps = np.arange(1, 7.0)
    D = trajectory(steps)
    w1 = extrapolation_weights(D @ D.T, steps, np.array([20.0]), FitConfig()).weights
    w2 = extrapolation_weights((-D) @ (-D).T, steps, np.array([20.0]), FitConfig()).weights
    np.testing.assert_allclose(w1, w2)


def test_tensor_that_never_moves_gets_zero_weights():
    fit = extrapolation_weights(np.zeros((4, 4)), np.arange(1, 5.0), np.array([9.0]),
                                FitConfig())
    assert not fit.weights.any()
    assert fit.stats["r2"] is None and fit.stats["explained_variance"][0] == 1.0


def test_stats_recover_planted_structure():
    steps = np.arange(1, 31.0)
    rng = np.random.default_rng(1)
    v = rng.normal(size=1000)
    v /= np.linalg.norm(v)
    D = np.outer(0.5 * steps + 2.0, v) + 1e-3 * rng.normal(size=(30, 1000))
    stats = extrapolation_weights(D @ D.T, steps, np.array([60.0]), FitConfig()).stats
    assert stats["explained_variance"][0] > 0.9999
    assert stats["r2"] > 0.9999
    assert stats["slope"] == pytest.approx(0.5, rel=1e-3)
    spec = Spectrum.of(D @ D.T)
    np.testing.assert_allclose(spec.sigma[:3], np.linalg.svd(D, compute_uv=False)[:3],
                               rtol=1e-8)


@pytest.mark.parametrize("cfg,n,msg", [
    (FitConfig(rank=3), 2, "needs at least 3"),
    (FitConfig(degree=2), 2, "degree-2 fit needs"),
    (FitConfig(window=1), 5, "degree-1 fit needs"),
    (FitConfig(window=9), 5, "--window 9"),
    (FitConfig(method="spline"), 5, "--method spline"),
])
def test_fit_requirements(cfg, n, msg):
    with pytest.raises(RelexError, match=msg):
        cfg.check(n)
