"""Accelerate a training run from inside the loop: train a cycle, fit it, jump ahead, go on.

Every `cycle` real optimizer steps the Accelerator fits the cycle's snapshots (one every `every`
steps, the cycle start as base theta_0) with relex's math (fit.py: per-parameter T x T Gram
matrix, rank-1 coefficient line) and writes the weights predicted `jump` steps past the cycle
end into the live parameters, in place: the same Parameter objects, so the optimizer's state
(Adam moments, step counts) and the LR schedule survive. The next cycle starts from the jumped
weights. Measured on the demo task (issue 8): cycle 20 / jump 40 reaches the plain run's final
accuracy with about half the real steps; resetting the optimizer at each jump loses most of it.

The guard: when the mean reward of the `guard_steps` steps after a jump falls more than
`guard_margin` below the mean of the `guard_steps` steps before it, the pre-jump weights are
restored, the next jump is halved, and the rollback is logged and recorded. A jump never
stays half-written: on any error while writing it (NaN/Inf in the cycle raises a RelexError
naming the parameter) every parameter is restored to the live weights and the error re-raised.

Memory: the cycle's T = cycle / every snapshots plus the cycle start and the pre-jump weights,
each a CPU copy of the trainable parameters in their own dtype: (T + 2) x model bytes (cycle 20,
every 2: 12 x; 25 MB for the demo's 0.53M fp32 parameters, 12 GB for a 0.5B fp32 model). The fit
works on blocks of `block` elements per parameter (float64), so it adds little on top.

    acc = Accelerator(model, cycle=20, jump=40)
    for step in range(1, n + 1):
        ...; optimizer.step()
        acc.step(step, reward=mean_reward, optimizer=optimizer)   # -> Jump or None
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

from relex.errors import RelexError
from relex.fit import FitConfig, extrapolation_weights

log = logging.getLogger("relex.accelerate")

#: elements per block when forming Gram matrices and weighted sums (float64 work buffers)
BLOCK = 1 << 20


@dataclass
class Jump:
    """One jump: where it happened and how well the cycle fitted.

    real_step: optimizer steps taken when the jump was written; virtual_step: real steps plus
    all accepted jumps (this one included while it is not rolled back); size: steps jumped;
    explained_variance / r2: mean over moving parameters of the rank-`rank` explained variance
    and the R^2 of the coefficient line; reward_before / reward_after: mean rewards of the
    guard windows (None until known); rolled_back: the guard restored the pre-jump weights.
    """

    real_step: int
    virtual_step: int
    size: int
    explained_variance: float
    r2: float
    reward_before: float | None = None
    reward_after: float | None = None
    rolled_back: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class Accelerator:
    """Cycle / fit / jump in place on a torch model; call `step` after every optimizer step.

    model: a torch.nn.Module whose trainable parameters are updated by the training loop.
    cycle: real steps per cycle; every: a snapshot every `every` steps (cycle / every >= 2).
    jump: steps to jump past the cycle end (0 = observe only). method, rank: as in
    `relex extrapolate` ("relex" rank-r, or the "linear-weights" baseline).
    reset_optimizer: clear the optimizer state at each jump (an ablation; worse on the demo).
    guard_steps, guard_margin: see the module docstring (reward units; 0.05 suits rewards in
    [0, 1]); None guard_steps = cycle // 4. start_step: the step the model is at now.
    """

    def __init__(self, model: torch.nn.Module, cycle: int = 20, jump: int = 40, every: int = 2,
                 method: str = "relex", rank: int = 1, reset_optimizer: bool = False,
                 guard_steps: int | None = None, guard_margin: float = 0.05,
                 start_step: int = 0, block: int = BLOCK):
        if every < 1 or cycle % every or cycle // every < 2:
            raise RelexError(f"cycle {cycle}, every {every}: a cycle needs at least 2 snapshots "
                             f"and a multiple of `every` steps; use e.g. cycle=20, every=2")
        if jump < 0:
            raise RelexError(f"jump {jump}: must be >= 0 (0 observes without jumping)")
        if guard_steps is not None and not 1 <= guard_steps <= cycle:
            raise RelexError(f"guard_steps {guard_steps}: must be between 1 and cycle ({cycle})")
        self.config = FitConfig(method, rank)
        self.config.check(cycle // every)
        self.model, self.cycle, self.every, self.jump = model, cycle, every, jump
        self.reset_optimizer, self.block = reset_optimizer, block
        self.guard_steps = max(1, cycle // 4) if guard_steps is None else guard_steps
        self.guard_margin = guard_margin
        self.jumps: list[Jump] = []
        self.jumped = 0  # sum of accepted jumps
        self.last_step = start_step
        self._rewards: deque = deque(maxlen=self.guard_steps)
        self._pending: tuple[Jump, dict, list[float]] | None = None
        self._restart(start_step)

    # ------------------------------------------------------------------ state
    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters, looked up each time (a resized model is caught)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.params}

    def _restart(self, step: int) -> None:
        self.start = step
        self.base = self._copy()
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.snap_steps: list[int] = []

    @property
    def virtual_step(self) -> int:
        return self.last_step + self.jumped

    def memory_bytes(self) -> int:
        """Bytes held now in CPU copies (cycle start, snapshots, pre-jump weights)."""
        copies = [self.base, *self.snapshots] + ([self._pending[1]] if self._pending else [])
        return sum(t.numel() * t.element_size() for c in copies for t in c.values())

    # ------------------------------------------------------------------ the one call
    def step(self, step: int, reward: float | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> Jump | None:
        """Record real optimizer step `step` (taken just now); returns the Jump written, if any.

        reward: the mean training reward of this step (feeds the guard; None disables it).
        """
        self.last_step = step
        self._guard(step, reward)
        if reward is not None:
            self._rewards.append(float(reward))
        k = step - self.start
        if k <= 0 or k % self.every:
            return None
        self.snapshots.append(self._checked_copy())
        self.snap_steps.append(k)
        if k < self.cycle:
            return None
        try:
            return self._jump(step, reward, optimizer) if self.jump > 0 else None
        finally:  # the cycle is used up, jumped or not (a failed jump left the weights as is)
            self._restart(step)

    def _checked_copy(self) -> dict[str, torch.Tensor]:
        snap = self._copy()
        if snap.keys() != self.base.keys():
            raise RelexError(f"the model's trainable parameters changed during a cycle "
                             f"({sorted(snap.keys() ^ self.base.keys())[:3]}); create the "
                             f"Accelerator after freezing / adding parameters")
        for name, t in snap.items():
            if t.shape != self.base[name].shape:
                raise RelexError(f"parameter {name} changed shape from "
                                 f"{tuple(self.base[name].shape)} to {tuple(t.shape)} during a "
                                 f"cycle; relex needs fixed shapes "
                                 f"(create the Accelerator after any resizing)")
        return snap

    def _jump(self, step: int, reward, optimizer) -> Jump:
        started = time.perf_counter()
        steps = np.asarray(self.snap_steps, dtype=np.float64)
        target = np.asarray([self.cycle + self.jump], dtype=np.float64)
        pre = self.snapshots[-1]  # the live weights now
        evs, r2s = [], []
        with torch.no_grad():
            try:
                for name, p in self.params:
                    base = self.base[name].reshape(-1)
                    rows = [s[name].reshape(-1) for s in self.snapshots]
                    gram = self._gram(base, rows)
                    if not np.isfinite(gram).all():
                        raise RelexError(f"NaN/Inf in parameter {name} during the cycle; no "
                                         f"jump written (lower the learning rate or check the "
                                         f"loss for overflow)")
                    fit = extrapolation_weights(gram, steps, target, self.config)
                    if fit.stats["r2"] is not None:
                        evs.append(fit.stats["explained_variance"][self.config.rank - 1])
                        r2s.append(fit.stats["r2"])
                    p.copy_(self._combine(base, rows, fit.weights[0]).view_as(p))
            except BaseException:  # never leave a jump half-written: back to the live weights
                for name, p in self.params:
                    p.copy_(pre[name].view_as(p))
                raise
        before = float(np.mean(self._rewards)) if self._rewards else None
        self.jumped += self.jump
        j = Jump(step, step + self.jumped, self.jump, float(np.mean(evs)) if evs else 1.0,
                 float(np.mean(r2s)) if r2s else 1.0, before,
                 seconds=time.perf_counter() - started)
        self.jumps.append(j)
        if self.reset_optimizer and optimizer is not None:
            optimizer.state.clear()
        if before is not None:
            self._pending = (j, pre, [])
        log.info("relex: jumped %d steps at real step %d (virtual %d; explained variance %.4f, "
                 "R^2 %.4f)", j.size, step, j.virtual_step, j.explained_variance, j.r2)
        return j

    def _gram(self, base: torch.Tensor, rows: list[torch.Tensor]) -> np.ndarray:
        """G = D D^T of the deltas rows - base (float64), block by block."""
        gram = torch.zeros(len(rows), len(rows), dtype=torch.float64)
        for lo in range(0, base.numel(), self.block):
            b = base[lo:lo + self.block].double()
            d = torch.stack([r[lo:lo + self.block].double() - b for r in rows])
            gram += d @ d.T
        return gram.numpy()

    def _combine(self, base: torch.Tensor, rows: list[torch.Tensor], w: np.ndarray) -> torch.Tensor:
        """theta_0 + w @ D (float64 work, result in the parameter's dtype)."""
        w = torch.from_numpy(w)
        out = torch.empty_like(base)
        for lo in range(0, base.numel(), self.block):
            b = base[lo:lo + self.block].double()
            d = torch.stack([r[lo:lo + self.block].double() - b for r in rows])
            out[lo:lo + self.block] = (b + w @ d).to(base.dtype)
        return out

    # ------------------------------------------------------------------ the guard
    def _guard(self, step: int, reward: float | None) -> None:
        """Collect rewards after the last jump; roll it back when they fell clearly."""
        if self._pending is None or reward is None:
            return
        j, pre, after = self._pending
        after.append(float(reward))
        if len(after) < self.guard_steps:
            return
        self._pending = None
        j.reward_after = float(np.mean(after))
        if j.reward_after >= j.reward_before - self.guard_margin:
            return
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(pre[name].view_as(p))
        j.rolled_back = True
        self.jumped -= j.size
        self.jump //= 2
        self._rewards.clear()
        self._restart(step)
        log.warning("relex: rolled back the jump at real step %d (reward %.3f before, %.3f "
                    "after); next jumps: %d steps", j.real_step, j.reward_before, j.reward_after,
                    self.jump)
