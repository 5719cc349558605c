"""The Accelerator under sharded training, with the real libraries on 2 CPU processes (gloo):
FSDP2 (`fully_shard`, bf16 MixedPrecisionPolicy, Adam; HSDP on a (2, 1) mesh) and DeepSpeed
ZeRO-2 / ZeRO-3 (`deepspeed.initialize` on the CPU accelerator, bf16, fp32 masters).

tests/sharded_run.py trains a tiny Llama on two ranks through four cycles (see its docstring)
and saves gathered tensors; here they are checked against an independent float64 reference:
after a jump the gathered fp32 masters equal the textbook RELEX extrapolation (SVD + lstsq) of
the gathered snapshots within 1 float32 ulp; the 16-bit weights the next forward uses are the
new masters rounded; Adam's state tensors and step counts survive; the guard's rollback
restores the pre-jump masters bit for bit; a rank's failure or NaN skips the jump on both ranks;
both ranks end with the same model. About 10 s per layout.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import relex

pytest.importorskip("torch.distributed.fsdp")
CYCLE, JUMP = 6, 12
TESTS = Path(__file__).parent


def run(layout: str, out: Path, *extra: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", RELEX_LOOP_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(Path(relex.__file__).parents[1])]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(TESTS / "sharded_run.py"), layout,
                           str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def textbook(base, snaps, steps, target):
    """Rank-1 RELEX in float64: SVD of the deltas, least-squares line of the coefficient."""
    d = np.stack([(s - base).ravel() for s in snaps])
    if not np.abs(d).max():
        return base.copy()
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    a = np.stack([np.asarray(steps, float), np.ones(len(steps))], axis=1)
    coef, *_ = np.linalg.lstsq(a, d @ vt[0], rcond=None)
    return (base.ravel() + (coef[0] * target + coef[1]) * vt[0]).reshape(base.shape)


def within_ulp(got: torch.Tensor, ref: np.ndarray, base: np.ndarray, ulps: float = 1.0):
    """|got - ref| <= ulps float32 ulps at the operands' magnitude: max(|theta_S|, |theta_0|,
    |theta_S - theta_0|), the project's bound (docs/how-it-works.md, Correctness)."""
    scale = np.maximum.reduce([np.abs(ref), np.abs(base), np.abs(ref - base)]).astype(np.float32)
    return np.all(np.abs(got.double().numpy() - ref) <= ulps * np.spacing(scale))


def check(ranks: list[dict], kind: str, dtype: str = "float32") -> None:
    r0, r1 = ranks
    assert r0["kind"] == r1["kind"] == kind
    for r in ranks:  # A kept, B rolled back, C and D skipped on both ranks, never disabled
        assert [(j["real_step"], j["size"], j["rolled_back"]) for j in r["jumps"]] == \
            [(CYCLE, JUMP, False), (2 * CYCLE, JUMP, True)]
        assert [s for s, _ in r["skipped"]] == [3 * CYCLE + 1, 4 * CYCLE + 1]
        assert r["disabled"] is None
        assert "NaN/Inf in parameter" in r["skipped"][1][1]
    assert "rank 1:" in r0["skipped"][0][1], "rank 0 names the rank that failed"
    masters = r0["masters"]
    after = r0["after"][CYCLE]
    moved = 0
    for name, got in after.items():  # jump A against the float64 reference
        base = masters[0][name].double().numpy()
        ref = textbook(base, [masters[s][name].double().numpy() for s in (2, 4, 6)],
                       [2, 4, 6], CYCLE + JUMP)
        if dtype == "float32":
            assert within_ulp(got, ref, base), name
        else:  # scaled float16 deltas: within 2^-9 of the jump's largest move
            assert np.abs(got.double().numpy() - ref).max() <= \
                2.0 ** -9 * np.abs(ref - base).max() + np.spacing(np.float32(np.abs(ref).max()))
        moved += not torch.equal(got, masters[CYCLE][name])
    assert moved >= len(after) - 1, "every trained parameter jumped (extra never moves)"
    for step, weights in r0["forward"].items():  # the forward sees the new masters
        for name, w16 in weights.items():
            assert w16.dtype == torch.bfloat16 and torch.equal(
                w16, r0["after"][step][name].to(torch.bfloat16)), (step, name)
    before, now = r0["opt"][CYCLE]  # Adam state objects and step counts survive the jump
    assert now and before == now and {s for _, s in now.values()} == {CYCLE}
    restored = r0["after"][2 * CYCLE + 1]  # the rollback: pre-jump masters, bit for bit
    assert all(torch.equal(restored[n], masters[2 * CYCLE][n]) for n in restored)
    assert not all(torch.equal(r0["after"][2 * CYCLE][n], masters[2 * CYCLE][n])
                   for n in restored), "jump B had moved the weights"
    for step in r0["masters"]:  # both ranks hold the same full model at every step
        assert all(torch.equal(r0["masters"][step][n], r1["masters"][step][n])
                   for n in masters[0]), step


def test_fsdp2(tmp_path):
    ranks = run("fsdp2", tmp_path)
    check(ranks, "fsdp2")
    assert "MemoryError: simulated" in ranks[0]["skipped"][0][1], "rank 1's own failure, shared"


def test_hsdp(tmp_path):  # (2, 1) mesh: replicated dim only; the fit is scale-invariant
    check(run("hsdp", tmp_path, "float16"), "fsdp2", "float16")


def test_deepspeed_zero2_with_spilled_snapshots(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = run("zero2", tmp_path, "float32", "spill")
    check(ranks, "deepspeed-zero1/2")
    files = ranks[0]["pre_jump_files"]  # the pre-jump copy goes to the directory, and away
    assert files[CYCLE] == files[2 * CYCLE] and len(files[CYCLE]) == 1
    assert re.fullmatch(r"snaps0/relex-rank0-\w+/pre/model.safetensors", files[CYCLE][0])
    assert files[2 * CYCLE + 1] == [] and ranks[0]["files_left"] == ranks[1]["files_left"] == []
    assert "No space left on device" in ranks[1]["skipped"][0][1]


def test_deepspeed_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    check(run("zero3", tmp_path), "deepspeed-zero3")


ZERO0 = """
import torch, deepspeed, relex
deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
deepspeed.init_distributed("gloo")
torch.manual_seed(0)
m = torch.nn.Linear(4, 3)
engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.Adam(m.parameters()), config={
    "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
    "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True})
try:
    relex.Accelerator(engine, cycle=4, jump=4)
except relex.RelexError as e:
    print("engine:", e)
acc = relex.Accelerator(engine.module, cycle=4, jump=4)  # the optimizer is not known yet
acc.step(1, optimizer=engine.optimizer)
print("module:", acc.disabled)
"""


def test_deepspeed_without_zero_is_refused(tmp_path):
    """Stage 0 keeps the fp32 masters inside DeepSpeed's FP16 optimizer: a jump into the
    module's weights would be undone by the next step."""
    pytest.importorskip("deepspeed")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29563", PYTHONPATH=str(Path(relex.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", ZERO0], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "engine: DeepSpeed without ZeRO (stage 0)" in out
    assert "module: DeepSpeed without ZeRO (stage 0)" in out
