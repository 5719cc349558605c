"""The in-loop Accelerator: jumps equal an independent float64 SVD + lstsq extrapolation of the
cycle, the optimizer state survives, the guard rolls back, bad input is refused."""

import gc

import numpy as np
import pytest
import torch

from relex import Accelerator, RelexError
from relex.loop.accelerator import Jump


class Toy(torch.nn.Module):
    """Two layers and a frozen buffer-like parameter: a small real model to train."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 3, bias=False)
        self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def train(model, opt, acc, steps, rewards=None, start=1):
    """Adam on a fixed regression task; records each step's parameters before any jump."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = torch.randn(64, 3, generator=g)
    history, events = {}, {}
    for step in range(start, start + steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history[step] = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        r = None if rewards is None else rewards(step)
        j = acc.step(step, reward=r, optimizer=opt)
        if j is not None:
            events[step] = j
    return history, events


def svd_lstsq(base, snaps, steps, target, rank=1):
    """Textbook RELEX for one tensor: SVD of the deltas, least-squares line per component."""
    d = np.stack([(s - base).ravel() for s in snaps])
    _, sv, vt = np.linalg.svd(d, full_matrices=False)
    out = base.ravel().copy()
    a = np.stack([np.asarray(steps, float), np.ones(len(steps))], axis=1)
    for i in range(min(rank, int((sv > 1e-6 * sv[0]).sum()))):
        coef, *_ = np.linalg.lstsq(a, d @ vt[i], rcond=None)
        out += (coef[0] * target + coef[1]) * vt[i]
    return out.reshape(base.shape)


def close_to(got, ref, base, dtype):
    """float32 snapshots: within float32 rounding of the reference. float16 (scaled deltas,
    11 significant bits): within 2^-9 of the jump's largest move."""
    tol = 1e-6 * max(1.0, np.abs(ref).max()) if dtype == "float32" else \
        2.0 ** -9 * np.abs(ref - base).max()
    return np.abs(got - ref).max() <= tol


@pytest.mark.parametrize("rank,dtype", [(1, "float32"), (2, "float32"), (1, "float16")])
def test_jump_equals_reference_and_optimizer_state_survives(rank, dtype):
    model = Toy()
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = {n: p.detach().double().clone() for n, p in params.items()}
    acc = Accelerator(model, cycle=10, jump=20, every=2, rank=rank, snapshot_dtype=dtype)
    history, events = train(model, opt, acc, 9)
    assert not events and acc.memory_bytes() > 0
    state_before = {id(p): {k: v for k, v in opt.state[p].items()} for p in model.parameters()
                    if p.requires_grad}
    ids = {n: id(p) for n, p in model.named_parameters()}
    history_10, events = train(model, opt, acc, 1, start=10)
    history.update(history_10)
    (j,) = events.values()
    assert isinstance(j, Jump) and (j.real_step, j.virtual_step, j.size) == (10, 30, 20)
    assert 0 < j.explained_variance <= 1 and j.r2 <= 1 and not j.rolled_back
    steps = [2, 4, 6, 8, 10]
    for name, p in params.items():
        if not p.requires_grad:
            assert torch.equal(p.double(), start[name]), "frozen parameters are not touched"
            continue
        ref = svd_lstsq(start[name].numpy(), [history[s][name].numpy() for s in steps], steps,
                        30, rank)
        got = p.detach().double().numpy()
        assert close_to(got, ref, start[name].numpy(), dtype), name
        assert not np.allclose(got, history[10][name].numpy()), "the jump moved the weights"
        assert id(dict(model.named_parameters())[name]) == ids[name], "jumped in place"
    for p in model.parameters():  # same state tensors, same step counts: Adam state survives
        if p.requires_grad:
            for k, v in state_before[id(p)].items():
                assert opt.state[p][k] is v
            assert int(opt.state[p]["step"]) == 10
    # the next cycle uses the jumped weights as its base: second jump at step 20, virtual 60
    jumped = {n: p.detach().double().clone() for n, p in params.items()}
    history, events = train(model, opt, acc, 10, start=11)
    assert list(events) == [20] and events[20].virtual_step == 60
    name = "a.weight"
    ref = svd_lstsq(jumped[name].numpy(), [history[s][name].numpy() for s in range(12, 21, 2)],
                    [2, 4, 6, 8, 10], 30, rank)
    assert close_to(params[name].detach().double().numpy(), ref, jumped[name].numpy(), dtype)
    assert [j.real_step for j in acc.jumps] == [10, 20] and acc.virtual_step == 60


def test_linear_weights_method_and_optimizer_reset():
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = model.a.bias.detach().double().clone()
    acc = Accelerator(model, cycle=6, jump=3, every=3, method="linear-weights",
                      reset_optimizer=True, snapshot_dtype="float32")
    history, events = train(model, opt, acc, 6)
    assert list(events) == [6]
    # per-parameter line through (3, theta_3), (6, theta_6) evaluated at 9 (the cycle start is
    # the base, not a fitted point)
    ref = 2 * history[6]["a.bias"] - history[3]["a.bias"]
    assert torch.allclose(model.a.bias.double(), ref, atol=1e-6)
    assert not torch.allclose(start, ref)
    assert len(opt.state) == 0, "reset_optimizer clears the Adam state"


def test_guard_rolls_back_and_halves_the_next_jump(caplog):
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = Accelerator(model, cycle=4, jump=8, every=2, guard_steps=2, guard_margin=0.05)
    # reward 0.8 before the first jump, 0.2 right after it (the jump hurt), then fine again
    rewards = {1: .8, 2: .8, 3: .8, 4: .8, 5: .2, 6: .2}
    history, events = train(model, opt, acc, 4, rewards=lambda s: rewards.get(s, .8))
    pre_jump = history[4]
    with caplog.at_level("WARNING", logger="relex.loop.accelerator"):
        history, _ = train(model, opt, acc, 2, rewards=lambda s: rewards.get(s, .8), start=5)
    j = acc.jumps[0]
    assert j.rolled_back and j.reward_before == pytest.approx(.8) and j.reward_after == \
        pytest.approx(.2)
    assert "rolled back" in caplog.text
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().double(), pre_jump[name]), "pre-jump weights restored"
    assert acc.jump == 4 and acc.virtual_step == 6
    # a new cycle starts at the rollback: next jump at 6 + 4 = 10, of the halved size, kept
    history, events = train(model, opt, acc, 6, rewards=lambda s: .8, start=7)
    assert list(events) == [10] and events[10].size == 4
    assert acc.jumps[1].reward_after == pytest.approx(.8) and not acc.jumps[1].rolled_back
    assert acc.virtual_step == 12 + 4


def test_guard_keeps_a_jump_when_reward_holds():
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = Accelerator(model, cycle=4, jump=8, guard_steps=2)
    train(model, opt, acc, 8, rewards=lambda s: 0.5 + 0.01 * s)
    assert not acc.jumps[0].rolled_back and acc.jumps[0].reward_after > acc.jumps[0].reward_before


def test_eval_fn_judges_each_jump_at_once(caplog):
    """With a held-out check the guard judges a jump right after writing it, on eval_fn's
    score (not the training reward, which here says the jump was fine): a score that drops
    by more than the margin restores the pre-jump weights at once and halves the next jump;
    a score that holds keeps it. The model is left in the mode it was in."""
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scores = iter([0.8, 0.3, 0.8, 0.79])  # before / after jump 1, before / after jump 2

    def held_out():
        model.eval()
        return next(scores)
    acc = Accelerator(model, cycle=4, jump=8, every=2, guard_steps=2, eval_fn=held_out)
    history, events = {}, {}
    with caplog.at_level("WARNING", logger="relex.loop.accelerator"):
        history, events = train(model, opt, acc, 4, rewards=lambda s: .8)
    j = acc.jumps[0]
    assert (j.score_before, j.score_after, j.rolled_back) == (0.8, 0.3, True)
    assert "held-out score 0.800 before, 0.300 after" in caplog.text
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().double(), history[4][name]), "pre-jump weights restored"
    assert acc.jump == 4 and acc.virtual_step == 4 and model.training
    _, events = train(model, opt, acc, 4, rewards=lambda s: .1, start=5)  # reward ignored
    j = acc.jumps[1]
    assert list(events) == [8] and (j.score_before, j.score_after) == (0.8, 0.79)
    assert not j.rolled_back and acc.virtual_step == 8 + 4 and acc.store.pre_of("a.weight") is None


def test_a_failing_eval_fn_falls_back_to_the_training_reward(caplog):
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def broken():
        raise ValueError("dev set missing")
    acc = Accelerator(model, cycle=4, jump=8, every=2, guard_steps=2, eval_fn=broken)
    with caplog.at_level("ERROR", logger="relex.loop.accelerator"):
        _, events = train(model, opt, acc, 6, rewards=lambda s: .8 if s <= 4 else .2)
    assert "eval_fn raised ValueError: dev set missing at real step 4" in caplog.text
    assert acc.eval_fn is None and acc.disabled is None
    j = acc.jumps[0]
    assert j.score_before is None and j.rolled_back and j.reward_after == pytest.approx(.2)


def test_bad_input_is_one_line(caplog):
    model = Toy()
    for kw, match in [(dict(cycle=2, every=2), "at least 2 snapshots"),
                      (dict(cycle=5, every=2), "multiple"),
                      (dict(jump=-1), "jump -1"),
                      (dict(guard_steps=50), "guard_steps"),
                      (dict(guard_steps=0), "guard_steps 0"),
                      (dict(snapshot_dtype="int8"), "snapshot_dtype 'int8'")]:
        with pytest.raises(RelexError, match=match) as e:
            Accelerator(model, **kw)
        assert "\n" not in str(e.value)
    # resized mid-cycle: no jump (one line naming it), training and relex go on
    acc = Accelerator(model, cycle=4, jump=4)
    acc.step(1)
    model.a.weight = torch.nn.Parameter(torch.zeros(7, 6))
    with caplog.at_level("ERROR", logger="relex.loop.accelerator"):
        for step in range(2, 5):
            assert acc.step(step) is None
    assert acc.skipped and acc.skipped[0][0] == 4 and "a.weight" in acc.skipped[0][1]
    assert "no jump at real step 4" in caplog.text and acc.disabled is None
    live = {}
    _cycle(model, acc, 4, live, start=5)
    assert len(acc.jumps) == 1 and model.a.weight.shape == (7, 6)


def _cycle(model, acc, steps, live, poison=None, start=1):
    """`steps` plain updates (+0.01 each), `poison(step)` after each, then acc.step; `live`
    gets the weights acc.step saw last (the pre-jump weights)."""
    for step in range(start, start + steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
            if poison is not None:
                poison(step)
        live.update({n: p.detach().clone() for n, p in model.named_parameters()})
        acc.step(step)


def _unchanged(model, live):
    return [n for n, p in model.named_parameters()
            if not torch.allclose(p.detach(), live[n], rtol=0, atol=0, equal_nan=True)]


def test_nan_in_a_parameter_is_named_and_no_jump_is_written():
    model = Toy()
    acc = Accelerator(model, cycle=4, jump=4, every=2)

    def poison(step):
        if step == 4:
            model.b.weight[0, 0] = float("nan")  # a later parameter than a.weight / a.bias

    live = {}
    _cycle(model, acc, 4, live, poison)
    ((step, why),) = acc.skipped
    assert step == 4 and "NaN/Inf in parameter b.weight" in why and "no jump" in why
    assert "\n" not in why and acc.disabled is None
    assert _unchanged(model, live) == [], "a.weight / a.bias must not be jumped"
    assert acc.jumps == [] and acc.virtual_step == 4


def test_a_failing_jump_restores_every_parameter(monkeypatch):
    model = Toy()
    acc = Accelerator(model, cycle=4, jump=4, every=2)
    combine, calls = acc.store.combine_into, []

    def failing(part, w):  # the 2nd parameter fails after the 1st's jump was written
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return combine(part, w)

    monkeypatch.setattr(acc.store, "combine_into", failing)
    live = {}
    _cycle(model, acc, 4, live)
    assert len(calls) == 2 and acc.jumps == [] and acc.disabled is None
    assert "writing the jump failed: MemoryError: out of memory" in acc.skipped[0][1]
    assert _unchanged(model, live) == [], "no parameter left half-jumped"
    # the failed cycle is used up; the next one jumps normally
    monkeypatch.setattr(acc.store, "combine_into", combine)
    _cycle(model, acc, 4, live, start=5)
    assert len(acc.jumps) == 1 and _unchanged(model, live) != []


def test_an_unexpected_error_disables_relex_not_the_run(monkeypatch, caplog):
    model = Toy()
    acc = Accelerator(model, cycle=4, jump=4, every=2)

    def broken(*args):
        raise RuntimeError("a bug in relex")

    monkeypatch.setattr(acc, "_guard", broken)
    live = {}
    with caplog.at_level("ERROR", logger="relex.loop.accelerator"):
        _cycle(model, acc, 8, live)  # no exception reaches the loop
    assert acc.disabled == "RuntimeError: a bug in relex" and acc.jumps == []
    assert "disabled at step 1" in caplog.text
    assert _unchanged(model, live) == []


def test_a_failure_storing_a_snapshot_skips_the_cycle(monkeypatch, caplog):
    """This rank's own failure (out of memory, say) is kept for the cycle's shared decision,
    so other ranks are told instead of waiting on it; the next cycle tries again."""
    model = Toy()
    acc = Accelerator(model, cycle=4, jump=4, every=2)
    real = acc.store.add
    calls = []

    def fails_once(parts):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for the snapshot")
        return real(parts)

    monkeypatch.setattr(acc.store, "add", fails_once)
    live = {}
    with caplog.at_level("ERROR", logger="relex.loop.accelerator"):
        _cycle(model, acc, 8, live)
    assert acc.disabled is None and len(acc.jumps) == 1 and acc.jumps[0].real_step == 8
    assert acc.skipped == [(4, "MemoryError: no room for the snapshot")]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_snapshot_dir_gives_the_same_jump_with_one_copy_in_ram(tmp_path, dtype):
    runs = {}
    for where in (None, tmp_path / "snaps"):
        model = Toy()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        acc = Accelerator(model, cycle=6, jump=12, every=2, guard_steps=2,
                          snapshot_dtype=dtype, snapshot_dir=where)
        bytes_held = []
        train(model, opt, acc, 5)
        bytes_held.append(acc.memory_bytes())
        train(model, opt, acc, 3, rewards=lambda s: 0.5, start=6)
        runs[where] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                       bytes_held, [j.as_dict() for j in acc.jumps])
    (ram, ram_bytes, ram_jumps), (disk, disk_bytes, disk_jumps) = runs.values()
    assert all(torch.equal(ram[n], disk[n]) for n in ram), "spilled = in RAM, bit for bit"
    assert [dict(j, seconds=0) for j in ram_jumps] == [dict(j, seconds=0) for j in disk_jumps]
    trainable = sum(p.numel() * 4 for p in Toy().parameters() if p.requires_grad)
    assert disk_bytes[0] == trainable, "spilled: RAM holds the cycle start only"
    per_delta = 2 if dtype == "float16" else 4
    assert ram_bytes[0] == trainable + 2 * trainable // 4 * per_delta  # 2 snapshots by step 5
    files = list((tmp_path / "snaps").rglob("*.safetensors"))
    assert files and all(f.parent.parent.name == "rows" or
                         f.parent.parent.name.startswith("relex-rank0-") for f in files)
    acc.close()  # also at the end of training: nothing is left behind
    assert list((tmp_path / "snaps").iterdir()) == []


def test_spilled_snapshots_are_removed_when_the_accelerator_goes_away(tmp_path):
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = Accelerator(model, cycle=6, jump=12, every=2, snapshot_dir=tmp_path)
    second = Accelerator(model, cycle=6, jump=12, every=2, snapshot_dir=tmp_path)
    assert first.store.root != second.store.root, "two runs sharing snapshot_dir do not collide"
    train(model, opt, first, 3)  # mid-cycle: rows on disk
    assert list(first.store.root.rglob("*.safetensors"))
    del first, second
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_a_full_snapshot_dir_skips_the_jump_and_cleans_up(tmp_path, monkeypatch, caplog):
    import errno
    import relex.output.model
    model = Toy()
    acc = Accelerator(model, cycle=4, jump=4, every=2, snapshot_dir=tmp_path)
    real = relex.output.model.os.pwrite

    def full(fd, data, pos):
        raise OSError(errno.ENOSPC, "No space left on device")

    live = {}
    _cycle(model, acc, 2, live)
    monkeypatch.setattr(relex.output.model.os, "pwrite", full)
    with caplog.at_level("ERROR", logger="relex.loop.accelerator"):
        _cycle(model, acc, 2, live, start=3)
    assert acc.jumps == [] and "No space left on device" in acc.skipped[0][1]
    assert _unchanged(model, live) == [] and acc.disabled is None
    assert not list(tmp_path.rglob("rows/*/model.safetensors")), "the cycle's files are removed"
    monkeypatch.setattr(relex.output.model.os, "pwrite", real)
    _cycle(model, acc, 4, live, start=5)
    assert len(acc.jumps) == 1
    acc.close()
    assert list(tmp_path.iterdir()) == []


def test_steps_that_do_not_increase_are_ignored_with_one_warning(caplog):
    """A loop that passes the same (or an earlier) step again is told once; the calls are
    ignored, so the snapshots stay where the real steps are."""
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = Accelerator(model, cycle=4, jump=8, every=2, verbose=False)
    with caplog.at_level("WARNING", logger="relex.loop.accelerator"):
        for s in (1, 1, 2, 2, 1):
            acc.step(s, optimizer=opt)
    warned = [r for r in caplog.records if "pass the optimizer step count" in r.getMessage()]
    assert len(warned) == 1 and "step(1) after step(1)" in warned[0].getMessage()
    assert acc.snap_steps == [2] and acc.last_step == 2 and acc.disabled is None


@pytest.mark.parametrize("verbose", [True, False])
def test_each_jump_is_one_visible_line_unless_quiet(verbose, capsys, caplog):
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = Accelerator(model, cycle=4, jump=8, every=2, verbose=verbose)
    with caplog.at_level("INFO", logger="relex.loop.accelerator"):
        _, events = train(model, opt, acc, 8)
    assert len(events) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "relex: jumped" in line]
    logged = [r for r in caplog.records if "relex: jumped" in r.getMessage()]
    assert (len(lines), len(logged)) == ((2, 0) if verbose else (0, 2))
