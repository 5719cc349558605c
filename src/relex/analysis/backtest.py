"""The geometry of a trajectory and how far it can be extrapolated, from Gram matrices alone.

For each tensor, G = D D^T over *every* checkpoint on disk (observed window first, then later
ones) answers all the questions below without touching the weights again:

- Finding 1: the singular values of the window's deltas; explained variance of rank 1..5.
- Finding 2: the rank-1 coefficient of each checkpoint against its step; R^2 of the line.
- Denoising: the share of each observed update outside the rank-r subspace.
- Backtest: fit on the first n' observed checkpoints, predict the later observed ones. The
  prediction is W @ D[:n'] (fit.py), so with w = W[k]:
      |pred|^2 = w G[:n', :n'] w,   pred . D_j = w G[:n', j],   |D_j|^2 = G[j, j]
  give the relative error and cosine of predicted vs real deltas exactly. Summed over tensors
  they give the whole-model numbers.
- Oracle: the same for checkpoints after the window, fitted on the whole window; plus how much
  of each later update lies in the window's subspace (does the direction drift or the speed?).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from relex.fit import FitConfig, Spectrum, extrapolation_weights, tensor_stats

#: backtest prefixes, as fractions of the observed window
PREFIXES = (0.25, 0.375, 0.5, 0.75)
#: a prediction "holds" while its relative error stays below this (see recommend_horizon)
MAX_REL_ERROR = 0.5


def module_and_layer(name: str) -> tuple[str, int | None]:
    """'model.layers.3.mlp.up_proj.weight' -> ('mlp.up_proj', 3); 'lm_head.weight' -> ('lm_head',
    None). Biases keep their suffix so that they are their own module type."""
    m = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$", name)
    rest, layer = (m.group(2), int(m.group(1))) if m else (name.removeprefix("model."), None)
    return rest.removesuffix(".weight"), layer


@dataclass
class Sums:
    """Whole-model (or per-tensor) sums for one predicted checkpoint: errors add over tensors
    in squares, dot products and norms add as they are."""

    err2: float = 0.0
    real2: float = 0.0
    pred2: float = 0.0
    dot: float = 0.0

    def add(self, other: Sums) -> None:
        self.err2 += other.err2
        self.real2 += other.real2
        self.pred2 += other.pred2
        self.dot += other.dot

    @property
    def rel_error(self) -> float:
        return math.sqrt(max(self.err2, 0.0) / self.real2) if self.real2 > 0 else 0.0

    @property
    def cosine(self) -> float:
        d = math.sqrt(self.pred2 * self.real2)
        return self.dot / d if d > 0 else 1.0

    @property
    def norm_ratio(self) -> float:
        """|pred| / |real|: > 1 means the prediction overshoots."""
        return math.sqrt(self.pred2 / self.real2) if self.real2 > 0 else 1.0


def predicted_sums(gram: np.ndarray, fit_idx: list[int], steps: np.ndarray, target_idx: list[int],
                   config: FitConfig) -> list[Sums]:
    """Sums for predicting checkpoints target_idx from a fit on checkpoints fit_idx."""
    g = gram[np.ix_(fit_idx, fit_idx)]
    w = extrapolation_weights(g, steps[fit_idx], steps[target_idx], config).weights
    out = []
    for k, j in enumerate(target_idx):
        pred2 = float(w[k] @ g @ w[k])
        dot = float(w[k] @ gram[fit_idx, j])
        real2 = float(gram[j, j])
        out.append(Sums(pred2 - 2 * dot + real2, real2, pred2, dot))
    return out


def prefix_sizes(n_obs: int, config: FitConfig) -> list[int]:
    """Backtest prefix lengths: fractions of the window, each long enough to fit."""
    least = max(3, config.degree + 2, config.rank + 1)
    sizes = {max(least, round(f * n_obs)) for f in PREFIXES}
    return sorted(s for s in sizes if s < n_obs)


@dataclass
class Horizon:
    """How far the observed window's own backtests support extrapolating it (whole model).

    ratio: the verified horizon, target step / last observed step (recommend_horizon); None
    when the window is too short to backtest. up_to_step: ratio x the last observed step."""

    ratio: float | None
    up_to_step: int | None
    rule: str
    #: where the error's trend over all backtests crosses the limit (estimate_limit; None: no
    #: limit in sight); trend: whether there were enough backtests (3) for a trend at all
    limit: float | None = None
    trend: bool = False

    def beyond(self, targets: list[int], last: int) -> list[int]:
        return beyond_horizon(self.up_to_step, targets, last)

    def as_dict(self) -> dict:
        return {"verified_horizon_ratio": None if self.ratio is None else round(self.ratio, 3),
                "verified_up_to_step": self.up_to_step, "rule": self.rule}


def beyond_horizon(up_to_step: int | None, targets: list[int], last: int) -> list[int]:
    """The targets past a verified horizon ending at `up_to_step` (every target after the last
    observed step `last` when the horizon is unknown)."""
    limit = up_to_step if up_to_step is not None else last
    return [t for t in targets if t > limit]


def verified_horizon(grams: dict[str, np.ndarray], steps, config: FitConfig) -> Horizon:
    """The backtest of `relex analyze` on the observed window alone, from the Gram matrices a
    pass already has (cross products only: no weight is read again). Fit on each prefix of the
    window, predict the rest of it, sum the errors over tensors, and keep the largest ratio at
    which every prediction held."""
    steps = np.asarray(steps, dtype=np.float64)
    n = len(steps)
    sizes = prefix_sizes(n, config)
    if not sizes:
        need = max(3, config.degree + 2, config.rank + 1) + 1
        return Horizon(None, None, f"a backtest needs at least {need} observed checkpoints, "
                                   f"this window has {n}")
    total: dict[tuple[int, int], Sums] = {}
    for gram in grams.values():
        for size in sizes:
            later = list(range(size, n))
            for j, sums in zip(later, predicted_sums(gram, list(range(size)), steps, later,
                                                     config)):
                total.setdefault((size, j), Sums()).add(sums)
    ratio, rule = recommend_horizon(total, steps)
    return Horizon(ratio, int(ratio * steps[-1]), rule, estimate_limit(total, steps),
                   len(total) >= 3)


@dataclass
class TensorAnalysis:
    """Everything measured on one tensor (window = its first n_obs checkpoints)."""

    name: str
    numel: int
    ev: list[float]  # explained variance of rank 1..5 in the window
    sigma: list[float]  # top singular values in the window
    r2: float | None  # R^2 of the rank-1 coefficient's line in the window
    slope: float | None
    coefficients: list[float]  # rank-1 coefficient of every checkpoint (window direction)
    line: list[float]  # the window's fitted line evaluated at every checkpoint's step
    outside: list[float]  # share of each window update outside the rank-r subspace
    delta2: list[float]  # |D_t|^2 of every checkpoint (weights whole-model shares)
    backtests: dict[tuple[int, int], Sums] = field(default_factory=dict)  # (n', j) -> sums
    oracle: dict[int, Sums] = field(default_factory=dict)  # j (after window) -> sums
    in_subspace: dict[int, float] = field(default_factory=dict)  # j -> share in window subspace

    @property
    def module(self) -> str:
        return module_and_layer(self.name)[0]

    @property
    def layer(self) -> int | None:
        return module_and_layer(self.name)[1]


def analyze_tensor(name: str, numel: int, gram: np.ndarray, steps: np.ndarray, n_obs: int,
                   config: FitConfig) -> TensorAnalysis:
    """All measures for one tensor from its Gram matrix over every checkpoint."""
    steps = np.asarray(steps, dtype=np.float64)
    n_all = len(steps)
    window = list(range(n_obs))
    gw = gram[:n_obs, :n_obs]
    spec = Spectrum.of(gw)
    stats = tensor_stats(spec, steps[:n_obs], config)
    r = min(config.rank, len(spec.sigma))
    diag = np.diag(gram)
    if len(spec.sigma):
        u1, s1 = spec.u[:, 0], spec.sigma[0]
        coef = (u1 @ gram[:n_obs, :]) / s1  # window direction, every checkpoint
        if coef[n_obs - 1] < coef[0]:
            coef = -coef
        idx = np.arange(n_obs)[-config.window:] if config.window else np.arange(n_obs)
        line = np.polyval(np.polyfit(steps[idx], coef[idx], config.degree), steps)
        proj = (spec.u[:, :r].T @ gram[:n_obs, :]) / spec.sigma[:r, None]  # (r, n_all)
        inside = (proj ** 2).sum(axis=0)
    else:
        coef = line = inside = np.zeros(n_all)
    with np.errstate(divide="ignore", invalid="ignore"):
        share_in = np.where(diag > 0, inside / diag, 1.0)
    result = TensorAnalysis(
        name, numel, stats["explained_variance"], [float(x) for x in spec.sigma[:5]],
        stats["r2"], stats["slope"], [float(x) for x in coef], [float(x) for x in line],
        [float(max(0.0, 1 - share_in[t])) for t in window], [float(x) for x in diag])
    for n in prefix_sizes(n_obs, config):
        targets = list(range(n, n_obs))
        for j, sums in zip(targets, predicted_sums(gram, window[:n], steps, targets, config)):
            result.backtests[(n, j)] = sums
    later = list(range(n_obs, n_all))
    if later:
        for j, sums in zip(later, predicted_sums(gram, window, steps, later, config)):
            result.oracle[j] = sums
            result.in_subspace[j] = float(min(1.0, share_in[j]))
    return result


def recommend_horizon(backtests: dict[tuple[int, int], Sums], steps: np.ndarray,
                      limit: float = MAX_REL_ERROR) -> tuple[float, str]:
    """Largest horizon ratio (target step / last fitted step) up to which every backtest kept
    its relative error below `limit`; returns (ratio, the rule in words).

    Relative error = |predicted delta - real delta| / |real delta|, whole model. A real
    checkpoint carries step-to-step noise that no extrapolation can predict, so the bound is
    loose on purpose; what it catches is predictions that drift off (direction) or overshoot
    (speed) as the horizon grows.
    """
    rule = (f"largest horizon ratio (target step / last fitted step) such that every backtest "
            f"at that ratio or less had whole-model relative error < {limit:.2f}")
    pairs = sorted(((steps[j] / steps[n - 1], s.rel_error) for (n, j), s in backtests.items()),
                   key=lambda p: p[0])
    best = 1.0
    for ratio, err in pairs:
        if err >= limit:
            break
        best = ratio
    return float(best), rule


def estimate_limit(backtests: dict[tuple[int, int], Sums], steps: np.ndarray,
                   limit: float = MAX_REL_ERROR) -> float | None:
    """Horizon ratio where the whole-model error trend crosses `limit`: a least-squares line of
    relative error against log(ratio) over all backtests, solved for `limit`. None when the
    error does not grow with the horizon (no limit within 1000x) or there are too few points."""
    pts = [(math.log(steps[j] / steps[n - 1]), s.rel_error) for (n, j), s in backtests.items()]
    if len(pts) < 3:
        return None
    x, y = np.array(pts).T
    if np.ptp(x) == 0:
        return None
    slope, icpt = np.polyfit(x, y, 1)
    log_ratio = (limit - icpt) / slope if slope > 0 else math.inf
    if log_ratio > math.log(1000):  # flat or falling error: no limit in sight
        return None
    return float(math.exp(max(log_ratio, 0.0)))


@dataclass
class RunAnalysis:
    """Per-tensor results plus whole-model aggregates for one run."""

    steps: list[int]  # every checkpoint analysed, window first
    n_obs: int  # the first n_obs are the observed window
    config: FitConfig
    tensors: list[TensorAnalysis]

    @property
    def observed_steps(self) -> list[int]:
        return self.steps[: self.n_obs]

    @property
    def later_steps(self) -> list[int]:
        return self.steps[self.n_obs:]

    def whole(self, which: str) -> dict:
        """Whole-model Sums: which = 'backtests' ((n', j) keys) or 'oracle' (j keys)."""
        out: dict = {}
        for t in self.tensors:
            for key, s in getattr(t, which).items():
                out.setdefault(key, Sums()).add(s)
        return out

    def outside_share(self) -> dict[int, float]:
        """Whole-model share of each window update's energy outside the rank-r subspace."""
        shares = {}
        for i, step in enumerate(self.observed_steps):
            num = sum(t.outside[i] * t.delta2[i] for t in self.tensors)
            den = sum(t.delta2[i] for t in self.tensors)
            shares[step] = num / den if den > 0 else 0.0
        return shares

    def tensor_horizon(self, t: TensorAnalysis) -> float:
        """Verified horizon of one tensor's own backtests (computed once per tensor)."""
        cache = self.__dict__.setdefault("_horizons", {})
        if t.name not in cache:
            cache[t.name] = recommend_horizon(t.backtests, np.asarray(self.steps, float))[0]
        return cache[t.name]

    def summary(self) -> dict:
        """The numbers of report.html / summary.json."""
        steps = np.asarray(self.steps, dtype=np.float64)
        moving = [t for t in self.tensors if t.r2 is not None]
        ev = np.array([t.ev for t in moving]) if moving else np.zeros((0, 5))
        r2 = np.array([t.r2 for t in moving])
        numel = np.array([t.numel for t in moving], dtype=np.float64)
        rank = self.config.rank
        bt = self.whole("backtests")
        horizon, rule = recommend_horizon(bt, steps)
        last = self.steps[self.n_obs - 1]

        def sums_row(s: Sums) -> dict:
            return {"rel_error": round(s.rel_error, 4), "cosine": round(s.cosine, 4),
                    "norm_ratio": round(s.norm_ratio, 4)}

        def groups(key) -> dict:
            out: dict = {}
            for t in moving:
                out.setdefault(key(t), []).append(t)
            return {str(k): {"tensors": len(v), "params": int(sum(t.numel for t in v)),
                             "explained_variance_rank1": round(float(np.mean(
                                 [t.ev[0] for t in v])), 4),
                             "r2": round(float(np.mean([t.r2 for t in v])), 4),
                             "verified_horizon_min": round(min(
                                 self.tensor_horizon(t) for t in v), 2)}
                    for k, v in sorted(out.items(), key=_order)}

        worst = sorted(moving, key=lambda t: (self.tensor_horizon(t), t.r2))[:10]
        return {
            "observed_steps": self.observed_steps,
            "later_steps": self.later_steps,
            "rank": rank, "fit": self.config.fit_name, "window": self.config.window,
            "tensors": len(self.tensors), "moving_tensors": len(moving),
            "finding1_explained_variance": {
                "by_rank_mean": [round(float(x), 4) for x in ev.mean(axis=0)] if len(ev) else [],
                "rank1_median": round(float(np.median(ev[:, 0])), 4) if len(ev) else None,
                "rank1_min": round(float(ev[:, 0].min()), 4) if len(ev) else None,
                "rank1_param_weighted_mean": round(float(
                    (ev[:, 0] * numel).sum() / numel.sum()), 4) if len(ev) else None,
                "share_of_tensors_rank1_at_least": {
                    f"{q:.2f}": round(float((ev[:, 0] >= q).mean()), 4) for q in
                    (0.90, 0.95, 0.99)} if len(ev) else {},
            },
            "finding2_linearity": {
                "r2_mean": round(float(r2.mean()), 4) if len(r2) else None,
                "r2_median": round(float(np.median(r2)), 4) if len(r2) else None,
                "r2_min": round(float(r2.min()), 4) if len(r2) else None,
            },
            "denoising_outside_rank_r": {str(k): round(v, 4)
                                         for k, v in self.outside_share().items()},
            "backtest": {
                "pairs": [{"fit_until": self.steps[n - 1], "target": self.steps[j],
                           "ratio": round(float(steps[j] / steps[n - 1]), 3), **sums_row(s)}
                          for (n, j), s in sorted(bt.items())],
                "verified_horizon_ratio": round(horizon, 3),
                "verified_up_to_step": int(round(horizon * last)),
                "estimated_limit_ratio": _round(estimate_limit(bt, steps)),
                "rule": rule + f"; the estimate extends the error trend (vs log ratio) to "
                               f"{MAX_REL_ERROR:.2f}",
            },
            "oracle": [{"step": self.steps[j], "ratio": round(float(steps[j] / last), 3),
                        **sums_row(s), "in_window_subspace": round(
                            float(np.average([t.in_subspace[j] for t in moving],
                                             weights=[max(t.delta2[j], 1e-300)
                                                      for t in moving])), 4)}
                       for j, s in sorted(self.whole("oracle").items())],
            "by_module": groups(lambda t: t.module),
            "by_layer": groups(lambda t: "none" if t.layer is None else t.layer),
            "worst_tensors": [{"name": t.name, "verified_horizon": round(
                self.tensor_horizon(t), 2), "explained_variance_rank1": t.ev[0], "r2": t.r2}
                for t in worst],
            "note": ("In-window explained variance and R^2 do not predict extrapolation "
                     "failure: a prototype run with R^2 0.996 still collapsed. The backtest "
                     "(fit on early checkpoints, predict later ones that exist) is the signal."),
        }


def _order(item) -> tuple:
    key = item[0]
    return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)
