"""relex's verl trainer mode (relex.integrations.verl) with the real verl 0.9 package.

verl does not train on a CPU (its resource pool asks Ray for GPUs, its rollouts are vLLM /
SGLang), so these tests take the parts that do run: the plugin is registered by verl's own
entry-point loading and its trainer is built from verl's PPOTrainerSync; its on_step_end runs the
jump on every worker (through verl's Worker.execute_with_func_generator) before verl's weight
sync, so the rollout receives the jumped weights; a failure disables relex, not the run; FSDP1
is refused before training; and the worker-side jump on 2 gloo processes with FSDP2 equals the
float64 reference (tests/sharded_run.py with RELEX_VIA_VERL=1). The full verl run is in
benchmarks/gpu_check.sh. verl pins its own transformers, so this file runs in its own
environment: `make test-verl` (.venv-verl from requirements-verl.lock); elsewhere it is skipped.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl.trainer.ppo.v1.trainer_sync",
                    reason="verl 0.9 is not installed here (make test-verl)")
from omegaconf import OmegaConf  # noqa: E402  (installed with verl)
from verl.single_controller.base import Worker  # noqa: E402
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402

from relex.errors import RelexError  # noqa: E402
from relex.integrations import verl as plugin  # noqa: E402


def test_verl_loads_the_plugin_by_its_entry_point():
    code = ("import verl\n"  # nothing imports relex here: verl's entry-point loading must
            "from verl.trainer.ppo.v1.trainer_base import get_trainer_cls\n"
            "from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync\n"
            "cls = get_trainer_cls('relex')\n"
            "print(cls.__module__, issubclass(cls, PPOTrainerSync))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[-2:] == ["relex.integrations.verl", "True"]


def test_options_are_checked():
    assert plugin.options(OmegaConf.create({"relex": {"cycle": "20", "jump": 40}})) == \
        {"cycle": 20, "jump": 40}
    assert plugin.options(OmegaConf.create({"trainer": {}})) == {}
    with pytest.raises(RelexError, match=r"relex\.cycel: not an option"):
        plugin.options({"relex": {"cycel": 20}})
    with pytest.raises(RelexError, match=r"relex\.jump='far': expected int"):
        plugin.options({"relex": {"jump": "far"}})


class Group:
    """verl's RayWorkerGroup.execute_all_sync without Ray: the named method on every worker."""

    def __init__(self, workers, fail=False):
        self.workers, self.fail, self.calls = workers, fail, []

    def execute_all_sync(self, method, *args):
        self.calls.append(args[0].__name__)
        if self.fail:
            raise RuntimeError("worker died")
        return [getattr(w, method)(*args) for w in self.workers]


class Sync:
    """verl's checkpoint manager: update_weights pushes the actor's weights to the rollout."""

    def __init__(self, model):
        self.model, self.pushed = model, {}

    def update_weights(self, step):
        self.pushed[step] = self.model.weight.detach().clone()


def trainer(monkeypatch, strategy="fsdp2", fail=False, **relex):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    worker = Worker()
    worker.actor = type("Actor", (), {})()
    worker.actor.engine = type("Engine", (), {"module": model, "optimizer": opt})()
    t = object.__new__(plugin.RelexTrainer)  # verl's __init__ needs Ray and GPUs
    t.config = OmegaConf.create({"actor_rollout_ref": {"actor": {"strategy": strategy}},
                                 "trainer": {"critic_warmup": 0},
                                 "relex": relex})
    t.actor_rollout_wg = Group([worker], fail)
    t.checkpoint_manager = Sync(model)
    t.timing_raw = {}
    t.global_steps = 1
    return t, model, opt


def train(t, model, opt, steps, direction):
    history = [model.weight.detach().double().clone()]
    for step in range(1, steps + 1):
        t.global_steps = step
        opt.zero_grad()
        (model.weight * direction).sum().backward()  # a constant gradient: a straight line
        opt.step()
        history.append(model.weight.detach().double().clone())
        t._relex_batch = None
        t.on_step_end()
        metrics = t._consume_sync_metrics()
        yield step, history, metrics


def test_on_step_end_jumps_before_verl_pushes_the_weights(monkeypatch):
    t, model, opt = trainer(monkeypatch, cycle=4, every=2, jump=8, snapshot_dtype="float32")
    t.on_train_begin()
    direction = torch.randn(5, 6)
    for step, history, metrics in train(t, model, opt, 4, direction):
        assert metrics.get("relex/virtual_step") == step + (8 if step == 4 else 0)
    # the float64 reference: SVD of the deltas at steps 2 and 4, a line through their coefficient
    base = history[0].numpy().ravel()
    d = np.stack([(history[s].numpy().ravel() - base) for s in (2, 4)])
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    coef = np.polyfit([2.0, 4.0], d @ vt[0], 1)
    ref = base + np.polyval(coef, 12.0) * vt[0]
    pushed = t.checkpoint_manager.pushed[4].double().numpy().ravel()  # what the rollout got
    assert np.abs(pushed - ref).max() <= 4 * np.spacing(np.float32(np.abs(ref).max()))
    assert not np.allclose(pushed, history[4].numpy().ravel()), "the jump moved the weights"
    assert metrics["relex/jumped"] == 1 and metrics["relex/explained_variance"] > 0.999
    assert t.actor_rollout_wg.calls == ["worker_start"] + ["worker_step"] * 4


def test_the_last_step_closes_relex_and_warmup_steps_are_not_observed(monkeypatch, tmp_path):
    t, model, opt = trainer(monkeypatch, cycle=4, every=2, jump=8, snapshot_dir=str(tmp_path))
    t.config.trainer = {"critic_warmup": 3}  # the actor is first updated at step 3
    t.total_training_steps = 5
    t.on_train_begin()
    worker = t.actor_rollout_wg.workers[0]
    assert worker._relex.start == 2
    for step, _, metrics in train(t, model, opt, 5, torch.randn(5, 6)):
        assert metrics["relex/jumped"] == 0, "steps 3-6 make the first cycle: no jump by 5"
    assert t.actor_rollout_wg.calls[-1] == "worker_close"
    assert worker._relex.disabled == "closed" and list(tmp_path.iterdir()) == []


def test_a_failure_disables_relex_not_the_run(monkeypatch):
    t, model, opt = trainer(monkeypatch, cycle=4, every=2, jump=8)
    t.on_train_begin()
    t.actor_rollout_wg.fail = True
    for step, _, metrics in train(t, model, opt, 3, torch.ones(5, 6)):
        assert step in t.checkpoint_manager.pushed, "verl's weight sync still runs"
        assert metrics == {}
    assert t.actor_rollout_wg.calls == ["worker_start", "worker_step", "worker_close"], \
        "tried once, then off"


def test_refused_before_training(monkeypatch):
    t, *_ = trainer(monkeypatch, strategy="fsdp")
    with pytest.raises(RelexError, match="strategy=fsdp: relex jumps FSDP2 shards only"):
        t.on_train_begin()
    t, *_ = trainer(monkeypatch, cycle=3, every=2)
    with pytest.raises(RelexError, match="cycle 3, every 2"):
        t.on_train_begin()


def test_mean_score_is_verls_score_mean(monkeypatch):
    import transfer_queue as tq
    from tensordict import TensorDict

    scores = [torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 0.5]), torch.tensor([9.0])]
    got = TensorDict({"rm_scores": torch.nested.as_nested_tensor(scores, layout=torch.jagged)},
                     batch_size=[3])
    monkeypatch.setattr(tq, "kv_batch_get", lambda **kw: got, raising=False)
    batch = type("Batch", (), {"keys": [0, 1, 2], "partition_id": "train",
                               "tags": [{}, {}, {"is_padding": True}]})()
    assert plugin.mean_score(batch) == pytest.approx(0.75)  # (1 + 0.5) / 2; padding left out
    monkeypatch.setattr(tq, "kv_batch_get", lambda **kw: 1 / 0, raising=False)
    assert plugin.mean_score(batch) is None


def test_worker_jump_on_fsdp2_shards(tmp_path, monkeypatch):
    from test_accelerate_sharded import check, run
    monkeypatch.setenv("RELEX_VIA_VERL", "1")
    check(run("fsdp2", tmp_path), "fsdp2")


def test_is_verls_sync_trainer():
    assert issubclass(plugin.RelexTrainer, PPOTrainerSync)
