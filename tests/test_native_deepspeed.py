"""Native output for DeepSpeed ZeRO-1/2, loaded back by DeepSpeed itself (CPU, 2 gloo ranks).

Two ranks train a tiny Qwen2 a few steps with ZeRO-2 and with ZeRO-1 + bf16 + fp32 gradient
accumulation (DeepSpeed's BF16_Optimizer), saving DeepSpeed checkpoints; this process
extrapolates them with relex (native output, and an fp32 HF export of the same run to compare
with); the ranks then `engine.load_checkpoint` the native output and take one step. Its
parameter count is not a multiple of 2 x world size, so the flat buffers carry end padding (cut
off by ZeRO-2's state_dict, kept by BF16_Optimizer's) and parameters straddle the rank boundary.

The rest writes tag directories the way DeepSpeed 0.19.8 lays them out (3 ranks, two param
groups, per-parameter alignment padding, frozen fragments, the Trainer's checkpoint-N/) and
checks relex against DeepSpeed's own zero_to_fp32.py, plus the one-line errors.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_within_ulp, load_dir, reference

pytestmark = pytest.mark.filterwarnings("ignore:the verified horizon is unknown")

WORLD, STEPS, TARGET = 2, (2, 4, 6), 12
#: head_dim 10, 22330 parameters: 2 short of a multiple of 2 x WORLD
CONFIG = {"vocab_size": 96, "hidden_size": 30, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 64}
STAGES = {"zero2": 2, "zero1-bf16": 1}


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(seed))


def _worker(rank, root, port, saved, written):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks and this test's process share the cores
    import deepspeed
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # no C++ op build
    deepspeed.init_distributed(dist_backend="gloo")
    for i, (kind, stage) in enumerate(STAGES.items()):
        _train_and_resume(rank, Path(root) / kind, stage, saved[i], written[i])


def _train_and_resume(rank, root, stage, saved, written):
    """Train and save (then `saved`); once relex has written (`written`), load the native
    output and step, then the last real checkpoint with the masters set the in-loop way and
    step: what each gave goes to root/result{rank}.pt."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
           "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 1.0}
    if stage == 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # -> BF16_Optimizer
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=cfg)
    assert type(engine.optimizer).__name__ == ("BF16_Optimizer" if stage == 1
                                               else "DeepSpeedZeroOptimizer")
    if rank == 0:
        engine.module.save_pretrained(root / "base")
    for step in range(1, STEPS[-1] + 1):
        x = _batch(100 * step + rank)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        if step in STEPS:
            engine.save_checkpoint(root / "run", tag=f"global_step{step}")
    torch.distributed.barrier()
    if rank == 0:
        saved.set()
    assert written.wait(300), "relex did not write"
    params = list(engine.module.named_parameters())

    def state():
        opt = engine.optimizer.optimizer  # the torch AdamW over this rank's flat partitions
        return {"masters": {n: safe_get_full_fp32_param(p).clone() for n, p in params},
                "moments": [{k: v.clone() for k, v in opt.state[g["params"][0]].items()}
                            for g in opt.param_groups],
                "module": {n: p.detach().clone() for n, p in params},
                "steps": engine.global_steps}

    def step():
        x = _batch(7 + rank)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        return {n: safe_get_full_fp32_param(p).clone() for n, p in params}

    engine.load_checkpoint(root / "native" / f"step-{TARGET}")
    native = state()
    native["after"] = step()
    # the control: the last real checkpoint, its masters set to the fp32 extrapolation the
    # in-loop way (DeepSpeed's own setter, then the 16-bit copies refreshed from them)
    engine.load_checkpoint(root / "run", tag=f"global_step{STEPS[-1]}")
    real = state()
    hf = load_file(root / "hf" / f"step-{TARGET}" / "model.safetensors")
    for n, p in params:
        safe_set_full_fp32_param(p, hf[n])
    engine.optimizer.update_lp_params()
    real["after"] = step()
    torch.save({"native": native, "real": real}, root / f"result{rank}.pt")
    torch.distributed.barrier()


def _digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _wait(event, procs, limit: float = 600.0):
    """Wait for `event` (None: for the ranks to end), failing if a rank fails or hangs."""
    import time
    deadline = time.monotonic() + limit
    while not (event.wait(0.5) if event is not None else procs.join(timeout=0.5)):
        procs.join(timeout=0)  # raises if a rank failed
        assert time.monotonic() < deadline, "the DeepSpeed ranks hang"


def test_deepspeed_native_output_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    import relex
    from relex.formats import open_reader
    ctx = mp.get_context("spawn")
    saved = [ctx.Event() for _ in STAGES]
    written = [ctx.Event() for _ in STAGES]
    port = 29000 + os.getpid() % 1000
    procs = mp.start_processes(_worker, args=(str(tmp_path), port, saved, written),
                               nprocs=WORLD, join=False, start_method="spawn")
    digests = {}
    try:
        for i, kind in enumerate(STAGES):
            _wait(saved[i], procs)
            run, base = tmp_path / kind / "run", tmp_path / kind / "base"
            digests[kind] = _digest(run)
            relex.extrapolate(run, base=base, targets=[TARGET], output=tmp_path / kind / "native",
                              output_format="native", progress=False)
            relex.extrapolate(run, base=base, targets=[TARGET], output=tmp_path / kind / "hf",
                              dtype="fp32", progress=False)
            written[i].set()
        _wait(None, procs)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    for kind in STAGES:
        run, native_dir = tmp_path / kind / "run", tmp_path / kind / "native" / f"step-{TARGET}"
        assert _digest(run) == digests[kind], "the input run changed"
        tag = native_dir / f"global_step{STEPS[-1]}"
        assert (native_dir / "latest").read_text() == f"global_step{STEPS[-1]}"
        optim = sorted(tag.glob("*_optim_states.pt"))
        assert len(optim) == WORLD and (tag / "mp_rank_00_model_states.pt").is_file()
        for f in optim + [tag / "mp_rank_00_model_states.pt"]:
            assert zipfile.ZipFile(f).testzip() is None, f
        res = [torch.load(tmp_path / kind / f"result{r}.pt") for r in range(WORLD)]
        for r in res:  # Adam's moments and step count are the last checkpoint's, on each rank
            assert len(r["native"]["moments"]) == len(r["real"]["moments"]) == 1
            for a, b in zip(r["native"]["moments"], r["real"]["moments"]):
                assert a.keys() == b.keys() == {"step", "exp_avg", "exp_avg_sq"}
                assert all(torch.equal(a[k], b[k]) for k in a)
        native, real = res[0]["native"], res[0]["real"]
        hf = load_dir(tmp_path / kind / "hf" / f"step-{TARGET}")
        basesd = load_dir(tmp_path / kind / "base")
        ckpts = []
        for s in STEPS:
            with open_reader(run / f"global_step{s}") as r:
                ckpts.append({n: r.read(n, 0, t.numel).reshape(t.shape).clone()
                              for n, t in r.tensors.items()})
        ref = reference(basesd, ckpts, STEPS, [TARGET])[0]
        assert native["steps"] == real["steps"] == STEPS[-1]
        assert native["masters"].keys() == hf.keys()
        for n, m in native["masters"].items():
            assert m.dtype == torch.float32 and torch.equal(m, hf[n]), n  # relex's fp32 result
            assert_within_ulp(m, ref[n], n, basesd[n].double().numpy())
            assert torch.equal(native["module"][n], m.to(torch.bfloat16)), n
            assert not torch.equal(m, real["masters"][n]), n  # it did move ahead
            # one step from the native output = one step from the masters set in the loop
            assert torch.equal(native["after"][n], real["after"][n]), n
            assert not torch.equal(native["after"][n], m), n


# ------------------------------------------------ the layout, on files written like DeepSpeed's
def _zero_checkpoint(tag: Path, masters: dict, groups: list[list[str]], world: int, *,
                     align: int = 1, whole: bool = False, step: int = 6,
                     frozen: tuple[str, ...] = ()) -> None:
    """A ZeRO-1/2 tag directory as DeepSpeed 0.19.8 writes it (engine._save_checkpoint,
    _save_zero_checkpoint, stage_1_and_2.state_dict; BF16_Optimizer.state_dict with `whole`):
    the module in bf16; per group a flat fp32 buffer of the group's masters, each followed by
    its padding to `align` elements (`parameter_alignment`), padded to a multiple of 2 x world
    and split evenly; ZeRO-1/2 save each piece without the end padding (`whole`: with it).
    `frozen` parameters (in no group) are saved again as frozen_param_fragments (ZeRO-2)."""
    from collections import OrderedDict

    from deepspeed.utils.tensor_fragment import fragment_address
    from test_formats_torch import _ds_states
    tag.mkdir(parents=True)
    module = {n: t.to(torch.bfloat16) for n, t in masters.items()}
    states = _ds_states(module, step)
    states["param_shapes"] = [OrderedDict((n, masters[n].shape) for n in g) for g in groups]
    states["dp_world_size"] = world
    if frozen:
        states["frozen_param_shapes"] = OrderedDict((n, masters[n].shape) for n in frozen)
        states["frozen_param_fragments"] = OrderedDict((n, module[n].clone()) for n in frozen)
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    ranks = [{"single_partition_of_fp32_groups": [], "group_paddings": [],
              "param_slice_mappings": []} for _ in range(world)]
    pads = []
    for names in groups:
        pieces, pad, offsets = [], [], []
        for i, n in enumerate(names):
            offsets.append(sum(p.numel() for p in pieces))
            pieces.append(masters[n].reshape(-1).float())
            pad.append(0 if i == len(names) - 1 else -sum(p.numel() for p in pieces) % align)
            pieces.append(torch.zeros(pad[-1]))
        used = sum(p.numel() for p in pieces)
        flat = torch.cat(pieces + [torch.zeros(-used % (2 * world))])
        size = flat.numel() // world
        pads.append(pad)
        for r, sd in enumerate(ranks):
            part = flat[r * size:(r + 1) * size].clone()
            lean = size if whole else max(0, min(size, used - r * size))
            sd["single_partition_of_fp32_groups"].append(part[:lean])  # a view, as DeepSpeed
            sd["group_paddings"].append(size - lean)
            lo, hi = r * size, (r + 1) * size
            sd["param_slice_mappings"].append(OrderedDict(
                (n, fragment_address(numel=min(o + masters[n].numel(), hi) - max(o, lo),
                                     start=max(o, lo) - lo))
                for n, o in zip(names, offsets) if max(o, lo) < min(o + masters[n].numel(), hi)))
    for r, sd in enumerate(ranks):
        sd.update(zero_stage=2, partition_count=[world] * len(groups), ds_version="0.19.8",
                  base_optimizer_state={"state": {i: {"exp_avg": torch.ones(3)}
                                                  for i in range(len(groups))},
                                        "param_groups": [{"params": [i]}
                                                         for i in range(len(groups))]})
        if not whole:
            sd["param_alignment_paddings"] = pads
        torch.save({"optimizer_state_dict": sd, "ds_config": {}, "ds_version": "0.19.8"},
                   tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def _masters(seed: int = 0, scale: float = 0.0) -> dict[str, torch.Tensor]:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    gen = torch.Generator().manual_seed(seed + 1)
    return {n: (p.detach() + scale * torch.randn(p.shape, generator=gen)).float()
            for n, p in model.named_parameters()}


def _assembled(tag: Path) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master as relex's places find it (the flat place), assembled."""
    from relex.formats import open_reader
    from relex.formats.base import MappedFiles
    maps, out = MappedFiles(), {}
    with open_reader(tag) as r:
        for name, meta in r.tensors.items():
            places = r.places(name)
            assert len(places) == 2 and places[1].shape == (meta.numel,), name
            flat = torch.full((meta.numel,), float("nan"))
            for c in places[1].chunks:
                flat[c.offsets[0]: c.offsets[0] + c.tensor.numel] = c.tensor.view(maps)
            out[name] = flat.reshape(meta.shape)
    return out


@pytest.mark.parametrize("world,align,whole", [(2, 1, False), (3, 8, False), (3, 1, True)])
def test_masters_layout_matches_zero_to_fp32(tmp_path, world, align, whole):
    """Two param groups (OpenRLHF's decay / no-decay), 3 ranks, per-parameter alignment
    padding, pieces with or without the end padding: relex finds every master where
    DeepSpeed's own zero_to_fp32.py does (and where it was put)."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    masters = _masters(scale=0.01)
    names = list(masters)
    groups = [[n for n in names if n.endswith("weight") and "norm" not in n],
              [n for n in names if not (n.endswith("weight") and "norm" not in n)]]
    tag = tmp_path / "global_step6"
    _zero_checkpoint(tag, masters, groups, world, align=align, whole=whole)
    got = _assembled(tag)
    ref = get_fp32_state_dict_from_zero_checkpoint(tmp_path, tag="global_step6")
    for n, m in masters.items():
        assert torch.equal(got[n], m) and torch.equal(ref[n], m), n


def _synthetic_run(root: Path, world: int, groups=None, align: int = 1, frozen=()) -> dict:
    """base/ (HF, bf16) and run/global_step{2,4,6}/ written like DeepSpeed ZeRO-2."""
    from conftest import save_checkpoint
    from transformers import Qwen2Config
    base = _masters()
    save_checkpoint(root / "base", base, Qwen2Config(**CONFIG).to_dict(), torch.bfloat16)
    groups = groups or [list(base)]
    gen = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(t.shape, generator=gen) for n, t in base.items()}
    for s in STEPS:
        masters = {n: t + 2e-3 * s * direction[n] + 1e-4 * torch.randn(t.shape, generator=gen)
                   for n, t in base.items()}
        _zero_checkpoint(root / "run" / f"global_step{s}", masters, groups, world, align=align,
                         step=s, frozen=frozen)
    (root / "run" / "latest").write_text(f"global_step{STEPS[-1]}")
    return base


def test_native_output_on_three_ranks(tmp_path):
    """Two groups on 3 ranks with alignment padding: DeepSpeed's zero_to_fp32 reads the
    native output's masters as relex's fp32 extrapolation, the module (and a frozen
    parameter's saved fragment) is their bf16 cast, the zip CRCs are valid, Adam's state and
    the input are unchanged."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import relex
    names = list(_masters())
    frozen = "model.norm.weight"  # moving here, so that relex writes it
    trained = [n for n in names if n != frozen]
    _synthetic_run(tmp_path, 3, [trained[::2], trained[1::2]], align=8, frozen=(frozen,))
    run = tmp_path / "run"
    before = _digest(run)
    relex.extrapolate(run, base=tmp_path / "base", targets=[TARGET],
                      output=tmp_path / "native", output_format="native", progress=False)
    relex.extrapolate(run, base=tmp_path / "base", targets=[TARGET], output=tmp_path / "hf",
                      dtype="fp32", progress=False)
    assert _digest(run) == before
    out = tmp_path / "native" / f"step-{TARGET}"
    tag = out / f"global_step{STEPS[-1]}"
    for f in tag.iterdir():
        assert zipfile.ZipFile(f).testzip() is None, f
    hf = load_dir(tmp_path / "hf" / f"step-{TARGET}")
    got = get_fp32_state_dict_from_zero_checkpoint(out, tag=tag.name)
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    for n in trained:
        assert torch.equal(got[n], hf[n]), n
        assert torch.equal(states["module"][n], hf[n].to(torch.bfloat16)), n
    assert torch.equal(states["frozen_param_fragments"][frozen], hf[frozen].to(torch.bfloat16))
    assert torch.equal(states["module"][frozen], hf[frozen].to(torch.bfloat16))
    for r in range(3):
        f = f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        new, old = (torch.load(d / f, weights_only=False)["optimizer_state_dict"]
                    for d in (tag, run / tag.name))
        for a, b in zip(new["base_optimizer_state"]["state"].values(),
                        old["base_optimizer_state"]["state"].values()):
            assert torch.equal(a["exp_avg"], b["exp_avg"])
        assert not any(torch.equal(a, b) for a, b in zip(
            new["single_partition_of_fp32_groups"], old["single_partition_of_fp32_groups"]))


def _native_error(capsys, root: Path, pattern: str) -> None:
    from test_errors import expect_error
    out = root / "out"
    expect_error(capsys, ["extrapolate", root / "run", "--base", root / "base", "--target",
                          str(TARGET), "--output", out, "--output-format", "native", "-q"],
                 root, pattern, out)


def test_native_bad_optimizer_files(tmp_path, capsys):
    """One line naming the file: a rank's optimizer file missing, one from a larger world,
    param_shapes disagreeing with the module or with the optimizer's partitions."""
    pytest.importorskip("deepspeed")
    _synthetic_run(tmp_path, 2)
    tag = tmp_path / "run" / f"global_step{STEPS[-1]}"
    rank = "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt".format
    saved = (tag / rank(1)).read_bytes()
    (tag / rank(1)).unlink()
    _native_error(capsys, tmp_path, rf"global_step6/{rank(1)}: missing \(dp_world_size 2\)")
    (tag / rank(1)).write_bytes(saved)
    (tag / rank(2)).write_bytes(saved)
    _native_error(capsys, tmp_path, rf"global_step6/{rank(2)}: data-parallel rank 2, but "
                                    rf"mp_rank_00_model_states\.pt says dp_world_size 2")
    (tag / rank(2)).unlink()
    states = tag / "mp_rank_00_model_states.pt"
    good = states.read_bytes()
    sd = torch.load(states, weights_only=False)
    sd["param_shapes"][0]["model.norm.weight"] = torch.Size([29])
    torch.save(sd, states)
    _native_error(capsys, tmp_path, r"global_step6/mp_rank_00_model_states\.pt: param_shapes "
                                    r"has 'model\.norm\.weight' of shape \[29\], but the "
                                    r"module entry is of shape \[30\]")
    sd["param_shapes"][0]["model.norm.weight"] = torch.Size([30])
    del sd["param_shapes"][0]["lm_head.weight"]  # a model states file of another model
    torch.save(sd, states)
    _native_error(capsys, tmp_path, rf"global_step6/{rank(0)}: param_alignment_paddings\[0\] "
                                    rf"does not list one padding per parameter of group 0")
    optim = {r: (tag / rank(r)).read_bytes() for r in range(2)}
    for r in range(2):  # as DeepSpeed < 0.19 wrote them
        osd = torch.load(tag / rank(r), weights_only=False)
        del osd["optimizer_state_dict"]["param_alignment_paddings"]
        torch.save(osd, tag / rank(r))
    _native_error(capsys, tmp_path, rf"global_step6/{rank(1)}: the fp32 partitions of param "
                                    rf"group 0 hold 22330 elements, but param_shapes in .* "
                                    rf"needs 19450")
    states.write_bytes(good)
    for r in range(2):
        (tag / rank(r)).write_bytes(optim[r])
    for r in range(2):
        (tag / rank(r)).rename(tag / rank(r).replace("bf16_", ""))
    sd = torch.load(tag / rank(0).replace("bf16_", ""), weights_only=False)
    sd["optimizer_state_dict"]["param_slice_mappings"][0]["model.embed_tokens.weight"].start += 1
    torch.save(sd, tag / rank(0).replace("bf16_", ""))
    _native_error(capsys, tmp_path, r"global_step6/zero_pp_rank_0_mp_rank_00_optim_states\.pt: "
                                    r"param_slice_mappings place 'model\.embed_tokens\.weight' at .* "
                                    r"a DeepSpeed layout relex does not know")


def test_native_refuses_zero3(tmp_path, capsys):
    _synthetic_run(tmp_path, 2)
    for s in STEPS:
        tag = tmp_path / "run" / f"global_step{s}"
        (tag / "mp_rank_00_model_states.pt").rename(
            tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    _native_error(capsys, tmp_path, r"global_step2: a DeepSpeed ZeRO-3 checkpoint .*"
                                    r"zero_to_fp32\.py")


def test_native_trainer_layout(tmp_path):
    """transformers Trainer + DeepSpeed: `checkpoint-N/` with model.safetensors, trainer state
    and the tag directory `global_stepN/`: the whole checkpoint-N/ is copied and the HF weights,
    the module and the masters all get the extrapolation."""
    pytest.importorskip("deepspeed")
    import json
    import shutil

    from conftest import save_checkpoint
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import Qwen2Config

    import relex
    _synthetic_run(tmp_path, 2)
    run = tmp_path / "trainer"
    for s in STEPS:
        ckpt = run / f"checkpoint-{s}"
        shutil.copytree(tmp_path / "run" / f"global_step{s}", ckpt / f"global_step{s}")
        module = torch.load(ckpt / f"global_step{s}" / "mp_rank_00_model_states.pt",
                            weights_only=False)["module"]
        save_checkpoint(ckpt, dict(module), Qwen2Config(**CONFIG).to_dict(), None)
        (ckpt / "latest").write_text(f"global_step{s}")
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": s}))
    relex.extrapolate(run, base=tmp_path / "base", targets=[TARGET], output=tmp_path / "out",
                      output_format="native", progress=False)
    relex.extrapolate(run, base=tmp_path / "base", targets=[TARGET], output=tmp_path / "hf",
                      dtype="fp32", progress=False)
    out = tmp_path / "out" / f"step-{TARGET}" / f"checkpoint-{STEPS[-1]}"
    assert (out / "trainer_state.json").read_text() == json.dumps({"global_step": STEPS[-1]})
    hf = load_dir(tmp_path / "hf" / f"step-{TARGET}")
    masters = get_fp32_state_dict_from_zero_checkpoint(out, tag=f"global_step{STEPS[-1]}")
    weights = load_dir(out)
    for n, t in hf.items():
        assert torch.equal(masters[n], t) and torch.equal(weights[n], t.to(torch.bfloat16)), n
