"""`RelexCallback`: relex inside `trl.GRPOTrainer` (or any `transformers.Trainer`).

    trainer = GRPOTrainer(..., callbacks=[RelexCallback(mode="accelerate", cycle=20, jump=40)])

Modes:
- "accelerate": relex.loop.accelerator.Accelerator in the loop. Every `cycle` optimizer steps the
  cycle's snapshots are fitted and the weights predicted `jump` steps ahead are written into the
  live parameters in place, on every rank (identical inputs, identical float64 math, so DDP
  replicas stay identical); Adam state and LR schedule are kept. Jumps (and guard rollbacks)
  happen only at generation boundaries: GRPOTrainer generates once per
  steps_per_generation * num_iterations micro-steps and trains on the buffered completions in
  between, so `cycle` and the guard window must be whole generation intervals. vLLM: TRL
  re-syncs its weights before generating whenever `state.global_step != _last_loaded_step`;
  the jump happens after `global_step` was incremented and before the next generation, so the
  next generation syncs the jumped weights with no help (checked against TRL 1.16 source).
  The guard needs each step's reward: the callback asks the Trainer to log every step
  (`control.should_log`) and acts in `on_log`, where TRL's `reward` for that step is known.
  Under FSDP2 (accelerate `fsdp_version: 2`) and DeepSpeed ZeRO-1/2/3 every rank jumps its own
  shard of the fp32 masters (relex.loop.shards) and DeepSpeed's 16-bit copies are refreshed, so TRL's
  vLLM sync sends the jumped weights; FSDP1, Megatron and tensor parallel training are refused
  at on_train_begin.
- "forecast": at every save (world process zero) run `relex.analyze` on the checkpoints so far
  and log explained variance, R^2, the verified horizon and the step it reaches.
- "stop": at step `observe_until` (after its checkpoint is saved) write `targets` with
  `relex.extrapolate` on the run's output_dir and stop training.

Use a constant learning rate (`lr_scheduler_type="constant"`): TRL's default linear decay
slows the late steps, which bends the trajectory away from the straight line relex fits.
Jumps, forecasts and rollbacks go into `state.log_history` under `relex/...` keys (the entry of
that step) and into the step's `logs`, which reporting callbacks (W&B, TensorBoard) see when the
callback runs before them: `RelexCallback(...).add_to(trainer)` instead of `callbacks=[...]`. Errors inside relex at jump / save time are logged and disable the callback; they
never stop the user's run. Configuration errors are raised at on_train_begin, before training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from relex.loop.accelerator import Accelerator
from relex.errors import RelexError
from relex.loop.group import LoopGroup
from relex.options import LoopOptions

#: seconds the other ranks wait for rank 0 to write stop mode's targets (an extrapolation of a
#: large model takes minutes; relex's own gloo group, so no training collective is pending)
STOP_TIMEOUT = 3600.0

log = logging.getLogger("relex.integrations.trl")

MODES = ("accelerate", "forecast", "stop")


def generation_interval(args) -> float:
    """Optimizer steps between two generations of GRPOTrainer (1 for other Trainers)."""
    per_gen = getattr(args, "steps_per_generation", None)
    if per_gen is None:
        return 1.0
    return per_gen * getattr(args, "num_iterations", 1) / args.gradient_accumulation_steps


def refuse_unsupported(args) -> None:
    """FSDP1 hides the tensors in flat parameters; Megatron / tensor parallel split them in ways
    a per-rank Gram sum does not cover."""
    kind = str(getattr(getattr(args, "distributed_state", None), "distributed_type", ""))
    version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if args.fsdp and version == 1:
        raise RelexError("RelexCallback(mode='accelerate'): FSDP1 is not supported; use FSDP2 "
                         "(fsdp_config={'version': 2}, accelerate fsdp_version: 2)")
    if "MEGATRON" in kind or (getattr(args, "tp_size", 1) or 1) > 1:
        raise RelexError("RelexCallback(mode='accelerate'): Megatron / tensor parallel training "
                         "is not supported (single process, DDP, FSDP2 and DeepSpeed ZeRO are); "
                         "use mode='forecast' or 'stop', or `relex watch`")


class RelexCallback(TrainerCallback):
    """relex in a transformers / TRL training loop; see the module docstring.

    mode: "accelerate" (options: relex.options.LoopOptions' fields, as in relex.Accelerator:
    cycle, jump, every, method, rank, reset_optimizer, guard_steps, guard_margin,
    snapshot_dtype, snapshot_dir, timeout), "forecast" (base) or "stop" (observe_until,
    targets, base, output). stop_when_converged: with jump="auto", stop training when relex
    says the run has converged (no jump left, the reward flat). eval_fn: a held-out check
    that judges the jumps instead of the training reward (relex.Accelerator's eval_fn), or
    "trainer": the trainer's own evaluation (`trainer.evaluate()`'s `eval_reward`: TRL's
    reward functions on its eval_dataset; register with `add_to(trainer)`). base: the model
    before RL; default: the model as training starts, saved to output_dir/relex-base. output:
    where "stop" writes (default output_dir/relex-extrapolated); "forecast" writes its report
    to output_dir/relex-forecast.
    """

    def __init__(self, mode: str = "accelerate", *, observe_until: int | None = None,
                 targets: list[int] | None = None, base: str | Path | None = None,
                 output: str | Path | None = None, stop_when_converged: bool = False,
                 eval_fn=None, **options):
        if mode not in MODES:
            raise RelexError(f"RelexCallback mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == "stop" and (observe_until is None or not targets):
            raise RelexError("RelexCallback(mode='stop') needs observe_until=K and targets=[...]")
        self.mode = mode
        self.loop = LoopOptions(**options)
        self.observe_until, self.targets = observe_until, sorted(targets or [])
        self.base, self.output = base, output
        self.accelerator: Accelerator | None = None
        self.optimizer = None
        self.forecasts: list[dict] = []
        self.written: Path | None = None
        self._disabled = False
        self.stop_when_converged = stop_when_converged
        if eval_fn is not None and eval_fn != "trainer" and not callable(eval_fn):
            raise RelexError(f"RelexCallback eval_fn={eval_fn!r}: a function returning a score "
                             f"(higher is better), or 'trainer' for trainer.evaluate()'s "
                             f"eval_reward")
        self.eval_fn = eval_fn
        self._trainer = None  # add_to's, for eval_fn="trainer"
        self._group: LoopGroup | None = None  # stop mode: relex's own group for the decision

    def add_to(self, trainer) -> RelexCallback:
        """Register with `trainer` ahead of its reporting callbacks.

        transformers runs W&B / TensorBoard / MLflow callbacks before the ones passed in
        `callbacks=[...]`, so they would log a step before relex adds its `relex/...` values to
        it; registered first, the jump's values reach them in the same log call."""
        trainer.callback_handler.callbacks.insert(0, self)
        self._trainer = trainer
        return self

    def _evaluate(self) -> float:
        """eval_fn="trainer": the mean reward of TRL's reward functions on the eval dataset.
        TRL pushes the weights to vLLM only when global_step moved since the last push; relex
        evaluates twice at one step (before and after the jump), so it clears that mark
        before (the jumped weights are what gets scored) and after (the next rollouts use the
        weights as they are then: jumped, or restored)."""
        self._resync()
        try:
            metrics = self._trainer.evaluate()
        finally:
            self._resync()
        if "eval_reward" not in metrics:
            raise RelexError(f"trainer.evaluate() gave no eval_reward (got "
                             f"{', '.join(sorted(metrics)) or 'nothing'})")
        return metrics["eval_reward"]

    def _resync(self) -> None:
        if hasattr(self._trainer, "_last_loaded_step"):  # GRPOTrainer with vLLM (TRL 1.16)
            self._trainer._last_loaded_step = -1

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.mode == "accelerate":
            refuse_unsupported(args)
            self._check_boundaries(args)
            eval_fn = self.eval_fn
            if eval_fn == "trainer":
                if self._trainer is None or self._trainer.eval_dataset is None:
                    raise RelexError("RelexCallback(eval_fn='trainer') needs an eval_dataset "
                                     "in the trainer and the callback registered with "
                                     "RelexCallback(...).add_to(trainer)")
                eval_fn = self._evaluate
            self.accelerator = Accelerator(model, start_step=state.global_step,
                                           optimizer=optimizer, options=self.loop,
                                           eval_fn=eval_fn)
            self.optimizer = optimizer
            log.info("relex: accelerating (%s), cycle %d, jump %d; the cycle start holds %.1f MB",
                     self.accelerator.layout.kind, self.accelerator.cycle,
                     self.accelerator.jump, self.accelerator.memory_bytes() / 1e6)
            return
        if self.mode == "stop":  # every rank, now: the group of the stop decision
            self._group = LoopGroup.of_run(max(self.loop.timeout, STOP_TIMEOUT))
        if self.mode == "stop" and state.max_steps and self.observe_until > state.max_steps:
            raise RelexError(f"RelexCallback observe_until={self.observe_until} is beyond "
                             f"max_steps={state.max_steps}; lower it or train longer")
        if self.mode == "stop":
            self._warn_save_limit(args)
        if self.base is None:
            self.base = Path(args.output_dir) / "relex-base"
            if state.global_step > 0:  # resumed: the model is no longer the pre-RL base
                if not (self.base / "config.json").is_file():
                    raise RelexError(f"RelexCallback: training resumed at step "
                                     f"{state.global_step} and {self.base} (the model saved "
                                     f"when training first started) is missing; pass base= "
                                     f"the model before RL")
            elif state.is_world_process_zero:
                model.save_pretrained(self.base)

    def _check_boundaries(self, args) -> None:
        interval = generation_interval(args)
        o = self.loop
        guard = o.guard_steps if o.guard_steps is not None else max(1, o.cycle_steps // 4)
        if interval > 1 and (o.cycle_steps % interval or guard % interval):
            raise RelexError(f"RelexCallback: cycle {o.cycle_steps} and guard_steps {guard} must "
                             f"be multiples of the generation interval ({interval:g} optimizer "
                             f"steps = steps_per_generation x num_iterations / gradient "
                             f"accumulation), so jumps happen between generations")

    def _warn_save_limit(self, args) -> None:
        limit = args.save_total_limit
        every = args.save_steps if args.save_strategy in ("steps", "SaveStrategy.STEPS") or str(
            args.save_strategy).endswith("STEPS") else None
        if limit and every and self.observe_until / every > limit:
            log.warning("relex: save_total_limit=%d keeps only the last %d checkpoints, but "
                        "relex needs all %d up to step %d; raise save_total_limit", limit, limit,
                        self.observe_until // every, self.observe_until)

    # ------------------------------------------------------------------ accelerate
    def on_step_end(self, args, state, control, **kwargs):
        if self._disabled:
            return
        if self.mode == "accelerate":
            control.should_log = True  # the guard needs this step's reward, in on_log
        if self.mode == "stop" and state.global_step == self.observe_until:
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.mode != "accelerate" or self._disabled or self.accelerator is None:
            return
        step = state.global_step
        if step == self.accelerator.last_step or (logs and any(k.startswith("eval_")
                                                               for k in logs)):
            return  # an evaluation log, or this step was already seen
        reward = (logs or {}).get("reward")
        acc = self.accelerator
        n_jumps, n_skipped = len(acc.jumps), len(acc.skipped)
        rolled = sum(j.rolled_back for j in acc.jumps)
        jump = acc.step(step, reward=reward, optimizer=self.optimizer)  # never raises
        if acc.disabled is not None:
            self._disabled = True
            return
        entry = {"relex/skipped": 1} if len(acc.skipped) != n_skipped else {}
        if jump is not None or len(self.accelerator.jumps) != n_jumps:
            j = self.accelerator.jumps[-1]
            entry.update({"relex/jump": j.size, "relex/virtual_step": j.virtual_step,
                          "relex/explained_variance": j.explained_variance, "relex/r2": j.r2})
            if j.score_after is not None:
                entry.update({"relex/score_before": j.score_before,
                              "relex/score_after": j.score_after})
        if sum(j.rolled_back for j in self.accelerator.jumps) != rolled:
            entry.update({"relex/rollback": 1, "relex/next_jump": self.accelerator.jump})
        if acc.auto is not None and acc.decisions and acc.decisions[-1][0] == step:
            d = acc.decisions[-1][1]
            entry.update({"relex/next_jump": d.size, "relex/converged": int(acc.converged)})
            if d.horizon is not None:
                entry["relex/backtest_limit"] = d.horizon
        if acc.converged and self.stop_when_converged:
            control.should_training_stop = True  # the real steps not trained are the saving
        if entry:
            entry["relex/real_step"] = step
            _log_into_history(state, entry)
            if logs is not None:  # callbacks after this one (W&B, TensorBoard) see it too
                logs.update(entry)

    # ------------------------------------------------------------------ forecast / stop
    def on_train_end(self, args, state, control, **kwargs):
        if self.accelerator is not None:  # removes snapshot_dir files; keeps the records
            self.accelerator.close()

    def on_save(self, args, state, control, **kwargs):
        if self._disabled or self.mode == "accelerate":
            return
        step = state.global_step
        if self.mode == "stop":
            if step < self.observe_until or self.written is not None:
                return
            ok = self._guarded(self._stop, args, state) if state.is_world_process_zero else False
            if self._agree(ok):  # stop only once the targets are written; else train on
                control.should_training_stop = True
            else:
                self._disabled = True
                log.error("relex: stop mode wrote nothing at step %d; training continues",
                          step)
            return
        if state.is_world_process_zero:
            self._guarded(self._forecast, args, state)

    def _agree(self, ok: bool) -> bool:
        """Rank 0's `ok` on every rank (file work happens on rank 0 only; every rank must take
        the same decision), over relex's own gloo group with its timeout, never the training's
        group: a rank that does not hear rank 0 in time trains on, and so does rank 0."""
        if self._group is None:
            return ok
        try:
            return bool(self._group.gather(ok)[0])
        except RelexError as e:
            log.error("relex: stop mode: %s; training continues", e)
            return False

    def _guarded(self, fn, args, state) -> bool:
        """fn(args, state); True when it ran, False (logged) when it raised."""
        try:
            fn(args, state)
            return True
        except Exception as e:  # noqa: BLE001 -- never crash the user's run because of relex
            log.error("relex: %s at step %d: %s", self.mode, state.global_step, e)
            return False

    def _forecast(self, args, state) -> None:
        from relex.api import analyze
        from relex.checkpoints.discover import discover
        if len(discover(args.output_dir)) < 2:
            return  # a line needs two checkpoints
        out = Path(args.output_dir) / "relex-forecast"
        summary = analyze(args.output_dir, base=self.base, output=out, overwrite=True,
                                progress=False).summary
        bt = summary["backtest"]
        entry = {"relex/explained_variance": summary["finding1_explained_variance"][
                     "rank1_param_weighted_mean"],
                 "relex/r2": summary["finding2_linearity"]["r2_mean"],
                 "relex/verified_horizon": bt["verified_horizon_ratio"],
                 "relex/verified_up_to_step": bt["verified_up_to_step"]}
        if bt.get("estimated_limit_ratio") is not None:
            last = summary["observed_steps"][-1]
            entry["relex/predicted_limit_step"] = int(round(bt["estimated_limit_ratio"] * last))
        self.forecasts.append(dict(entry, step=state.global_step))
        _log_into_history(state, entry)

    def _stop(self, args, state) -> None:
        from relex.api import extrapolate
        from relex.checkpoints.discover import discover
        have = [s for s in discover(args.output_dir) if s <= self.observe_until]
        if args.save_total_limit and len(have) < self.observe_until / max(args.save_steps, 1):
            log.warning("relex: only %d checkpoints up to step %d are left (save_total_limit=%d "
                        "deleted the others); the fit uses what is there", len(have),
                        self.observe_until, args.save_total_limit)
        out = Path(self.output or Path(args.output_dir) / "relex-extrapolated")
        report = extrapolate(args.output_dir, base=self.base,
                                   observe_until=self.observe_until, targets=self.targets,
                                   output=out, overwrite=True, progress=False)
        self.written = out
        _log_into_history(state, {"relex/observed_until": self.observe_until,
                                  "relex/targets_written": len(report.targets)})
        log.info("relex: wrote %s and stopped training at step %d", ", ".join(
            str(p) for p in report.targets.values()), state.global_step)


def _log_into_history(state, entry: dict) -> None:
    """Merge into this step's training log_history entry (not an evaluation's relex ran at
    the same step), or add one for the step."""
    for row in reversed(state.log_history):
        if row.get("step") != state.global_step:
            break
        if not any(k.startswith("eval_") for k in row):
            row.update(entry)
            return
    state.log_history.append(dict(entry, step=state.global_step))
