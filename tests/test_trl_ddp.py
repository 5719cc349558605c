"""RelexCallback(mode="accelerate") in a real trl.GRPOTrainer under DDP: 2 CPU ranks, gloo.

torchrun starts two processes; each builds the trainer of test_trl.py (demo base, char
tokenizer, exact-match reward) with `ddp_backend="gloo"` and trains two 8-step runs: cycle 4 /
jump 8 ("jump": jumps at steps 4 and 8), and cycle 2 / jump 8 with a guard that always rolls back
("rollback": a negative margin; jumps at 2, 5, 8, the first two restored one step later). Each
rank writes, per step, a SHA-256 of all its weights at step end and right after RelexCallback's
on_log (so after any jump or rollback), plus its jump records and the reward the guard saw.
The replicas must agree bit for bit at every step. About 30 s on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("torch.distributed")

import relex

SCRIPT = r"""
import hashlib, json, os, sys
from pathlib import Path
import torch
from transformers import TrainerCallback
from test_trl import trainer
from relex.integrations.trl import RelexCallback

torch.set_num_threads(1)
out = Path(sys.argv[1])


def digest(model):
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Hashes(TrainerCallback):
    # registered after RelexCallback: on_step_end sees the trained weights, on_log the weights
    # relex left (jumped or rolled back)
    def __init__(self):
        self.before, self.after, self.rewards = {}, {}, {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.before[state.global_step] = digest(model)

    def on_log(self, args, state, control, model=None, logs=None, **kw):
        if state.global_step not in self.after:  # not the end-of-training summary log
            self.after[state.global_step] = digest(model)
            self.rewards[state.global_step] = (logs or {}).get("reward")


RUNS = {"jump": dict(cycle=4, jump=8, every=2),
        "rollback": dict(cycle=2, jump=8, every=1, guard_steps=1, guard_margin=-1.0)}
for name, kw in RUNS.items():
    cb, rec = RelexCallback(mode="accelerate", **kw), Hashes()
    t = trainer(out / name, 8, [cb, rec], prompts=2, group=4, ddp_backend="gloo")
    start = digest(t.model)
    t.train()
    (out / f"{name}-rank{os.environ['RANK']}.json").write_text(json.dumps({
        "world_size": t.args.world_size, "parallel_mode": str(t.args.parallel_mode),
        "ddp": type(t.model_wrapped).__name__, "global_step": t.state.global_step,
        "start": start, "before": rec.before, "after": rec.after, "rewards": rec.rewards,
        "final": digest(t.model), "jumps": [j.as_dict() for j in cb.accelerator.jumps],
        "disabled": cb._disabled}))
"""


def test_grpo_ddp_ranks_jump_identically(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    tests = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(tests), str(Path(relex.__file__).parents[1])]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = {"jump": [(4, 8, False), (8, 8, False)],  # (real step, size, rolled back)
                "rollback": [(2, 8, True), (5, 4, True), (8, 2, False)]}
    for name, jumps in expected.items():
        r0, r1 = (json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1))
        for r in (r0, r1):  # really DDP, really trained to the end, relex never disabled itself
            assert r["world_size"] == 2 and "DISTRIBUTED" in r["parallel_mode"]
            assert r["ddp"] == "DistributedDataParallel"
            assert r["global_step"] == 8 and not r["disabled"]
            assert [(j["real_step"], j["size"], j["rolled_back"]) for j in r["jumps"]] == jumps
            for j in r["jumps"]:  # the jump really moved the weights
                assert r["before"][str(j["real_step"])] != r["after"][str(j["real_step"])]
            assert all(r["rewards"][str(s)] is not None for s in range(1, 9)), name
        assert [dict(j, seconds=0) for j in r0["jumps"]] == \
            [dict(j, seconds=0) for j in r1["jumps"]], name
        assert r0["rewards"] == r1["rewards"], "the guard sees the same (gathered) reward"
        assert r0["start"] == r1["start"]
        assert r0["before"] == r1["before"], f"{name}: replicas diverged in training"
        assert r0["after"] == r1["after"], f"{name}: replicas diverged at a jump / rollback"
        assert r0["final"] == r1["final"] != r0["start"]
    # a rollback restores the pre-jump weights bit for bit, on both ranks
    r0 = json.loads((tmp_path / "rollback-rank0.json").read_text())
    assert r0["after"]["3"] == r0["before"]["2"] and r0["after"]["6"] == r0["before"]["5"]
