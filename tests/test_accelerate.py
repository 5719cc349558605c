"""The in-loop Accelerator: jumps equal an independent float64 SVD + lstsq extrapolation of the
cycle, the optimizer state survives, the guard rolls back, bad input is refused."""

import numpy as np
import pytest
import torch

from relex import Accelerator, RelexError
from relex.accelerate import Jump


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


@pytest.mark.parametrize("rank", [1, 2])
def test_jump_equals_reference_and_optimizer_state_survives(rank):
    model = Toy()
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = {n: p.detach().double().clone() for n, p in params.items()}
    acc = Accelerator(model, cycle=10, jump=20, every=2, rank=rank)
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
        assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max()), name
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
    assert np.allclose(params[name].detach().double().numpy(), ref, rtol=0, atol=1e-6)
    assert [j.real_step for j in acc.jumps] == [10, 20] and acc.virtual_step == 60


def test_linear_weights_method_and_optimizer_reset():
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = model.a.bias.detach().double().clone()
    acc = Accelerator(model, cycle=6, jump=3, every=3, method="linear-weights",
                      reset_optimizer=True)
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
    with caplog.at_level("WARNING", logger="relex.accelerate"):
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


def test_bad_input_is_one_line():
    model = Toy()
    for kw, match in [(dict(cycle=2, every=2), "at least 2 snapshots"),
                      (dict(cycle=5, every=2), "multiple"),
                      (dict(jump=-1), "jump -1"),
                      (dict(guard_steps=50), "guard_steps"),
                      (dict(guard_steps=0), "guard_steps 0")]:
        with pytest.raises(RelexError, match=match) as e:
            Accelerator(model, **kw)
        assert "\n" not in str(e.value)
    acc = Accelerator(model, cycle=4, jump=4)
    acc.step(1)
    model.a.weight = torch.nn.Parameter(torch.zeros(7, 6))  # resized mid-cycle
    with pytest.raises(RelexError, match="a.weight changed shape"):
        acc.step(2)


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
    with pytest.raises(RelexError, match=r"NaN/Inf in parameter b\.weight .*no jump") as e:
        _cycle(model, acc, 4, live, poison)
    assert "\n" not in str(e.value)
    assert _unchanged(model, live) == [], "a.weight / a.bias must not be jumped"
    assert acc.jumps == [] and acc.virtual_step == 4


def test_a_failing_jump_restores_every_parameter(monkeypatch):
    model = Toy()
    acc = Accelerator(model, cycle=4, jump=4, every=2)
    combine, calls = acc._combine, []

    def failing(base, rows, w):  # the 2nd parameter fails after the 1st's jump was written
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return combine(base, rows, w)

    monkeypatch.setattr(acc, "_combine", failing)
    live = {}
    with pytest.raises(MemoryError):
        _cycle(model, acc, 4, live)
    assert len(calls) == 2 and acc.jumps == []
    assert _unchanged(model, live) == [], "no parameter left half-jumped"
    # the failed cycle is used up; the next one jumps normally
    monkeypatch.setattr(acc, "_combine", combine)
    _cycle(model, acc, 4, live, start=5)
    assert len(acc.jumps) == 1 and _unchanged(model, live) != []
