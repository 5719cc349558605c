"""--device cuda against the float64 reference and the CPU path; the in-loop accelerator on a
GPU training run; torchrun with one GPU per rank. (A caller's TF32 setting: test_engine.py, on
CPU, where the same guard applies.)

Skipped where torch sees no GPU (CI). Run on a GPU machine:
`pytest tests/test_cuda.py` (docs/gpu.md)."""

import numpy as np
import pytest
import torch
from conftest import load_dir
from safetensors import safe_open
from test_extrapolate import STEPS, check_outputs, check_reconstruction

import relex

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kw,rank", [
    (dict(), 1),
    (dict(), 3),
    (dict(base_dtype=torch.bfloat16, tied=True, shards=3), 1),
    (dict(base_dtype=torch.bfloat16, ckpt_dtype=torch.float32), 1),
    (dict(base_dtype=torch.float16), 2),
])
def test_cuda_outputs_within_one_ulp_of_float64(run_factory, tmp_path, kw, rank):
    run, base = run_factory(**kw)
    relex.extrapolate(run, base=base, targets=[30, 50], output=tmp_path / "out", rank=rank,
                      device="cuda", progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [30, 50], rank=rank)


@pytest.mark.parametrize("budget", ["1MB", "40KB"])
def test_cuda_two_passes_give_the_bytes_of_one_and_match_the_cpu(run_factory, tmp_path, budget):
    run, base = run_factory(base_dtype=torch.bfloat16)
    for name, dev, mem in (("gpu", "cuda", None), ("small", "cuda", budget), ("cpu", "cpu", None)):
        relex.extrapolate(run, base=base, targets=[30], output=tmp_path / name, device=dev,
                          max_memory=mem, threads=2 if mem else None, progress=False)
    gpu, small, cpu = (load_dir(tmp_path / f"{n}/step-30") for n in ("gpu", "small", "cpu"))
    for name in gpu:
        assert torch.equal(gpu[name], small[name]), name
        # at most one bf16 step apart (integers in value order; -0 == +0)
        ordered = [torch.where(x.view(torch.int16) < 0, -(x.view(torch.int16).int() & 0x7FFF),
                               x.view(torch.int16).int()) for x in (gpu[name], cpu[name])]
        assert (ordered[0] - ordered[1]).abs().max() <= 1, name
    fits = [safe_open(str(tmp_path / f"{n}/relex-fit.safetensors"), "np") for n in ("gpu", "cpu")]
    for name in fits[0].keys():
        np.testing.assert_allclose(fits[0].get_tensor(name), fits[1].get_tensor(name),
                                   rtol=1e-5, atol=0)


def test_cuda_reconstruct_and_analyze(run_factory, tmp_path):
    run, base = run_factory(noise=0.5)
    relex.reconstruct(run, base=base, steps=[2, 6, 10], output=tmp_path / "rec", device="cuda",
                      progress=False)
    check_reconstruction(tmp_path / "rec", base, run, (2, 6, 10))
    a_gpu = relex.analyze(run, base=base, observe_until=6, output=tmp_path / "ag", device="cuda",
                          progress=False)
    a_cpu = relex.analyze(run, base=base, observe_until=6, output=tmp_path / "ac", progress=False)
    g, c = (safe_open(str(a / "relex-fit.safetensors"), "np") for a in (tmp_path / "ag",
                                                                         tmp_path / "ac"))
    for name in c.keys():
        np.testing.assert_allclose(g.get_tensor(name), c.get_tensor(name), rtol=1e-5, atol=0)
    assert a_gpu.summary.keys() == a_cpu.summary.keys()


def test_torchrun_takes_one_gpu_per_rank(run_factory, tmp_path):
    """More ranks than GPUs: every rank stops with one line and nothing is written; with a GPU
    per rank (2+ GPUs), the bytes of one process."""
    from test_distributed import args, files_of, launch
    run, base = run_factory(base_dtype=torch.bfloat16)
    res = launch(tmp_path, lambda r: args(run, base, tmp_path / "two", "--device", "cuda"))
    if torch.cuda.device_count() < 2:
        assert [code for code, _ in res] == [2, 2], res
        for _, err in res:
            assert "one GPU per rank" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "two").exists()
        return
    assert [code for code, _ in res] == [0, 0], res
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "one", device="cuda",
                      max_shard_size="40KB", max_memory="3MB", progress=False)
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


def test_accelerator_jumps_a_gpu_training_run_in_place(tmp_path):
    """RelexCallback (accelerate mode) in trl.GRPOTrainer training on the GPU: the live CUDA
    parameters get relex's extrapolation, the optimizer state survives, training goes on."""
    pytest.importorskip("trl")
    from test_trl import svd_lstsq, trainer
    from transformers import TrainerCallback

    from relex.integrations.trl import RelexCallback

    class Snapshots(TrainerCallback):  # weights before relex's on_log and after it, on the CPU
        def __init__(self):
            self.before, self.after, self.moments = {}, {}, {}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            self.before[state.global_step] = {n: p.detach().double().cpu()
                                              for n, p in model.named_parameters()}
            self.moments[state.global_step] = {n: id(optimizer.state[p]["exp_avg"])
                                               for n, p in model.named_parameters()}

        def on_log(self, args, state, control, model=None, **kw):
            self.after[state.global_step] = {n: p.detach().double().cpu()
                                             for n, p in model.named_parameters()}

    cb, rec = RelexCallback(mode="accelerate", cycle=6, jump=12, every=2, guard_steps=2,
                            guard_margin=1.0), Snapshots()
    t = trainer(tmp_path / "run", 8, [cb, rec], prompts=2, use_cpu=False)
    start = {n: p.detach().double().cpu() for n, p in t.model.named_parameters()}
    t.train()
    assert all(p.is_cuda for p in t.model.parameters())
    assert [j.real_step for j in cb.accelerator.jumps] == [6] and t.state.global_step == 8
    for name in start:
        ref = svd_lstsq(start[name].numpy(), [rec.before[s][name].numpy() for s in (2, 4, 6)],
                        [2, 4, 6], 18)
        got = rec.after[6][name].numpy()
        assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max()), name
        assert rec.moments[7][name] == rec.moments[5][name], name
