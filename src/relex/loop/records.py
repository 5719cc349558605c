"""What the Accelerator records: one Jump per jump written (acc.jumps)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Jump:
    """One jump: where it happened and how well the cycle fitted.

    real_step: optimizer steps taken when the jump was written; virtual_step: real steps plus
    all accepted jumps (this one included while it is not rolled back); size: steps jumped;
    explained_variance / r2: mean over moving parameters of the rank-`rank` explained variance
    and the R^2 of the coefficient line; reward_before / reward_after: mean rewards of the
    guard windows (None until known); score_before / score_after: the held-out score
    (eval_fn) of the weights just before and just after the jump, when the Accelerator has
    one; rolled_back: the guard restored the pre-jump weights;
    seconds: wall time of the jump on this rank; reason, horizon: how jump="auto" sized it.
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
    score_before: float | None = None
    score_after: float | None = None
    #: jump="auto": why this size (loop/sizing.py), and the cycle backtest's verified horizon
    #: (x the cycle; None: too few snapshots to backtest)
    reason: str = ""
    horizon: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)
