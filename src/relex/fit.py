"""The RELEX math for one tensor, from its T x T Gram matrix alone (float64 numpy).

D is the T x d matrix of observed deltas (row t = theta_{s_t} - theta_0). Every output relex
writes is theta_0 + W @ D for a small weight matrix W (targets x T) computed here, so the engine
never needs more of D than one block at a time. See shared/DESIGN-NOTES.md for the derivation:

    G = D D^T = U diag(lambda) U^T,   sigma_i = sqrt(lambda_i),   c[t, i] = sigma_i U[t, i]
    fit c[:, i] ~ poly(step) on the (last `window`) observed steps, predict chat_i(S)
    theta_S = theta_0 + sum_i chat_i v_i = theta_0 + D^T (sum_i chat_i / sigma_i * U[:, i])
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from relex.errors import RelexError

#: components with sigma_i <= DROP * sigma_1 carry no signal (numerical noise) and are dropped
DROP = 1e-6
#: the explained-variance curve reported per tensor covers ranks 1..EV_RANKS
EV_RANKS = 5


def parse_fit(fit: str) -> int:
    """'linear' -> 1, 'poly2' -> 2, 'poly3' -> 3 (polynomial degree of the coefficient fit)."""
    if fit == "linear":
        return 1
    m = re.fullmatch(r"poly(\d+)", fit)
    if not m:
        raise RelexError(f"--fit {fit}: expected linear or polyN (e.g. poly2)")
    return int(m.group(1))


@dataclass(frozen=True)
class FitConfig:
    """How to turn observed checkpoints into weights.

    method: "relex" (rank-r projection, coefficient fit) or "linear-weights" (per-parameter
    least-squares polynomial over the same checkpoints; with two checkpoints and degree 1 it is
    theta_a + alpha (theta_b - theta_a)).
    rank: number of singular components kept (relex).
    degree: polynomial degree of the fit (1 = linear, the paper's default).
    window: fit on the last `window` observed checkpoints only (None = all).
    """

    method: str = "relex"
    rank: int = 1
    degree: int = 1
    window: int | None = None

    def check(self, n_checkpoints: int) -> None:
        """Raise RelexError unless n_checkpoints observed checkpoints are enough for this fit."""
        if self.method not in ("relex", "linear-weights"):
            raise RelexError(f"--method {self.method}: expected relex or linear-weights")
        if self.rank < 1 or self.degree < 0:
            raise RelexError("--rank must be >= 1 and the fit degree >= 0")
        n_fit = n_checkpoints if self.window is None else self.window
        if self.window is not None and not 1 <= self.window <= n_checkpoints:
            raise RelexError(f"--window {self.window}: must be between 1 and the number of "
                             f"observed checkpoints ({n_checkpoints})")
        if n_fit < self.degree + 1:
            raise RelexError(f"a degree-{self.degree} fit needs at least {self.degree + 1} "
                             f"checkpoints in the fit window, got {n_fit}; observe more steps")
        if self.method == "relex" and n_checkpoints < self.rank:
            raise RelexError(f"--rank {self.rank} needs at least {self.rank} observed "
                             f"checkpoints, got {n_checkpoints}")

    @property
    def fit_name(self) -> str:
        return "linear" if self.degree == 1 else f"poly{self.degree}"


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of a Gram matrix, descending, tiny components dropped.

    sigma: (k,) singular values of D; u: (T, k) left singular vectors; total: trace(G).
    """

    sigma: np.ndarray
    u: np.ndarray
    total: float

    @classmethod
    def of(cls, gram: np.ndarray) -> Spectrum:
        gram = np.asarray(gram, dtype=np.float64)
        total = float(np.trace(gram))
        lam, u = np.linalg.eigh(gram)
        lam, u = lam[::-1], u[:, ::-1]
        if total <= 0 or lam[0] <= 0:
            return cls(np.zeros(0), np.zeros((len(gram), 0)), max(total, 0.0))
        sigma = np.sqrt(np.clip(lam, 0, None))
        keep = sigma > DROP * sigma[0]
        return cls(sigma[keep], u[:, keep], total)

    @property
    def coefficients(self) -> np.ndarray:
        """(T, k): coefficient of checkpoint t on component i, c[t, i] = <D[t], v_i>."""
        return self.u * self.sigma

    def explained_variance(self, ranks: int = EV_RANKS) -> list[float]:
        """Cumulative share of trace(G) captured by ranks 1..ranks (1.0 for an empty tensor)."""
        if self.total <= 0:
            return [1.0] * ranks
        cum = np.cumsum(self.sigma ** 2) / self.total
        return [float(min(1.0, cum[min(r, len(cum)) - 1])) for r in range(1, ranks + 1)]


def hat_weights(steps: np.ndarray, targets: np.ndarray, degree: int,
                window: int | None) -> np.ndarray:
    """(K, T) weights h such that the least-squares polynomial through values y_t observed at
    `steps` (only the last `window`) evaluates to h @ y at each target step."""
    steps = np.asarray(steps, dtype=np.float64)
    idx = np.arange(len(steps))[-window:] if window else np.arange(len(steps))
    lo, hi = steps[idx].min(), steps[idx].max()

    def vander(x):  # steps mapped to [-1, 1] keep high degrees well conditioned
        x = (2 * np.asarray(x, dtype=np.float64) - lo - hi) / max(hi - lo, 1.0)
        return np.vander(x, degree + 1)

    h = np.zeros((len(targets), len(steps)))
    h[:, idx] = vander(targets) @ np.linalg.pinv(vander(steps[idx]))
    return h


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Coefficient of determination; 1.0 when y is constant and perfectly fitted."""
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


@dataclass(frozen=True)
class TensorFit:
    """The weights for one tensor plus the per-tensor statistics that go into relex.json."""

    weights: np.ndarray  # (K, T)
    stats: dict


def tensor_stats(spec: Spectrum, steps: np.ndarray, config: FitConfig) -> dict:
    """Explained variance (ranks 1..5), R^2 and slope of the component-1 coefficient fit."""
    stats = {"explained_variance": [round(x, 6) for x in spec.explained_variance()],
             "delta_norm": float(np.sqrt(max(spec.total, 0.0)))}
    if len(spec.sigma) == 0:
        stats.update(r2=None, slope=None)
        return stats
    c = spec.coefficients[:, 0]
    c = c if c[-1] >= c[0] else -c  # orient so that the trajectory moves forward
    h = hat_weights(steps, steps, config.degree, config.window)
    idx = np.arange(len(steps))[-config.window:] if config.window else np.arange(len(steps))
    lin = np.polyfit(steps[idx], c[idx], 1) if len(idx) >= 2 else [0.0, 0.0]
    stats.update(r2=round(r_squared(c[idx], (h @ c)[idx]), 6), slope=float(lin[0]))
    return stats


def extrapolation_weights(gram: np.ndarray, steps: np.ndarray, targets: np.ndarray,
                          config: FitConfig) -> TensorFit:
    """Weights W (K, T) with theta_S = theta_0 + W[k] @ D for each target step S = targets[k]."""
    steps = np.asarray(steps, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    spec = Spectrum.of(gram)
    stats = tensor_stats(spec, steps, config)
    if config.method == "linear-weights":
        return TensorFit(hat_weights(steps, targets, config.degree, config.window), stats)
    r = min(config.rank, len(spec.sigma))
    w = np.zeros((len(targets), len(steps)))
    if r == 0:  # the tensor never moved
        return TensorFit(w, stats)
    h = hat_weights(steps, targets, config.degree, config.window)  # (K, T)
    chat = h @ spec.coefficients[:, :r]  # (K, r) predicted coefficients at the targets
    w = (chat / spec.sigma[:r]) @ spec.u[:, :r].T
    return TensorFit(w, stats)


def reconstruction_weights(gram: np.ndarray, indices: list[int], steps: np.ndarray,
                           config: FitConfig) -> TensorFit:
    """Weights projecting observed checkpoints `indices` onto the top-`rank` subspace."""
    spec = Spectrum.of(gram)
    stats = tensor_stats(spec, np.asarray(steps, dtype=np.float64), config)
    r = min(config.rank, len(spec.sigma))
    u = spec.u[:, :r]
    return TensorFit(u[indices] @ u.T, stats)


@dataclass(frozen=True)
class Extrapolation:
    """The fit rule of `extrapolate`: a tensor's Gram matrix -> the weights of each target."""

    steps: np.ndarray
    targets: np.ndarray
    config: FitConfig

    def __call__(self, gram: np.ndarray) -> TensorFit:
        return extrapolation_weights(gram, self.steps, self.targets, self.config)


@dataclass(frozen=True)
class Reconstruction:
    """The fit rule of `reconstruct`: project the observed checkpoints `indices` onto the
    top-rank subspace."""

    steps: np.ndarray
    indices: list[int]
    config: FitConfig

    def __call__(self, gram: np.ndarray) -> TensorFit:
        return reconstruction_weights(gram, self.indices, self.steps, self.config)
