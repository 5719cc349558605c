"""relex inside a verl run: a trainer mode that jumps the actor's FSDP2 shards in the loop.

verl 0.9 selects its trainer by name (`trainer.v1.trainer_mode`) from a registry that plugins
fill: installing relex in verl's environment registers the mode "relex" through the
`verl.plugins` entry point, no fork of verl. The mode is verl's synchronous trainer plus, at the
end of every step and before verl pushes the actor's weights to vLLM/SGLang, one call on every
actor worker: `relex.Accelerator.step` on the worker's FSDP2 engine (its `.module` holds the fp32
master shards, its `.optimizer` the AdamW state that survives each jump). The guard reads the
step's mean sequence score (verl's `critic/score/mean`).

    python -m verl.trainer.main_ppo ... actor_rollout_ref.actor.strategy=fsdp2 \\
        trainer.v1.trainer_mode=relex +relex.cycle=20 +relex.jump=40

Options under `relex.` are the Accelerator's: cycle, jump, every, method, rank, guard_steps,
guard_margin, snapshot_dtype, snapshot_dir, timeout. FSDP1 (`strategy=fsdp`) and Megatron
actors are refused before training; a failure during training disables relex, not the run.
"""

from __future__ import annotations

import logging

from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from relex.errors import RelexError
from relex.options import LoopOptions

log = logging.getLogger("relex.verl")

def options(config) -> dict:
    """The `relex.` section of a verl config as Accelerator keyword arguments (checked against
    relex.options.LoopOptions, the one declaration of the loop's options)."""
    section = config.get("relex", None) if config is not None else None
    return LoopOptions.typed(dict(section or {}), "relex")


def refusal(actor_config) -> str | None:
    """Why relex cannot jump this actor (None when it can), decided from verl's config."""
    strategy = str(actor_config.get("strategy", "fsdp"))
    if strategy != "fsdp2":
        return (f"actor_rollout_ref.actor.strategy={strategy}: relex jumps FSDP2 shards only; "
                f"set actor_rollout_ref.actor.strategy=fsdp2")
    return None


# --- run on every actor worker (verl's execute_with_func_generator passes the worker first) ---
def worker_start(worker, start_step: int, kwargs: dict) -> str | None:
    """Create this worker's Accelerator on its engine; the error line if it cannot."""
    from relex.loop.accelerator import Accelerator
    try:
        engine = worker.actor.engine
        worker._relex = Accelerator(engine.module, optimizer=engine.optimizer,
                                    start_step=start_step, **kwargs)
    except RelexError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- reported as one line by the trainer
        return f"{type(e).__name__}: {e}"
    return None


def worker_step(worker, step: int, reward: float | None) -> dict | None:
    """One Accelerator step on this worker; what the trainer logs (None when relex is off)."""
    acc = getattr(worker, "_relex", None)
    if acc is None:
        return None
    jump = acc.step(step, reward=reward)  # never raises: failures disable relex, not the run
    return {"jumped": jump is not None, "virtual_step": acc.virtual_step,
            "rolled_back": sum(j.rolled_back for j in acc.jumps),
            "skipped": len(acc.skipped), "disabled": acc.disabled,
            "explained_variance": jump.explained_variance if jump else None,
            "jump_seconds": jump.seconds if jump else None}


def worker_close(worker) -> None:
    """Remove this worker's snapshot_dir files; relex stops jumping on it."""
    acc = getattr(worker, "_relex", None)
    if acc is not None:
        acc.close()


def metrics(results: list) -> dict:
    """The workers' step results as verl metrics (`relex/...`): the first worker's (the
    decisions are shared), and disabled when any worker is."""
    first = next((r for r in results if r is not None), None)
    if first is None:
        return {}
    out = {"relex/virtual_step": first["virtual_step"], "relex/jumped": int(first["jumped"]),
           "relex/rolled_back": first["rolled_back"], "relex/skipped": first["skipped"],
           # any worker: one that left relex would leave the others waiting at the next jump
           "relex/disabled": int(any(r is None or r["disabled"] is not None for r in results))}
    if first["explained_variance"] is not None:
        out["relex/explained_variance"] = first["explained_variance"]
        out["relex/jump_seconds"] = max(r["jump_seconds"] or 0.0 for r in results if r)
    return out


def mean_score(batch) -> float | None:
    """Mean over the step's real (non-padding) sequences of the summed token scores: verl's
    `critic/score/mean`. None when TransferQueue cannot give them (the guard then waits)."""
    try:
        import numpy as np
        import transfer_queue as tq
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["rm_scores"]).to_padded_tensor()
        scores = data["rm_scores"].float().sum(-1).cpu().numpy()
        real = np.array([not tag.get("is_padding", False) for tag in batch.tags], dtype=bool)
        if real.any():
            scores = scores[real]
        return float(scores.mean()) if scores.size else None
    except Exception as e:  # noqa: BLE001 -- a missing score never stops training
        log.warning("relex: no reward for the guard this step (%s)", e)
        return None


@register_trainer("relex")
class RelexTrainer(PPOTrainerSync):
    """verl's synchronous PPO/GRPO trainer with relex's in-loop jumps on the actor."""

    def on_train_begin(self):
        super().on_train_begin()
        self._relex_options = options(self.config)
        why = refusal(self.config.actor_rollout_ref.actor)
        if why is None:
            # verl's fit() has already advanced global_steps to the first step it will take;
            # the actor is first updated at step critic_warmup
            warmup = int((self.config.get("trainer") or {}).get("critic_warmup", 0) or 0)
            start = max(self.global_steps - 1, warmup - 1)
            errors = self.actor_rollout_wg.execute_all_sync(
                "execute_with_func_generator", worker_start, start, self._relex_options)
            why = next((e for e in errors if e), None)
        if why is not None:
            raise RelexError(f"relex's verl mode: {why}")
        self._relex_on = self._relex_started = True
        self._relex_batch = None

    def step(self, metrics: dict, timing_raw: dict):
        batch = super().step(metrics, timing_raw)
        self._relex_batch = batch
        return batch

    def on_step_end(self):
        # before super(): verl's weight sync then pushes the jumped weights to the rollout
        if getattr(self, "_relex_on", False):
            try:
                reward = mean_score(self._relex_batch) if self._relex_batch is not None else None
                results = self.actor_rollout_wg.execute_all_sync(
                    "execute_with_func_generator", worker_step, self.global_steps, reward)
                got = metrics(results)
                if got.get("relex/disabled"):
                    self._relex_on = False
                pending = getattr(self, "_pending_sync_metrics", None) or {}
                self._pending_sync_metrics = {**pending, **got}
            except Exception as e:  # noqa: BLE001 -- relex must not be the reason a run crashes
                log.warning("relex: disabled at step %d (%s: %s); training goes on",
                            self.global_steps, type(e).__name__, e)
                self._relex_on = False
            last = self.global_steps >= (getattr(self, "total_training_steps", None) or 1 << 62)
            if not self._relex_on or last:  # verl's fit returns at the last step: close here
                self._relex_close()
        super().on_step_end()

    def on_train_end(self):
        self._relex_close()
        super().on_train_end()

    def _relex_close(self) -> None:
        if getattr(self, "_relex_started", False):
            self._relex_started = self._relex_on = False
            try:
                self.actor_rollout_wg.execute_all_sync("execute_with_func_generator",
                                                       worker_close)
            except Exception as e:  # noqa: BLE001 -- cleanup only
                log.warning("relex: could not remove snapshot files (%s)", e)
