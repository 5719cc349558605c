"""Engine internals: read-ahead covers exactly what the pass reads, in order; budget floor;
the default budget; every prefetch mode gives the same bytes."""

import os
import threading
import time

import numpy as np
import pytest
import torch

import relex
from conftest import load_dir
from relex.fit import Extrapolation
from relex.stream import budget as budget_mod
from relex.stream import prefetch
from relex.stream.blocks import BlockWork
from relex.stream.engine import Engine
from relex.stream.plan import PassPlan
from relex.errors import RelexError
from relex.formats import base as fbase
from relex.formats import open_reader
from relex.stream.trajectory import Trajectory
from test_extrapolate import check_outputs


def _traj(run, base):
    steps = sorted(int(p.name.split("-")[1]) for p in run.iterdir())
    return Trajectory(open_reader(base), [open_reader(run / f"checkpoint-{s}") for s in steps],
                      steps)


def _plan(traj, budget, fit=True, workers=2):
    """The pass of one target (step 30) over every tensor."""
    from relex.fit import FitConfig
    rule = Extrapolation(traj.steps.astype(float), np.array([30.0]), FitConfig())
    return PassPlan(list(traj.plans), 1, rule if fit is True else fit, budget, workers=workers)


class _Sink:
    def write_at(self, *a):
        pass


@pytest.mark.parametrize("cached", [False, True])
def test_prefetch_asks_for_every_range_once_per_pass_from_disk_from_its_own_thread(
        run_factory, monkeypatch, cached):
    """Read-ahead asks for every range of every source once per pass that reads the disk, in
    the engine's order, from one thread of its own (asking can block until the disk's queue
    drains: never in a worker); a second pass over a tensor that fits the page cache beside
    the budget is not asked for again."""
    monkeypatch.setattr(budget_mod, "available_memory", lambda: 1 << 40 if cached else 0)
    close = prefetch.Prefetcher.close

    def drained_close(self):  # let the thread ask for what the last advance reached first
        deadline = time.monotonic() + 60
        while self._thread is not None and self._due() and time.monotonic() < deadline:
            time.sleep(0.01)
        close(self)
    monkeypatch.setattr(prefetch.Prefetcher, "close", drained_close)
    run, base = run_factory(base_dtype=torch.bfloat16)
    traj = _traj(run, base)
    calls = []
    for reader in (traj.base, *traj.checkpoints):
        reader.prefetch = (lambda r: lambda name, a, b: calls.append(
            (threading.current_thread().name, r, name, a, b)))(reader)
    try:
        # a budget small enough that some tensors are read twice (two passes)
        engine = Engine(traj, _plan(traj, 200_000))
        twice = [p for p in traj.plans if p.moves and not engine.budget.single(p)]
        assert twice, "the budget must force a second pass somewhere"
        engine.run([_Sink()])
    finally:
        traj.close()
    assert {c[0] for c in calls} == {"relex-prefetch"}
    order = [p.name for p in traj.plans]
    asked = [order.index(c[2]) for c in calls]
    assert asked == sorted(asked), "asked out of the engine's order"
    for plan in traj.plans:
        srcs = (traj.base, *traj.checkpoints)[: len(plan.sources) if plan.moves else 1]
        for r in srcs:
            spans = [(a, b) for _, rr, n, a, b in calls if rr is r and n == plan.name]
            passes = 2 if plan in twice and not cached else 1
            assert sum(b - a for a, b in spans) == passes * plan.numel, (plan.name, spans)
            assert sorted(spans) == sorted(spans[: len(spans) // passes] * passes)


def test_prefetch_modes_give_identical_bytes(run_factory, tmp_path, monkeypatch):
    run, base = run_factory(base_dtype=torch.bfloat16)
    outs = {}
    for mode in ("off", "madvise", "fadvise"):
        monkeypatch.setattr(fbase, "PREFETCH", mode)
        relex.extrapolate(run, base=base, targets=[30], output=tmp_path / mode, progress=False,
                          max_memory="1MB")
        outs[mode] = load_dir(tmp_path / mode / "step-30")
    for name, t in outs["off"].items():
        assert torch.equal(t, outs["madvise"][name]) and torch.equal(t, outs["fadvise"][name])


def test_budget_below_one_block_says_the_minimum(run_factory, tmp_path):
    run, base = run_factory()
    with pytest.raises(RelexError, match=r"below what one block needs.*at least \d+KB"):
        relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "o", progress=False,
                          max_memory="5KB")
    assert not (tmp_path / "o").exists()


def test_default_budget_is_a_quarter_of_available_ram():
    b = budget_mod.default_budget()
    assert b >= budget_mod.MIN_DEFAULT_BUDGET
    avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert b <= max(budget_mod.MIN_DEFAULT_BUDGET, avail // 4)
    assert budget_mod.default_budget(4) <= max(budget_mod.MIN_DEFAULT_BUDGET, b // 4 + 1)


def test_reader_prefetch_defaults_to_nothing(tmp_path):
    r = fbase.Reader(tmp_path)
    assert r.prefetch("x", 0, 10) is None


@pytest.mark.parametrize("where", ["setup", "fit"])
def test_a_failing_pass_restores_the_collector_and_threads(run_factory, monkeypatch, where):
    """run() pauses Python's cyclic GC and pins torch to one thread per worker; an error while
    setting up the pass (the read-ahead) or in its middle (the fit) must leave both as they
    were."""
    import gc
    from relex.stream import engine as engine_module
    run, base = run_factory(base_dtype=torch.bfloat16)
    traj = _traj(run, base)
    threads = torch.get_num_threads()

    def fail(*a, **k):
        raise RelexError(f"{where} failed")
    if where == "setup":
        monkeypatch.setattr(engine_module, "Prefetcher", fail)
    try:
        with pytest.raises(RelexError, match=f"{where} failed"):
            Engine(traj, _plan(traj, 1 << 30, fit=fail)).run([])
    finally:
        traj.close()
    assert gc.isenabled() and torch.get_num_threads() == threads


def test_a_short_row_from_a_reader_is_an_error_not_a_crash(run_factory, tmp_path, monkeypatch):
    """The compiled kernels read rows by address without bounds checks: a reader that returns
    fewer elements than asked (a damaged file, a reader bug) must stop the run with one line
    naming the tensor and the checkpoint, before any kernel runs."""
    from relex.stream import kernels
    if not kernels.available():
        pytest.skip("numba unavailable: the torch path checks shapes itself")
    run, base = run_factory(base_dtype=torch.bfloat16)
    real = Trajectory.read

    def short(self, plan, source, start, stop):
        row = real(self, plan, source, start, stop)
        return row[:-1] if source == 2 and plan.numel > 1 else row
    monkeypatch.setattr(Trajectory, "read", short)
    with pytest.raises(RelexError, match=r"checkpoint-\d+ gave \d+ elements .* damaged"):
        relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["legacy", "per-backend"])
def test_float32_products_are_full_precision_during_the_pass_and_the_setting_comes_back(
        run_factory, tmp_path, monkeypatch, setting):
    """A trainer's TF32 / bf16 setting for float32 matmuls (transformers' tf32=True uses torch's
    per-backend API, whose presence makes the legacy getter raise) must neither reach relex's
    products nor be lost, nor crash the pass."""
    b = torch.backends
    if not hasattr(b.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy setting")
    run, base = run_factory(base_dtype=torch.float16)  # fp16: the torch path's products
    seen = []
    fit = Extrapolation.__call__

    def spy(self, *args):
        seen.append((b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision))
        return fit(self, *args)
    monkeypatch.setattr(Extrapolation, "__call__", spy)
    try:
        if setting == "legacy":
            torch.set_float32_matmul_precision("medium")
        else:
            b.fp32_precision = "tf32"
        before = (b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision)
        relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
        assert seen and set(seen) == {("ieee", "ieee")}
        assert (b.fp32_precision, b.cuda.matmul.fp32_precision,
                b.mkldnn.matmul.fp32_precision) == before
        if setting == "legacy":
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        b.fp32_precision = b.cuda.matmul.fp32_precision = b.mkldnn.matmul.fp32_precision = "none"
    check_outputs(tmp_path / "out", base, run, (2, 4, 6, 8, 10), [30])


@pytest.mark.parametrize("kw", [{}, {"base_dtype": torch.bfloat16},
                                {"base_dtype": torch.bfloat16, "ckpt_dtype": torch.float32}])
@pytest.mark.parametrize("budget", [None, "100KB"])
def test_the_gpu_feeding_path_run_on_the_cpu(run_factory, tmp_path, monkeypatch, kw, budget):
    """_fill_gpu (a block's rows gathered as stored into one buffer, copied once, converted and
    subtracted on the device) only runs with a GPU in the suite's other tests; here the same
    code runs with the CPU as its device: two threads, resident tensors in blocks of 512
    elements and (100KB) tensors shared across threads, against the float64 reference."""
    monkeypatch.setattr(budget_mod, "BLOCK", 512)  # several blocks per tensor either way
    init = budget_mod.Budget.__init__

    def as_if_a_gpu(self, *a, **k):
        init(self, *a, **k)
        self.cpu = False  # the non-CPU branches, on CPU tensors
    monkeypatch.setattr(budget_mod.Budget, "__init__", as_if_a_gpu)
    gathered = []
    fill = BlockWork._fill_gpu
    monkeypatch.setattr(BlockWork, "_fill_gpu",
                        lambda self, *a: gathered.append(1) or fill(self, *a))
    run, base = run_factory(**kw)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", max_memory=budget,
                      threads=2, progress=False)
    tensors = len(load_dir(base))
    assert len(gathered) >= 2 * tensors, (len(gathered), tensors)  # several blocks per tensor
    check_outputs(tmp_path / "out", base, run, (2, 4, 6, 8, 10), [30])
