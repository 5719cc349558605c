"""The guard: whether a jump stays, judged on the training reward around it.

When the mean reward of the `steps` steps after a jump falls more than `margin` below the mean
of the `steps` steps before it (means over all ranks), the jump is to be rolled back. The guard
only decides; the Accelerator acts on its Verdict (restores the pre-jump weights, halves the next
jump). Kept apart from the Accelerator so that the rule can grow (other evidence than the
training reward, remembering the best state) without touching the jump itself.

    guard = Guard(steps=5, margin=0.05, group=None)
    guard.observe(reward)             # every step; None while nothing is decided
    j.reward_before = Guard.mean([guard.window()])   # at a jump (one window per rank)
    guard.watch(j)                    # -> False: nothing to compare, the jump stays
    verdict = guard.observe(reward)   # `steps` steps later: Verdict(j, keep=...)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch

from relex.loop.group import LoopGroup


class Judged(Protocol):
    """What the guard reads and fills in on a jump's record (accelerator.Jump)."""

    reward_before: float | None
    reward_after: float | None


@dataclass(frozen=True)
class Verdict:
    """The guard's decision on one jump: keep it, or roll it back (keep False)."""

    jump: Judged
    keep: bool


class Guard:
    """Compares the training reward of the `steps` steps after a jump with the `steps` steps
    before it. group: relex's process group (None: one process); every rank decides at the same
    step, on sums over all ranks."""

    def __init__(self, steps: int, margin: float, group: LoopGroup | None = None):
        self.steps, self.margin, self.group = steps, margin, group
        self._before: deque = deque(maxlen=steps)  # this rank's last `steps` rewards
        self._watched: Judged | None = None
        self._after: list[float] = []
        self._seen = 0

    def window(self) -> tuple[float, int]:
        """This rank's (sum, count) of the rewards of the last `steps` steps: what `mean`
        pools over the ranks at a jump (the Accelerator sends it in the jump's exchange)."""
        return sum(self._before), len(self._before)

    @staticmethod
    def mean(windows: list[tuple[float, int]]) -> float | None:
        """The mean reward over every rank's window, None when no rank had a reward."""
        n = sum(count for _, count in windows)
        return sum(total for total, _ in windows) / n if n else None

    def watch(self, jump: Judged) -> bool:
        """Judge `jump` over the next `steps` steps. False when it has no reward before it
        (nothing to compare with): it stays, and nothing is watched."""
        if jump.reward_before is None:
            return False
        self._watched, self._after, self._seen = jump, [], 0
        return True

    def observe(self, reward: float | None) -> Verdict | None:
        """Record one step's reward (None: none this step). Returns the verdict on the watched
        jump at the `steps`-th step after it, else None. A rollback restarts the window before
        the next jump; this step's reward is its first."""
        verdict = self._judge(reward)
        if verdict is not None and not verdict.keep:
            self._before.clear()
        if reward is not None:
            self._before.append(float(reward))
        return verdict

    def _judge(self, reward: float | None) -> Verdict | None:
        if self._watched is None:
            return None
        if reward is not None:
            self._after.append(float(reward))
        self._seen += 1
        if self._seen < self.steps:
            return None
        jump, self._watched = self._watched, None
        total = torch.tensor([sum(self._after), float(len(self._after))], dtype=torch.float64)
        if self.group is not None:
            self.group.sum_(total)
        if total[1] == 0:  # no rank reported a reward: keep the jump
            return Verdict(jump, keep=True)
        jump.reward_after = float(total[0] / total[1])
        return Verdict(jump, keep=jump.reward_after >= jump.reward_before - self.margin)
