"""Accelerate a training run from inside the loop: train a cycle, fit it, jump ahead, go on.

Every `cycle` real optimizer steps the Accelerator fits the cycle's snapshots (one every `every`
steps, the cycle start as base theta_0) with relex's math (fit.py: per-parameter T x T Gram
matrix, rank-1 coefficient line) and writes the weights predicted `jump` steps past the cycle
end into the weights the optimizer trains, in place: the same Parameter / master tensors, so the
optimizer's state (Adam moments, step counts) and the LR schedule survive. The next cycle starts
from the jumped weights. On the demo task cycle 20 / jump 40 reaches the plain run's final
accuracy with about half the real steps; resetting the optimizer at each jump loses most of it.

Sharded training works on each rank's own part of the fp32 master weights (shards.py: FSDP2,
DeepSpeed ZeRO-1/2/3; one process and DDP hold whole parameters). Per parameter the Gram matrix
is the sum of the ranks' local Gram matrices: all of a jump's Gram matrices travel in one
all-reduce, the fit is computed identically on every rank from the same sums, and each rank
writes theta_0 + W @ D into its own part. Snapshots are kept compactly (snapshots.py: deltas
from the cycle start in scaled float16, or float32; optionally spilled to `snapshot_dir`) with
their Gram rows accumulated as they arrive, so a jump is one exchange, the fit and one weighted
sum.

Decisions are shared: a rank whose snapshots differ in names or shapes, a NaN/Inf in any rank's
part, a full snapshot directory, or any failure on any rank skip the jump on every rank (one
logged line; training goes on); an error while writing restores every rank's pre-jump weights.
relex never crashes or hangs the run it sits in: its collectives run on a gloo group of its own
with a timeout, and an unexpected error disables the Accelerator (logged, `disabled`), not the
run. Configuration errors are raised when the Accelerator is created, before training.

The guard (guard.py): when the mean reward of the `guard_steps` steps after a jump falls more
than `guard_margin` below the mean of the `guard_steps` steps before it (means over all ranks),
the pre-jump weights are restored on every rank, the next jump is halved, and the rollback is
logged and recorded. With `eval_fn` (a held-out check: a score on a dev set with a real
verifier) the guard judges each jump at once on it instead: the score of the jumped weights
against the score just before the jump, the same margin; jump="auto" then also reads its
plateau, confirmations and best state from these scores instead of the noisy training reward.

    acc = Accelerator(model, cycle=20, jump=40)      # a module, a fully_shard model, a DeepSpeed engine
    for step in range(1, n + 1):
        ...; optimizer.step()
        acc.step(step, reward=mean_reward, optimizer=optimizer)   # -> Jump or None
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from relex.errors import RelexError, first_line
from relex.fit import FitConfig, extrapolation_weights
from relex.loop import shards
from relex.loop.group import LoopGroup
from relex.loop.guard import Guard, Verdict
from relex.loop.records import Jump
from relex.loop.sizing import AutoMode, Decision
from relex.loop.snapshots import BLOCK, CycleStore
from relex.options import LoopOptions
from relex.stream.torchrun import fingerprint

log = logging.getLogger("relex.loop.accelerator")

class Accelerator:
    """Cycle / fit / jump in place; call `step` after every optimizer step.

    model: what the loop trains: a torch.nn.Module (one process, DDP), a `fully_shard`ed model
    (FSDP2), or a DeepSpeed engine or its `.module`. optimizer: the optimizer, if known now
    (DeepSpeed ZeRO-1/2 needs it at the first jump; `step(optimizer=...)` gives it too).
    start_step: the step the model is at now. options: the fields of relex.options.LoopOptions
    (cycle, jump, every, method, rank, reset_optimizer, guard_steps, guard_margin,
    snapshot_dtype, snapshot_dir, timeout), as keywords or as one LoopOptions. eval_fn: a
    held-out check, called with no argument on every rank at each cycle end and right after
    each jump (the ranks may need to run it together, as FSDP forwards do), returning a score
    where higher is better (e.g. accuracy on a dev set); the ranks' scores are averaged. It
    judges the jumps instead of the training reward (see the module doc); if it raises or
    returns NaN, relex says so and goes back to the training reward. One that runs collectives
    must fail on every rank or none: relex cannot free ranks waiting inside it.

    Example:
        >>> acc = relex.Accelerator(model, cycle=20, jump=40, snapshot_dir="/local/relex")
    """

    def __init__(self, model, options: LoopOptions | None = None, *, optimizer=None,
                 start_step: int = 0, block: int = BLOCK,
                 eval_fn: Callable[[], float] | None = None, **kwargs):
        o = replace(options or LoopOptions(), **kwargs)
        cycle, every, jump = o.cycle_steps, o.every, o.jump
        if every < 1 or cycle % every or cycle // every < 2:
            raise RelexError(f"cycle {cycle}, every {every}: a cycle needs at least 2 snapshots "
                             f"and a multiple of `every` steps; use e.g. cycle=20, every=2")
        if jump != "auto" and (not isinstance(jump, int) or jump < 0):
            raise RelexError(f"jump {jump!r}: a number of steps >= 0 (0 observes without "
                             f"jumping), or 'auto'")
        if o.guard_steps is not None and not 1 <= o.guard_steps <= cycle:
            raise RelexError(f"guard_steps {o.guard_steps}: must be between 1 and cycle "
                             f"({cycle})")
        self.options = o
        self.config = FitConfig(o.method, o.rank)
        self.config.check(cycle // every)
        self.layout = shards.layout(model, optimizer)
        if o.reset_optimizer and isinstance(self.layout, shards.DeepSpeed):
            raise RelexError("reset_optimizer=True is not supported under DeepSpeed (its "
                             "optimizer state is partitioned with the masters)")
        #: jump="auto": the sizing rule, the slow-decline guard, the decisions (sizing.py)
        self.auto = AutoMode(cycle, every, o) if jump == "auto" else None
        if self.auto:
            jump = self.auto.sizer.size
        self.model, self.cycle, self.every, self.jump = model, cycle, every, jump
        self.reset_optimizer = o.reset_optimizer
        self.optimizer = optimizer
        self.eval_fn = eval_fn
        self.group = LoopGroup.of_run(o.timeout)
        self.guard = Guard(max(1, cycle // 4) if o.guard_steps is None else o.guard_steps,
                           o.guard_margin, self.group)
        self.store = CycleStore(o.snapshot_dtype, o.snapshot_dir,
                                self.group.rank if self.group else 0, block)
        self.jumps: list[Jump] = []
        self.skipped: list[tuple[int, str]] = []  # (real step, why no jump was written)
        self.disabled: str | None = None
        self.jumped = 0  # sum of accepted jumps
        self.last_step = start_step
        self._order_warned = False
        self._restart(start_step, first=True)

    # ------------------------------------------------------------------ state
    def _parts(self) -> list[shards.Part]:
        """This rank's trainable weights, looked up each time (FSDP2 resharded first)."""
        self.layout.prepare()
        return self.layout.parts()

    def _restart(self, step: int, first: bool = False) -> None:
        self.start = step
        self.snap_steps: list[int] = []
        self._rewards: list[tuple[int, float]] = []  # this cycle's (step, reward) on this rank
        self._cycle_error: str | None = None
        self._shapes: list = []
        try:
            parts = self._parts()
            self._shapes = [(p.name, p.shape, p.tensor.numel()) for p in parts]
            self.store.start(parts)
        except Exception as e:
            if first:  # at creation: a configuration error, raised before training
                raise
            self._local_failure(e)  # this rank's failure, shared at the cycle end

    def _local_failure(self, e: Exception) -> None:
        """A failure of this rank alone (memory, disk): the cycle is lost, and the other ranks
        hear of it at the cycle's shared decision instead of waiting on this rank."""
        self._cycle_error = _failure(e)
        self.store.clear_rows()

    @property
    def converged(self) -> bool:
        """jump="auto": no jump left and the reward flat (the real steps not trained are the
        saving)."""
        return self.auto is not None and self.auto.converged

    @property
    def decisions(self) -> list[tuple[int, Decision]]:
        """jump="auto": (real step, Decision) at every cycle end."""
        return self.auto.decisions if self.auto is not None else []

    @property
    def virtual_step(self) -> int:
        return self.last_step + self.jumped

    @property
    def guard_steps(self) -> int:
        return self.guard.steps

    @property
    def guard_margin(self) -> float:
        return self.guard.margin

    def memory_bytes(self) -> int:
        """Bytes held now in RAM (cycle start, stored deltas, pre-jump weights)."""
        return self.store.memory_bytes()

    # ------------------------------------------------------------------ the one call
    def step(self, step: int, reward: float | None = None, optimizer=None) -> Jump | None:
        """Record real optimizer step `step` (taken just now); returns the Jump written, if any.

        reward: the mean training reward of this step (feeds the guard; None for none).
        Never raises: an unexpected error is logged and disables the Accelerator."""
        if self.disabled is not None:
            return None
        try:
            return self._step(step, reward, optimizer)
        except Exception as e:  # noqa: BLE001 -- relex must not be the reason a run crashes
            self._disable(step, e)
            return None

    def _step(self, step: int, reward, optimizer) -> Jump | None:
        if optimizer is not None and optimizer is not self.optimizer:
            shards.refuse_fp16_masters(optimizer)  # raised here: disables relex, says why
            self.optimizer = optimizer
            if isinstance(self.layout, shards.DeepSpeed):
                self.layout.use(optimizer)
        if step <= self.last_step:
            if not self._order_warned:
                self._order_warned = True
                log.warning("relex: step(%d) after step(%d): pass the optimizer step count, "
                            "increasing with each call (e.g. trainer.state.global_step); "
                            "relex ignores such calls, so it does not jump", step,
                            self.last_step)
            return None
        self.last_step = step
        if reward is not None:
            self._rewards.append((step, float(reward)))
        self._guard(step, reward)
        k = step - self.start
        if k <= 0 or k % self.every:
            return None
        self._snapshot()
        self.snap_steps.append(k)
        if k < self.cycle:
            return None
        try:
            return self._jump(step) if self.jump > 0 or self.auto else None
        finally:  # the cycle is used up, jumped or not
            self._restart(step)

    def _snapshot(self) -> None:
        if self._cycle_error is not None:
            return
        try:
            parts = self._parts()
        except Exception as e:  # noqa: BLE001 -- shared at the cycle end
            self._local_failure(e)
            return
        now = [(p.name, p.shape, p.tensor.numel()) for p in parts]
        if now != self._shapes:
            changed = sorted({n for n, *_ in now} ^ {n for n, *_ in self._shapes}) or [
                a[0] for a, b in zip(now, self._shapes) if a != b]
            self._cycle_error = (f"the trainable parameters changed during the cycle "
                                 f"({', '.join(changed[:3])}); relex needs fixed names and "
                                 f"shapes (create the Accelerator after freezing, adding or "
                                 f"resizing parameters)")
            return
        try:
            self.store.add(parts)
        except Exception as e:  # noqa: BLE001 -- shared at the cycle end, see _local_failure
            self._local_failure(e)

    # ------------------------------------------------------------------ the jump
    def _agree(self, error: str | None, extra=None) -> tuple[str | None, list]:
        """Every rank's (error, extra); the first error (with its rank) for all of them."""
        if self.group is None:
            return error, [extra]
        got = self.group.gather((error, extra))
        bad = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
        if bad:
            r, e = bad[0]
            return (e if r == self.group.rank else f"rank {r}: {e}"), [x for _, x in got]
        return None, [x for _, x in got]

    def _jump(self, step: int) -> Jump | None:
        started = time.perf_counter()
        names = [n for n, *_ in self._shapes]
        shape_print = fingerprint([(n, list(s)) for n, s, _ in self._shapes] + [self.snap_steps])
        error = self._cycle_error or self.layout_ready()
        error, extras = self._agree(error, (shape_print, self.guard.window(), self._rewards))
        if error is None and len({x[0] for x in extras}) > 1:
            odd = next(r for r, x in enumerate(extras) if x[0] != extras[0][0])
            error = (f"rank {odd}'s trainable parameters differ from rank 0's in names or "
                     f"shapes (each rank must hold the same model)")
        if error is not None:
            return self._skip(step, error)
        grams = np.stack([self.store.gram[n] for n in names]) if names else np.zeros((0, 0, 0))
        parts = self._parts()
        if self.layout.sharded and self.group is not None:
            summed = self.group.sum_(torch.from_numpy(np.ascontiguousarray(grams)))
            replicas = np.asarray([p.replicas for p in parts], dtype=np.float64)
            grams = summed.numpy() / replicas[:, None, None]
        bad = [n for n, g in zip(names, grams) if not np.isfinite(g).all()]
        if bad:
            return self._skip(step, f"NaN/Inf in parameter {bad[0]} during the cycle; no "
                                    f"jump written (lower the learning rate or check the "
                                    f"loss for overflow)")
        decision, score = None, self._score(step)
        if self.auto is not None:
            decision = self.auto.decide(self, step, names, grams, parts, [x[2] for x in extras],
                                        score)
            if decision is None:
                return None
        steps = np.asarray(self.snap_steps, dtype=np.float64)
        target = np.asarray([self.cycle + self.jump], dtype=np.float64)
        fits = [extrapolation_weights(g, steps, target, self.config) for g in grams]
        written, error = self._write(parts, fits)
        error, _ = self._agree(error)
        if error is not None:  # some rank failed: every rank goes back to its live weights
            self._restore(written)
            self.store.drop_pre()
            return self._skip(step, f"writing the jump failed: {error}; pre-jump weights "
                                    f"restored")
        try:
            self.layout.refresh()
        except Exception:
            try:  # best effort before relex disables itself; the disable says why
                self._restore(written, refresh=False)
            except Exception:  # noqa: BLE001, S110
                pass
            raise
        if self.reset_optimizer:
            self.layout.clear_optimizer_state(self.optimizer)
        mean_before = Guard.mean([x[1] for x in extras])
        self.jumped += self.jump
        evs = [f.stats["explained_variance"][self.config.rank - 1] for f in fits
               if f.stats["r2"] is not None]
        r2s = [f.stats["r2"] for f in fits if f.stats["r2"] is not None]
        j = Jump(step, step + self.jumped, self.jump, float(np.mean(evs)) if evs else 1.0,
                 float(np.mean(r2s)) if r2s else 1.0, mean_before,
                 seconds=time.perf_counter() - started,
                 reason=decision.reason if decision else "",
                 horizon=decision.horizon if decision else None, score_before=score)
        self.jumps.append(j)
        if score is not None:
            j.score_after = self._score(step)
        self._say(f"relex: jumped {j.size} steps at real step {step} (virtual {j.virtual_step}; "
                  f"explained variance {j.explained_variance:.4f}, R^2 {j.r2:.4f}; "
                  f"{j.seconds:.2f} s" + (f"; {j.reason}" if j.reason else "") +
                  ("" if j.score_after is None else
                   f"; held-out {j.score_before:.4f} -> {j.score_after:.4f}") + ")")
        if j.score_after is not None:  # judged now, on the held-out check
            if j.score_after < j.score_before - self.guard.margin:
                self._roll_back(j, f"held-out score {j.score_before:.3f} before, "
                                   f"{j.score_after:.3f} after")
            else:
                self.store.drop_pre()
        elif not self.guard.watch(j):  # no reward before it: nothing to judge, the jump stays
            self.store.drop_pre()
        return j

    def _score(self, step: int) -> float | None:
        """eval_fn's score of the weights as they are now, averaged over the ranks (None
        without one). A failure on any rank is logged and drops eval_fn on every rank: the
        guard goes back to the training reward; the run goes on."""
        if self.eval_fn is None:
            return None
        error, value = None, None
        modes = ([(m, m.training) for m in self.model.modules()]
                 if isinstance(self.model, torch.nn.Module) else [])
        try:
            value = float(self.eval_fn())
            if not np.isfinite(value):
                error = f"eval_fn returned {value}"
        except Exception as e:  # noqa: BLE001 -- the user's function must not stop the run
            error = f"eval_fn raised {_failure(e)}"
        finally:
            for module, training in modes:  # each module as it was, whatever eval_fn did
                module.training = training
        error, values = self._agree(error, value)
        if error is not None:
            self.eval_fn = None
            if self.auto is not None:  # its scores were on eval_fn's scale, not the reward's
                self.auto.forget_scores()
            log.error("relex: %s at real step %d; jumps are judged on the training reward "
                      "from now on", error, step)
            return None
        return float(np.mean(values))

    def layout_ready(self) -> str | None:
        """Why the layout cannot be refreshed after a write, if it cannot (checked before)."""
        if isinstance(self.layout, shards.DeepSpeed) and self.layout.optimizer is None:
            return ("DeepSpeed ZeRO-1/2: relex needs the DeepSpeed optimizer to refresh the "
                    "16-bit weights; pass optimizer= to acc.step or give the Accelerator the "
                    "DeepSpeed engine")
        return None

    def _write(self, parts, fits) -> tuple[list[shards.Part], str | None]:
        """theta_0 + W @ D into every part, keeping each part's pre-jump copy first."""
        written = []
        try:
            self.store.begin_pre(parts)  # spilled: all pre-jump copies on disk here
            with torch.no_grad():
                for part, fit in zip(parts, fits):
                    self.store.keep_pre(part)  # in RAM: each copy just before its write
                    written.append(part)
                    self.store.combine_into(part, fit.weights[0])
                    self.store.free(part.name)
            return written, None
        except Exception as e:  # noqa: BLE001 -- shared with the other ranks, then handled
            return written, _failure(e)

    def _restore(self, parts: list[shards.Part], refresh: bool = True, source=None) -> None:
        """Copy back the pre-jump weights (or `source(name)`'s: the best state) where kept."""
        with torch.no_grad():
            for part in parts:
                pre = (source or self.store.pre_of)(part.name)
                if pre is not None:
                    part.tensor.copy_(pre.to(part.tensor.device))
                    if part.flush is not None:
                        part.flush()
        if refresh:
            self.layout.refresh()

    def _skip(self, step: int, why: str) -> None:
        self.skipped.append((step, why))
        log.error("relex: no jump at real step %d: %s", step, why)

    def _disable(self, step: int, e: Exception) -> None:
        self.disabled = (first_line(e) if isinstance(e, RelexError)
                         else f"{type(e).__name__}: {first_line(e)}")
        log.error("relex: disabled at step %d (training goes on without it): %s", step,
                  self.disabled)
        try:
            self.store.close()
        except Exception:  # noqa: BLE001, S110
            pass

    # ------------------------------------------------------------------ the guard
    def _guard(self, step: int, reward: float | None) -> None:
        """Feed the guard this step's reward; act on its verdict on the last jump, if any."""
        verdict = self.guard.observe(reward)
        if verdict is not None:
            self._settle(step, verdict)

    def _settle(self, step: int, verdict: Verdict) -> None:
        """Keep the jump (its pre-jump copy goes), or restore the pre-jump weights on this
        rank (every rank does, at the same step), halve the next jump and start a new cycle."""
        if verdict.keep:
            self.store.drop_pre()
            return
        j = verdict.jump
        self._roll_back(j, f"reward {j.reward_before:.3f} before, {j.reward_after:.3f} after")
        self._restart(step)

    def _roll_back(self, j: Jump, why: str) -> None:
        """Restore the weights from before jump `j` on this rank (every rank does, at the same
        step) and halve the next jump."""
        self._restore(self._parts())
        self.store.drop_pre()
        j.rolled_back = True
        self.jumped -= j.size
        if self.auto is None:  # jump="auto" reads the rollback at the next cycle end
            self.jump //= 2
        log.warning("relex: rolled back the jump at real step %d (%s); next jumps: %d steps",
                    j.real_step, why, self.jump)

    def _say(self, line: str) -> None:
        """One visible line on rank 0 (verbose), else the logger at INFO."""
        if self.options.verbose and (self.group is None or self.group.rank == 0):
            print(line, file=sys.stderr, flush=True)
        else:
            log.info(line)

    def close(self) -> None:
        """Remove the snapshot files (the Accelerator stops jumping)."""
        self.disabled = self.disabled or "closed"
        self.store.close()


def _failure(e: Exception) -> str:
    """One line for a rank's own failure: a disk error is the snapshot directory's."""
    if isinstance(e, OSError):
        return f"snapshot_dir: {os.strerror(e.errno) if e.errno else e}"
    return f"{type(e).__name__}: {first_line(e)}"

