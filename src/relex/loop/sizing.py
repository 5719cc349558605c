"""jump="auto": each jump sized from the run's own evidence, and a guard against slow decline.

At every cycle end the Accelerator hands `AutoJump.decide` three things that are the same on
every rank (computed from all-reduced sums):

- the cycle's backtest: fit the cycle's first snapshots, predict its last ones, from the Gram
  matrices already summed for the fit (analysis.backtest.verified_horizon). Where the trend of
  its error would cross the limit, R x the cycle, caps the jump at (R - 1) x cycle steps past
  the cycle end (no crossing in sight: max_jump; a cycle of 10 snapshots cannot verify more
  than 3.3x by itself, so the trend, not the verified ratio, is the cap);
- the first jump goes as far as the first cycle's backtest reaches ((R - 1) x cycle steps),
  and at least half of `max_jump`, uncapped by that backtest unless it fails at the cycle
  itself (R <= 1: no first jump): the first cycle's few snapshots
  (5 at cycle 10) verify only 1.4-2 cycles ahead, and on the demo (benchmarks/bench_auto.py)
  starting at that reach spent the cycles where a run gains most on small jumps (cycle 10:
  median share 37%; half of max_jump: 21%); the jump guard still rolls a bad one back;
- the confirmation of the previous jump: did the guard keep it, and did the reward after it
  reach the reward before it? Confirmed jumps double (`early_growth`) until the run's first
  setback (a jump not confirmed, a plateau, a slide), then grow by `growth`, up to
  `max_jump` (6 cycles: on the demo at cycle 10, 6 cycles with the first jump above reached
  the plain run's level in 21% of its real steps (median of 5 seeds), 8 cycles the same;
  at cycle 20 caps of 5 or 8 cycles, or jumping straight to each cycle's backtest reach,
  landed past the start of the plateau and needed more real steps to recover); a jump that
  was not confirmed halves the next one;
- the reward's gain: the pooled mean reward of this cycle minus the last one's. Below `flat`
  reward units for two cycle ends in a row the run is on a plateau and the next jump halves,
  down to 0 (one noisy cycle does not shrink it: a step's training reward is noisy, and a
  least-squares slope inside one cycle was dominated by that noise on the demo). With no jump
  left and a flat reward the run has converged (`converged`): the real steps not trained are
  the saving.

With an eval_fn (accelerator.py) its score at the cycle end stands for the cycle's mean reward
and a jump is confirmed when the score right after it is higher than right before.

The slow-decline guard (`Decline`) keeps the best cycle mean reward seen and the weights at the
end of that cycle (in the snapshot store, RAM or snapshot_dir: one more copy of the rank's
trainable weights); when `patience` cycles in a row end more than `margin` below it, the
Accelerator restores those weights and the next jumps halve. A jump's own guard (guard.py)
catches a sudden drop; this catches a slide made of drops each below the margin.
"""

from __future__ import annotations

import math
import logging
from dataclasses import dataclass, field

import numpy as np

from relex.analysis.backtest import verified_horizon

log = logging.getLogger("relex.loop.accelerator")


@dataclass
class Decision:
    """One cycle end's choice: the jump written now and why (logged, recorded in Jump)."""

    size: int
    reason: str
    horizon: float | None = None  # the cycle backtest's limit (x the cycle)
    gain: float | None = None  # pooled mean reward of this cycle minus the last one's


@dataclass
class AutoJump:
    """The sizing rule. cycle, every: the Accelerator's; max_jump: the cap (default 6 cycles);
    growth: factor per confirmed jump once the run had a setback; early_growth: the factor
    before that; flat: reward change per cycle below which the reward counts as flat."""

    cycle: int
    every: int
    max_jump: int | None = None
    growth: float = 1.5
    early_growth: float = 2.0
    flat: float = 0.01
    size: int = field(init=False, default=0)
    converged: bool = field(init=False, default=False)
    _flat_before: bool = field(init=False, default=False)
    _decided: bool = field(init=False, default=False)
    _setback: bool = field(init=False, default=False)  # a jump not confirmed, a plateau, a slide

    def __post_init__(self) -> None:
        self.max_jump = self.max_jump if self.max_jump is not None else 6 * self.cycle

    def decide(self, horizon: float | None, confirmed: bool | None,
               gain: float | None) -> Decision:
        """The next jump from the cycle's backtest horizon (None: too few snapshots), the last
        jump's confirmation (None: nothing to confirm) and the reward gain per cycle (None:
        the first cycle)."""
        cap = self.cycle if horizon is None else max(0, int((horizon - 1.0) * self.cycle))
        size, why = self.size, []
        if not self._decided:  # the first jump: the backtest's reach, at least max_jump / 2
            self._decided = True  # (unless the cycle does not even predict itself: cap 0)
            size = cap = min(self.max_jump, max(cap, self.max_jump // 2)) if cap else 0
            why.append(f"first jump: half of max_jump ({self.max_jump}) or the cycle's backtest "
                       f"reach ({'none' if horizon is None else f'{horizon:.2f}x the cycle'}), "
                       f"the larger")
        elif confirmed is True:
            g = self.growth if self._setback else self.early_growth
            size = min(self.max_jump, max(size + self.every, math.ceil(size * g)))
            why.append(f"last jump confirmed: x{g:g}")
        elif confirmed is False:
            size //= 2
            self._setback = True
            why.append("last jump not confirmed: halved")
        below = gain is not None and gain < self.flat
        flat, self._flat_before = below and self._flat_before, below
        if flat:
            size //= 2
            self._setback = True
            why.append(f"reward flat ({gain:+.4f} per cycle, twice): halved")
        elif size == 0 and gain is not None:  # the reward moves again: try a small jump
            size = max(self.every, self.cycle // 2)
            why.append(f"reward rising again ({gain:+.4f} per cycle)")
        if size > cap:
            size = cap
            why.append("backtest: too few snapshots, cap one cycle" if horizon is None else
                       f"backtest error reaches its limit at {horizon:.2f}x the cycle: cap {cap}")
        size -= size % self.every
        self.size = size
        self.converged = size == 0 and flat
        return Decision(size, "; ".join(why) or "as before", horizon, gain)

    def slid(self) -> int:
        """The run slid below its best cycle (its weights were restored): halve the next jump,
        and grow by `growth` from now on."""
        self.size //= 2
        self._setback = True
        return self.size


@dataclass
class Decline:
    """The best cycle mean reward and how many cycles in a row ended `margin` below it."""

    margin: float
    patience: int = 2
    best: float | None = None
    below: int = 0

    def observe(self, mean: float | None) -> str:
        """'best' (a new best: keep these weights), 'restore' (a slide: go back to the best
        weights), or 'ok'."""
        if mean is None:
            return "ok"
        if self.best is None or mean > self.best:
            self.best, self.below = mean, 0
            return "best"
        self.below = self.below + 1 if mean < self.best - self.margin else 0
        if self.below >= self.patience:
            self.below = 0
            return "restore"
        return "ok"


class AutoMode:
    """An Accelerator's jump="auto" state: the sizing rule, the slow-decline guard, and every
    cycle end's decision. All inputs are the same on every rank, so every rank decides alike."""

    def __init__(self, cycle: int, every: int, options):
        self.sizer = AutoJump(cycle, every, max_jump=options.max_jump, growth=options.growth,
                              flat=options.flat)
        self.decline = Decline(options.guard_margin)
        self.decisions: list[tuple[int, Decision]] = []  # (real step, decision) per cycle end
        self.converged = False
        self._judged = 0  # jumps whose outcome the rule has read
        self._last_mean: float | None = None  # the previous cycle's pooled mean reward

    def decide(self, acc, step: int, names, grams, parts, rewards,
               score: float | None = None) -> Decision | None:
        """Size `acc`'s jump at this cycle end from the pooled per-step rewards (`rewards`: each
        rank's (step, reward) list), or the held-out score of the weights now (`score`,
        eval_fn's: preferred when given), the summed Gram matrices and the last jump's
        outcome. None: no jump now (the jump shrank to 0, or the run slid and the best weights
        were restored)."""
        pooled: dict[int, list[float]] = {}
        for rank_rewards in rewards:
            for s, r in rank_rewards:
                pooled.setdefault(s, []).append(r)
        at = sorted(pooled)
        means = [float(np.mean(pooled[s])) for s in at]
        mean = float(np.mean(means)) if means else None
        if score is not None:
            mean = score
        seen = self.decline.observe(mean)
        if seen == "restore":
            self._restore_best(acc, parts)
            acc.jump = self.sizer.slid()
            acc.skipped.append((step, "the reward slid below its best cycle: best weights "
                                      "restored"))
            log.warning("relex: the reward stayed more than %.3f below its best (%.3f) for %d "
                        "cycles; restored the weights of the best cycle; next jumps: %d steps",
                        self.decline.margin, self.decline.best, self.decline.patience, acc.jump)
            return None
        if seen == "best":
            acc.store.keep_best(parts)  # the weights at the end of the best cycle so far
        h = verified_horizon(dict(zip(names, grams)), acc.snap_steps, acc.config)
        horizon = h.ratio  # None: too few snapshots; without a trend, the verified ratio
        if h.trend:  # the trend's crossing, or no limit in sight: the cap is max_jump
            horizon = h.limit if h.limit is not None else \
                1.0 + self.sizer.max_jump / self.sizer.cycle
        gain = None if mean is None or self._last_mean is None else mean - self._last_mean
        self._last_mean = mean
        d = self.sizer.decide(horizon, self._confirmation(acc.jumps), gain)
        self.decisions.append((step, d))
        acc.jump = d.size
        if self.sizer.converged and not self.converged:
            acc._say(f"relex: converged at real step {step} (virtual {acc.virtual_step}): no "
                     f"jump left and the reward is flat ({d.reason})")
        self.converged = self.sizer.converged
        return d if d.size > 0 else None

    def _confirmation(self, jumps) -> bool | None:
        """Whether the last jump not yet read held up: True when the guard kept it and the
        reward after it rose above the reward before it, False when it was rolled back, None
        otherwise (no new jump, no reward to judge it, or a kept jump the reward did not
        follow: neither grow nor shrink on that)."""
        if self._judged == len(jumps):
            return None
        j, self._judged = jumps[-1], len(jumps)
        if j.rolled_back:
            return False
        if j.score_after is not None:  # the held-out check right after it
            return True if j.score_after > j.score_before else None
        if j.reward_after is None or j.reward_before is None:
            return None
        return True if j.reward_after > j.reward_before else None

    def forget_scores(self) -> None:
        """eval_fn stopped: the best cycle and the last cycle's mean were held-out scores,
        another scale than the training reward that replaces them; start both afresh (the
        next cycle's weights become the best state)."""
        self.decline = Decline(self.decline.margin, self.decline.patience)
        self._last_mean = None

    @staticmethod
    def _restore_best(acc, parts) -> None:
        acc._restore(parts, source=acc.store.best_of)
