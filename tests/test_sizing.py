"""jump="auto" (relex/loop/sizing.py): the sizing rule on synthetic trajectories, the
slow-decline guard, the stop signal, and the same decisions on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import relex
from relex import Accelerator
from relex.loop.sizing import AutoJump, Decline

TESTS = Path(__file__).parent


class Line(torch.nn.Module):
    """One weight that the 'training' below moves by hand: a known trajectory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 32))


def drive(acc, model, steps, move, reward, start=1):
    """Add move(step) to the weight after each step (the update an optimizer would make from
    the current weights, jumped or not) and report reward(step, weights)."""
    for s in range(start, start + steps):
        with torch.no_grad():
            model.w.add_(move(s))
        acc.step(s, reward=reward(s, model.w))


def test_a_straight_line_grows_the_jump_to_the_cap():
    """A straight line's backtest holds at every horizon (no limit in sight): the first jump is
    already the cap, and confirmed jumps keep it there."""
    model = Line()
    v = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 1e-3
    acc = Accelerator(model, cycle=10, every=2, jump="auto", max_jump=60, guard_steps=2,
                      verbose=False)
    # the reward follows the position along v: a jump ahead is a reward ahead (confirmed)
    drive(acc, model, 100, lambda s: v, lambda s, w: float((w * v).sum() / (v * v).sum()) / 1e3)
    sizes = [d.size for _, d in acc.decisions]
    assert sizes == [60] * 10, sizes
    assert "first jump:" in acc.decisions[0][1].reason
    assert all(not j.rolled_back for j in acc.jumps)


def test_the_first_jump_is_the_backtest_reach_or_half_the_cap():
    """No small default: the first jump goes as far as the first cycle's backtest reaches
    ((R - 1) x the cycle, to a multiple of every), and at least half of max_jump (default 6
    cycles), also when the cycle is too short to backtest; never past max_jump."""
    assert AutoJump(cycle=20, every=2, max_jump=60).decide(3.25, None, None).size == 44
    assert AutoJump(cycle=20, every=2, max_jump=160).decide(3.25, None, None).size == 80
    assert AutoJump(cycle=20, every=2, max_jump=60).decide(None, None, None).size == 30
    assert AutoJump(cycle=20, every=2, max_jump=30).decide(9.0, None, None).size == 30
    rule = AutoJump(cycle=10, every=2)
    assert rule.max_jump == 60 and rule.decide(2.4, None, None).size == 30
    # a cycle whose own fit does not predict its last snapshots: no first jump at all
    assert AutoJump(cycle=10, every=2).decide(1.05, None, None).size == 0


def test_confirmed_jumps_double_until_a_setback_then_grow_by_growth():
    rule = AutoJump(cycle=20, every=2, max_jump=800)
    sizes = [rule.decide(3.0, None, None).size]  # half the cap: 400
    rule.size = 100  # from a smaller jump, to show the growth
    sizes += [rule.decide(30.0, True, 0.1).size for _ in range(2)]  # x2 while all goes well
    sizes += [rule.decide(30.0, False, 0.1).size]  # a jump that did not hold: halved
    sizes += [rule.decide(30.0, True, 0.1).size]  # from then on x1.5
    assert sizes == [400, 200, 400, 200, 300]
    rule = AutoJump(cycle=20, every=2, max_jump=160)
    sizes = [rule.decide(3.0, None, None).size, rule.decide(30.0, True, 0.1).size,
             rule.decide(2.5, True, 0.1).size]  # the backtest caps the grown jump
    assert sizes == [80, 160, 30]
    rule = AutoJump(cycle=20, every=2, max_jump=160)
    rule.decide(3.0, None, None)
    assert rule.slid() == 40  # a slide restored the best weights: halved, then x1.5
    assert rule.decide(30.0, True, 0.1).size == 60


def test_a_bend_keeps_the_jump_short():
    """The direction turns within each cycle: the cycle's backtest error grows fast with the
    horizon, and its limit caps the jump below what a straight line gets."""
    model = Line()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 64, 32, generator=g) * 1e-3
    acc = Accelerator(model, cycle=10, every=2, jump="auto", max_jump=60, guard_steps=2,
                      verbose=False)
    turn = lambda s: a * torch.cos(torch.tensor(s * 0.6)) + b * torch.sin(torch.tensor(s * 0.6))
    drive(acc, model, 100, turn, lambda s, w: 0.01 * s)
    capped = [d for _, d in acc.decisions if "limit" in d.reason]
    assert capped and max(d.size for _, d in acc.decisions) < 60
    assert all(d.horizon is not None and d.horizon < 7 for d in capped)


def test_noise_does_not_make_it_oscillate():
    """A reward gain that crosses the flat threshold every other cycle is noise, not a
    plateau: the jump keeps growing (a plateau needs two flat cycle ends in a row)."""
    rule = AutoJump(cycle=20, every=2, max_jump=160)
    sizes = [rule.decide(2.0, None, None).size]
    sizes += [rule.decide(10.0, True, gain).size for gain in [0.03, 0.002, 0.03, 0.002] * 3]
    assert sizes[0] == 80 and sizes == sorted(sizes) and sizes[-1] == 160
    rule = AutoJump(cycle=20, every=2, max_jump=80)
    sizes = [rule.decide(10.0, None, gain).size for gain in [None, 0.002, 0.002, 0.002, 0.002]]
    assert sizes == [80, 80, 40, 20, 10]  # a real plateau halves it


def test_the_stop_signal():
    """A flat reward shrinks the jumps to nothing; then relex says the run has converged."""
    model = Line()
    v = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) * 1e-3
    acc = Accelerator(model, cycle=6, every=2, jump="auto", guard_steps=2, verbose=False)
    drive(acc, model, 90, lambda s: v, lambda s, w: 0.5)
    assert acc.converged and acc.decisions[-1][1].size == 0
    assert "flat" in acc.decisions[-1][1].reason
    steps = [j.real_step for j in acc.jumps]
    assert steps and max(steps) < 90  # no jump once converged


def test_a_slow_decline_is_rolled_back_to_the_best_state_bit_for_bit():
    """Each cycle's reward is 0.01 below the last (each drop well inside the jump guard's 0.05
    margin); once two cycle ends in a row lie more than 0.05 below the best, the weights of the
    best cycle's end come back exactly, and the next jumps halve."""
    model = Line()
    v = torch.randn(64, 32, generator=torch.Generator().manual_seed(4)) * 1e-3
    acc = Accelerator(model, cycle=6, every=2, jump="auto", guard_steps=2, verbose=False)
    seen = {}

    def reward(s, w):
        seen[s] = w.detach().clone()
        return 0.9 - 0.01 * (s // 6)

    drive(acc, model, 60, lambda s: v, reward)
    back = [(s, why) for s, why in acc.skipped if "best weights restored" in why]
    assert len(back) >= 1
    step = back[0][0]
    assert step == 6 * 8  # best at the first cycle end; 0.06 below it at the 7th and 8th
    best = acc.store.best_of("w")
    assert torch.equal(best, seen[6].reshape(-1))  # kept at the best cycle's end, before its jump
    rule = Decline(margin=0.05)
    assert [rule.observe(0.9 - 0.01 * c) for c in range(9)] == [
        "best", "ok", "ok", "ok", "ok", "ok", "ok", "restore", "ok"]


def test_held_out_scores_drive_auto_instead_of_the_reward():
    """With eval_fn, jump="auto" reads the held-out score: a score that keeps rising confirms
    the jumps (they grow) although the training reward is flat, which alone would shrink them
    to nothing; a score that slides restores the best weights."""
    v = torch.randn(64, 32, generator=torch.Generator().manual_seed(6)) * 1e-3
    model = Line()
    rising = iter([0.1 * k for k in range(1, 100)])
    acc = Accelerator(model, cycle=10, every=2, jump="auto", max_jump=60, guard_steps=2,
                      verbose=False, eval_fn=lambda: next(rising))
    drive(acc, model, 60, lambda s: v, lambda s, w: 0.5)
    assert all(j.score_after > j.score_before for j in acc.jumps)
    assert [d.size for _, d in acc.decisions] == [60] * 6 and not acc.converged
    assert all("confirmed" in d.reason for _, d in acc.decisions[1:])
    flat = Line()
    control = Accelerator(flat, cycle=10, every=2, jump="auto", max_jump=60, guard_steps=2,
                          verbose=False)
    drive(control, flat, 60, lambda s: v, lambda s, w: 0.5)
    assert control.decisions[-1][1].size < 60
    assert any("flat" in d.reason for _, d in control.decisions)

    model = Line()
    sliding = iter([0.9 - 0.02 * k for k in range(100)])  # each call lower than the last
    acc = Accelerator(model, cycle=6, every=2, jump="auto", guard_steps=2, verbose=False,
                      guard_margin=0.05, eval_fn=lambda: next(sliding))
    drive(acc, model, 48, lambda s: v, lambda s, w: 0.5)
    assert any("best weights restored" in why for _, why in acc.skipped)


def test_a_failing_eval_fn_does_not_mix_scales():
    """eval_fn scores about 0.6, then fails once; the training reward that replaces it sits
    near 0.2 and rises. The best state and the last cycle's mean were scores: forgotten, so
    the reward is not taken for a slide below them (no restore loop)."""
    v = torch.randn(64, 32, generator=torch.Generator().manual_seed(6)) * 1e-3
    model, calls = Line(), [0]

    def held_out():
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("CUDA out of memory")
        return 0.6 + 0.01 * calls[0]
    acc = Accelerator(model, cycle=10, every=2, jump="auto", guard_steps=2, verbose=False,
                      eval_fn=held_out)
    drive(acc, model, 120, lambda s: v, lambda s, w: 0.2 + 0.001 * s)
    assert acc.eval_fn is None and calls[0] == 4
    assert not any("best weights restored" in why for _, why in acc.skipped)
    assert acc.auto.decline.best < 0.4  # a reward now, not a score


def test_the_weights_after_a_restore_are_the_best_state(monkeypatch):
    model = Line()
    v = torch.randn(64, 32, generator=torch.Generator().manual_seed(5)) * 1e-3
    acc = Accelerator(model, cycle=6, every=2, jump="auto", guard_steps=2, verbose=False)
    after = {}
    original = acc.auto._restore_best

    def spy(a, parts):
        original(a, parts)
        after["w"] = model.w.detach().clone()

    monkeypatch.setattr(acc.auto, "_restore_best", spy)
    drive(acc, model, 48, lambda s: v, lambda s, w: 0.9 - 0.01 * (s // 6))
    assert torch.equal(after["w"].reshape(-1), acc.store.best_of("w"))


def test_every_rank_decides_alike_with_different_shards_and_rewards(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", RELEX_LOOP_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(Path(relex.__file__).parents[1])]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(TESTS / "auto_run.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["disabled"] is None and r1["disabled"] is None
    assert len(r0["decisions"]) == 6 and r0["decisions"] == r1["decisions"]
    assert [(j["real_step"], j["size"]) for j in r0["jumps"]] == \
        [(j["real_step"], j["size"]) for j in r1["jumps"]]


def test_auto_defaults_to_a_cycle_of_10():
    """jump="auto" runs cycles of 10 steps unless told (fixed jumps keep 20); max_jump 6 cycles."""
    acc = Accelerator(torch.nn.Linear(2, 2), jump="auto", verbose=False)
    assert acc.cycle == 10 and acc.auto.sizer.max_jump == 60
    assert Accelerator(torch.nn.Linear(2, 2), jump=40, verbose=False).cycle == 20
    assert Accelerator(torch.nn.Linear(2, 2), jump="auto", cycle=20, verbose=False).cycle == 20
