"""Native trainer checkpoints read in place: verl FSDP rank files, torch DCP directories, DeepSpeed.

The fixture trajectory is written once per module by the real libraries: a tiny Qwen2 sharded
with torch FSDP2 `fully_shard` on a 2-process gloo group on CPU (1-D mesh, and an HSDP mesh
(2, 1) whose replicate dim makes rank 1 a copy of rank 0),
saved exactly as verl saves (`torch.save(model.state_dict())` per rank, fsdp_config.json,
huggingface/ with config and tokenizer), and with `torch.distributed.checkpoint.save` as
accelerate (`{"model": state_dict}` in checkpoint-N/pytorch_model_fsdp_0) and NeMo-RL v1
(`{"model": ModelState}` in step_N/policy/weights) save. The config is TINY with vocab 97 and
intermediate 65, so 2-way shards are uneven. Every output is compared with the output from the
HF export of the same trajectory (byte for byte) and with the float64 reference.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    assert_within_ulp,
    load_dir,
    reference,
    save_checkpoint,
    trajectory_state,
    write_tokenizer,
)
from safetensors.torch import load_file

import relex
from relex.errors import RelexError
from relex.formats import detect, open_reader

STEPS = (2, 4, 6, 8)
WORLD = 2
CONFIG = dict(TINY, vocab_size=97, intermediate_size=65)


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **CONFIG))


# --------------------------------------------------------------------- the distributed writer
def _worker(rank: int, root: str) -> None:
    """One rank: shard the model, load each step's HF weights, save as verl / DCP do."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import (
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )
    root = Path(root)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank,
                            world_size=WORLD)
    try:
        mesh1 = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
        mesh2 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("ddp", "fsdp"))
        models = {}
        for kind, mesh in (("fsdp2", mesh1), ("hsdp", mesh2)):
            model = _model()
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            models[kind] = fully_shard(model, mesh=mesh)
        for step in STEPS:
            full = load_file(str(root / "hf" / f"global_step_{step}/actor/huggingface"
                                 / "model.safetensors"))
            for kind, mesh in (("fsdp2", mesh1), ("hsdp", mesh2)):
                model = models[kind]
                placements = [Shard(0)] if kind == "fsdp2" else [Replicate(), Shard(0)]
                model.load_state_dict({k: distribute_tensor(v, mesh, placements)
                                       for k, v in full.items()})
                actor = root / kind / f"global_step_{step}" / "actor"
                torch.save(model.state_dict(),
                           actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
            sd = models["fsdp2"].state_dict()
            dcp.save({"model": sd}, checkpoint_id=root / "accel" / f"checkpoint-{step}"
                     / "pytorch_model_fsdp_0")
            dcp.save({"model": get_model_state_dict(models["hsdp"])},
                     checkpoint_id=root / "nemo" / f"step_{step}" / "policy" / "weights")
        # odd shapes: uneven and empty shards, a non-zero shard dim, plain tensors
        g = torch.Generator().manual_seed(5)
        odd = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(2, 3, generator=g),
               "c": torch.randn(3, 7, generator=g), "d": torch.randn(10, generator=g),
               "e": torch.randn(4, generator=g).to(torch.bfloat16),
               "f": torch.randn(1, 3, generator=g), "h": torch.randn(3, generator=g)}
        state = {"a": distribute_tensor(odd["a"], mesh1, [Shard(0)]),
                 "b": distribute_tensor(odd["b"], mesh1, [Shard(0)]),
                 "c": distribute_tensor(odd["c"], mesh1, [Shard(1)]),
                 "d": distribute_tensor(odd["d"], mesh2, [Replicate(), Shard(0)]),
                 "e": odd["e"], "f": distribute_tensor(odd["f"], mesh1, [Shard(0)]),
                 "h": distribute_tensor(odd["h"], mesh1, [Shard(0)])}
        if rank == 0:
            torch.save(odd, root / "odd_full.pt")
        torch.save(state, root / "odd" / f"model_world_size_{WORLD}_rank_{rank}.pt")
        dcp.save({"model": {k: v for k, v in state.items() if k != "d"}},
                 checkpoint_id=root / "odd_dcp")
    finally:
        dist.destroy_process_group()


def _hf_run(root: Path) -> Path:
    """Base + HF checkpoints of a synthetic trajectory (verl layout with HF weights)."""
    model = _model()
    config = model.config.to_dict()
    write_tokenizer(root / "tok")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_checkpoint(root / "base", base, config, torch.float32, tokenizer_from=root / "tok")
    stored = load_dir(root / "base")
    for step in STEPS:
        save_checkpoint(root / "hf" / f"global_step_{step}/actor/huggingface",
                        trajectory_state(stored, step), config, torch.float32,
                        tokenizer_from=root / "tok")
    return root / "hf"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    _hf_run(root)
    for kind in ("fsdp2", "hsdp"):
        for step in STEPS:
            actor = root / kind / f"global_step_{step}" / "actor"
            (actor / "huggingface").mkdir(parents=True)
            for f in (root / "hf" / f"global_step_{step}/actor/huggingface").iterdir():
                if not f.name.endswith(".safetensors"):  # config + tokenizer, no weights
                    shutil.copy(f, actor / "huggingface" / f.name)
            (actor / "fsdp_config.json").write_text(json.dumps(
                {"FSDP_version": 2, "world_size": WORLD}))
    (root / "odd").mkdir()
    for step in STEPS:  # accelerate writes config.json beside pytorch_model_fsdp_0
        (root / "accel" / f"checkpoint-{step}").mkdir(parents=True)
        shutil.copy(root / "base" / "config.json", root / "accel" / f"checkpoint-{step}")
    # fork: the ranks inherit torch and transformers already imported here (spawn re-imports
    # them in every rank, 10-30 s on a busy 2-core machine)
    torch.multiprocessing.start_processes(_worker, args=(str(root),), nprocs=WORLD, join=True,
                                          start_method="fork")
    return root


def _extrapolate(run, base, out, **kw):
    return relex.extrapolate(run, base=base, targets=[12, 20], output=out, progress=False,
                             **kw)


def _same_outputs(a: Path, b: Path) -> None:
    for step in (12, 20):
        x, y = load_dir(a / f"step-{step}"), load_dir(b / f"step-{step}")
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def hf_out(runs):
    out = runs / "out-hf"
    _extrapolate(runs / "hf", runs / "base", out)
    base = load_dir(runs / "base")
    ckpts = [load_dir(runs / "hf" / f"global_step_{s}/actor/huggingface") for s in STEPS]
    refs = reference(base, ckpts, STEPS, [12, 20])
    for step, ref in zip((12, 20), refs):
        got = load_dir(out / f"step-{step}")
        for k, v in ref.items():
            assert_within_ulp(got[k], v, k, base[k].double().numpy())
    return out


# --------------------------------------------------------------------- verl FSDP
@pytest.mark.parametrize("kind", ["fsdp2", "hsdp"])
def test_verl_shards_equal_hf_export(runs, hf_out, kind):
    actor = runs / kind / "global_step_2" / "actor"
    assert detect(actor).NAME == "verl_fsdp"
    with open_reader(actor) as r:
        hf = load_dir(runs / "hf" / "global_step_2/actor/huggingface")
        assert r.tensors.keys() == hf.keys() and r.meta_dir == actor / "huggingface"
        for name, t in hf.items():
            assert torch.equal(r.read(name, 0, t.numel()).view(t.shape), t), name
        # HSDP: rank 1 holds a replica, so only rank 0 is opened
        assert len(r.files()) == (WORLD if kind == "fsdp2" else 1)
    out = runs / f"out-{kind}"
    _extrapolate(runs / kind, runs / "base", out)
    _same_outputs(out, hf_out)
    assert json.loads((out / "step-12" / "config.json").read_text())["vocab_size"] == 97


def test_odd_shards_match_torch_load(runs):
    """Uneven and empty shards, Shard(1), HSDP and plain tensors: every element range equals
    torch's own full tensor (ranges inside one shard, across shards, single elements)."""
    full = torch.load(runs / "odd_full.pt", weights_only=True, mmap=True)
    with open_reader(runs / "odd") as r:
        assert r.meta_dir is None
        for name, t in full.items():
            flat = t.reshape(-1)
            assert r.tensors[name].shape == tuple(t.shape) and r.tensors[name].dtype in (
                "F32", "BF16")
            n = flat.numel()
            for a in range(n):
                for b in range(a + 1, n + 1):
                    assert torch.equal(r.read(name, a, b), flat[a:b]), (name, a, b)
            r.release(name, 0, n)


def test_reader_matches_torch_load_of_rank_file(runs):
    """The restricted unpickler sees the same local tensors as torch.load(weights_only)."""
    from relex.formats.base import MappedFiles
    from relex.formats.torchzip import load
    file = runs / "fsdp2" / "global_step_4" / "actor" / f"model_world_size_{WORLD}_rank_1.pt"
    ours = load(file)
    theirs = torch.load(file, weights_only=True, mmap=True, map_location="cpu")
    maps = MappedFiles()
    for name, dt in theirs.items():
        local = ours[name].get("_local_tensor")
        assert torch.equal(local.view(maps), dt._local_tensor), name
        assert local.stride == dt._local_tensor.stride()
    maps.close()


# --------------------------------------------------------------------- torch DCP
@pytest.mark.parametrize("kind,rel", [("accel", "checkpoint-{}/pytorch_model_fsdp_0"),
                                      ("nemo", "step_{}/policy/weights")])
def test_dcp_equal_hf_export(runs, hf_out, kind, rel):
    ckpt = runs / kind / rel.format(2)
    assert detect(ckpt).NAME == "dcp"
    hf = load_dir(runs / "hf" / "global_step_2/actor/huggingface")
    with open_reader(ckpt) as r:
        assert r.tensors.keys() == hf.keys()
        for name, t in hf.items():
            assert torch.equal(r.read(name, 0, t.numel()).view(t.shape), t), name
        assert r.meta_dir == (ckpt.parent if kind == "accel" else None)
    out = runs / f"out-{kind}"
    _extrapolate(runs / kind, runs / "base", out)
    _same_outputs(out, hf_out)


def test_dcp_boxes_match_torch(runs):
    """Column-sharded (Shard(1)) and uneven chunks assemble to torch's full tensors."""
    full = torch.load(runs / "odd_full.pt", weights_only=True)
    with open_reader(runs / "odd_dcp") as r:
        for name in ("a", "b", "c", "e", "f", "h"):
            flat = full[name].reshape(-1)
            n = flat.numel()
            for a in range(n):
                for b in range(a + 1, n + 1):
                    assert torch.equal(r.read(name, a, b), flat[a:b]), (name, a, b)


# --------------------------------------------------------------------- mixed layouts
def test_mixed_layouts_equal_all_hf(runs, hf_out, tmp_path):
    """Discovered run with steps 2, 6 as verl FSDP2 shards, 4 as HSDP shards, 8 as HF; and
    explicit checkpoints mixing verl, accelerate DCP, NeMo-RL DCP and HF: same output as all-HF."""
    run = tmp_path / "mixed"
    for step, src in ((2, runs / "fsdp2" / "global_step_2"),
                      (4, runs / "hsdp" / "global_step_4"),
                      (6, runs / "fsdp2" / "global_step_6"),
                      (8, runs / "hf" / "global_step_8")):
        shutil.copytree(src, run / f"global_step_{step}")
    out = tmp_path / "out"
    _extrapolate(run, runs / "base", out)
    _same_outputs(out, hf_out)
    rep = relex.extrapolate(checkpoints={2: runs / "fsdp2/global_step_2/actor",
                                         4: runs / "accel/checkpoint-4/pytorch_model_fsdp_0",
                                         6: runs / "nemo/step_6/policy/weights",
                                         8: runs / "hf/global_step_8/actor/huggingface"},
                            base=runs / "base", targets=[12, 20], output=tmp_path / "out2",
                            progress=False)
    assert rep.observed_steps == list(STEPS)
    _same_outputs(tmp_path / "out2", hf_out)


# --------------------------------------------------------------------- bad input
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rezip(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """Rewrite a torch.save archive with some members replaced (all stored uncompressed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = next((v for k, v in replace.items() if info.filename.endswith(k)),
                        zin.read(info))
            zout.writestr(info.filename, data)


def _small_run(runs, tmp_path, kind="fsdp2", steps=(2, 4)) -> Path:
    run = tmp_path / "run"
    for step in steps:
        src = {"fsdp2": runs / "fsdp2" / f"global_step_{step}",
               "accel": runs / "accel" / f"checkpoint-{step}"}[kind]
        shutil.copytree(src, run / src.name)
    shutil.copytree(runs / "base", tmp_path / "base")
    return run


def _cli_error(capsys, tmp_path, pattern):
    from test_errors import expect_error
    out = tmp_path / "out"
    expect_error(capsys, ["extrapolate", tmp_path / "run", "--base", tmp_path / "base",
                          "--target", "30", "--output", out, "-q"], tmp_path, pattern, out)


def _rank(run, step=2, rank=0):
    return run / f"global_step_{step}" / "actor" / f"model_world_size_{WORLD}_rank_{rank}.pt"


def test_verl_truncated(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path)
    f = _rank(run, 4, 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _cli_error(capsys, tmp_path, r"rank_1\.pt: corrupt or truncated torch\.save archive")


def test_verl_corrupt_pickle(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path)
    f = _rank(run)
    raw = bytearray(f.read_bytes())
    i = raw.index(b"_local_tensor")
    raw[i: i + 4] = b"\xff\xfe\x00\x01"  # the zip's CRC no longer matches
    f.write_bytes(bytes(raw))
    _cli_error(capsys, tmp_path, r"rank_0\.pt: corrupt data\.pkl")


def test_verl_hostile_pickle_is_refused_not_run(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path)
    marker = tmp_path / "pwned"
    f = _rank(run, 4, 0)
    _rezip(f, f.with_suffix(".tmp"), {"/data.pkl": pickle.dumps({"x": _Evil(marker)},
                                                                protocol=2)})
    f.with_suffix(".tmp").replace(f)
    _cli_error(capsys, tmp_path, r"rank_0\.pt: refusing to unpickle global 'posix\.system'")
    assert not marker.exists()


def test_verl_world_size_mismatch_and_missing_rank(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path)
    cfg = run / "global_step_2" / "actor" / "fsdp_config.json"
    cfg.write_text(json.dumps({"FSDP_version": 2, "world_size": 8}))
    _cli_error(capsys, tmp_path, r"fsdp_config\.json: world_size 8 but the rank files say "
                                 r"model_world_size_2")
    cfg.write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    _rank(run, 4, 1).unlink()
    _cli_error(capsys, tmp_path, r"global_step_4/actor: model_world_size_2_rank_1\.pt is missing")


def test_verl_shard_from_other_save(runs, tmp_path, capsys):
    """A rank file of the odd-shapes save beside rank 0 of a model: refused, names the file."""
    run = _small_run(runs, tmp_path)
    shutil.copy(runs / "odd" / f"model_world_size_{WORLD}_rank_1.pt", _rank(run, 2, 1))
    _cli_error(capsys, tmp_path, r"rank_1\.pt: tensor '.*' is in this rank file or in "
                                 r"model_world_size_2_rank_0\.pt but not both")


def test_dcp_hostile_metadata(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path, "accel")
    marker = tmp_path / "pwned"
    md = run / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata"
    md.write_bytes(pickle.dumps(_Evil(marker)))
    _cli_error(capsys, tmp_path, r"\.metadata: refusing to unpickle global 'posix\.system'")
    assert not marker.exists()


def test_dcp_path_escaping_directory(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path, "accel")
    d = run / "checkpoint-4" / "pytorch_model_fsdp_0"
    md = pickle.loads((d / ".metadata").read_bytes())  # our own file: trusted here
    info = next(iter(md.storage_data.values()))
    shutil.copy(d / info.relative_path, tmp_path / "outside.distcp")
    info.relative_path = "../../../outside.distcp"
    (d / ".metadata").write_bytes(pickle.dumps(md))
    _cli_error(capsys, tmp_path, r"storage path '\.\./\.\./\.\./outside\.distcp' .* escapes the "
                                 r"checkpoint directory")


def test_dcp_truncated_and_missing(runs, tmp_path, capsys):
    run = _small_run(runs, tmp_path, "accel")
    d = run / "checkpoint-4" / "pytorch_model_fsdp_0"
    f = d / "__1_0.distcp"
    f.write_bytes(f.read_bytes()[:1000])
    _cli_error(capsys, tmp_path, r"__1_0\.distcp \(bytes \d+-\d+, tensor '.*'\): truncated")
    f.unlink()
    _cli_error(capsys, tmp_path, r"__1_0\.distcp: missing")


def test_dcp_hint_names_accelerate_merge_weights(tmp_path):
    from relex.checkpoints.discover import LAYOUTS, converter_hint
    d = tmp_path / "checkpoint-5"
    (d / "pytorch_model_fsdp_0").mkdir(parents=True)
    hint = converter_hint(d, next(x for x in LAYOUTS if x.trainer.startswith("TRL")))
    assert hint.startswith(f"accelerate merge-weights {d}/pytorch_model_fsdp_0 {d}-merged")


def test_strided_shard_is_refused(runs, tmp_path):
    """FSDP + TP (_StridedShard) placements: one line naming the file and verl's merger."""
    from relex.formats.verl_fsdp import VerlFSDPReader
    actor = tmp_path / "actor"
    actor.mkdir()
    for rank in range(WORLD):
        src = runs / "odd" / f"model_world_size_{WORLD}_rank_{rank}.pt"
        with zipfile.ZipFile(src) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            pkl = z.read(name).replace(b"placement_types\nShard\n",
                                       b"placement_types\n_StridedShard\n")
        _rezip(src, actor / src.name, {"/data.pkl": pkl})
    with pytest.raises(RelexError, match=r"rank_0\.pt: tensor 'a' has a _StridedShard placement "
                                         r".*verl's merger"):
        VerlFSDPReader(actor)


# --------------------------------------------------------------------- DeepSpeed
def _ds_states(module: dict, step: int, stage: int = 2) -> dict:
    """DeepSpeed's engine._common_checkpoint_state layout (deepspeed 0.19 runtime/engine.py)."""
    from collections import OrderedDict
    return {"module": OrderedDict(module), "buffer_names": [], "optimizer": None,
            "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items())],
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "lr_scheduler": {"base_lrs": [1e-6], "last_epoch": step, "lr_lambdas": [None]},
            "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(),
            "skipped_steps": 0, "global_steps": step, "global_samples": 8 * step,
            "dp_world_size": 2, "mp_world_size": 1, "ds_version": "0.19.8",
            "ds_config": {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}}


def test_deepspeed_zero2_equals_hf_export(runs, tmp_path):
    """OpenRLHF layout `_actor/global_stepN/mp_rank_00_model_states.pt` (ZeRO-2, bf16 module).
    Written with torch.save to DeepSpeed's layout (engine._common_checkpoint_state): a real
    deepspeed engine on CPU takes minutes to start (it builds a C++ op), see the slow test."""
    hf_run, ds_run = tmp_path / "hf", tmp_path / "ckpt"
    config = json.loads((runs / "base" / "config.json").read_text())
    for step in STEPS:
        state = load_dir(runs / "hf" / f"global_step_{step}/actor/huggingface")
        bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
        save_checkpoint(hf_run / f"global_step{step}_hf", bf16, config, None)
        tag = ds_run / "_actor" / f"global_step{step}"
        tag.mkdir(parents=True)
        torch.save(_ds_states(bf16, step), tag / "mp_rank_00_model_states.pt")
    (ds_run / "_actor" / "latest").write_text(f"global_step{STEPS[-1]}")
    assert detect(ds_run / "_actor" / "global_step2").NAME == "deepspeed"
    _extrapolate(hf_run, runs / "base", tmp_path / "out-hf")
    _extrapolate(ds_run, runs / "base", tmp_path / "out-ds")
    _same_outputs(tmp_path / "out-ds", tmp_path / "out-hf")
    base = load_dir(runs / "base")
    ckpts = [load_dir(hf_run / f"global_step{s}_hf") for s in STEPS]
    for step, ref in zip((12, 20), reference(base, ckpts, STEPS, [12, 20])):
        got = load_dir(tmp_path / "out-ds" / f"step-{step}")
        for k, v in ref.items():
            assert_within_ulp(got[k], v, k, base[k].double().numpy())


def test_deepspeed_zero3_and_hostile(runs, tmp_path, capsys):
    for step in (2, 4):
        tag = tmp_path / "run" / "_actor" / f"global_step{step}"
        tag.mkdir(parents=True)
        torch.save({"module": {}}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    tag = tmp_path / "run" / "_actor" / "global_step2"
    shutil.copytree(runs / "base", tmp_path / "base")
    _cli_error(capsys, tmp_path, r"global_step2: a DeepSpeed ZeRO-3 checkpoint .* python "
                                 r".*/_actor/zero_to_fp32\.py .*/_actor .*--tag global_step2")
    for step in (2, 4):
        (tag.parent / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    shutil.copytree(tag, tag.parent / "global_step4", dirs_exist_ok=True)
    marker = tmp_path / "pwned"
    state = _ds_states({"w": torch.ones(2)}, 2)
    state["lr_scheduler"] = _Evil(marker)
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    torch.save(_ds_states({"w": torch.ones(2)}, 4),
               tag.parent / "global_step4" / "mp_rank_00_model_states.pt")
    _cli_error(capsys, tmp_path, r"mp_rank_00_model_states\.pt: refusing to unpickle global "
                                 r"'posix\.system'")
    assert not marker.exists()


_DS_SCRIPT = """
import os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
sys.path.insert(0, sys.argv[2])
from conftest import tiny_model
import deepspeed
model = tiny_model()
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
       "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3,
       "torch_adam": True}}}
deepspeed.init_distributed(dist_backend="gloo")
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
x = torch.randint(0, 96, (1, 8))
engine.backward(engine(input_ids=x, labels=x).loss)
engine.step()
engine.save_checkpoint(sys.argv[1], tag="global_step1")
"""


@pytest.mark.slow
def test_real_deepspeed_zero2_checkpoint(tmp_path):
    """A checkpoint written by deepspeed itself (ZeRO-2, bf16, CPU accelerator) reads as
    torch.load sees its module. Minutes: deepspeed builds its shm comm op on first use."""
    pytest.importorskip("deepspeed")
    subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(tmp_path / "ckpt"),
                    str(Path(__file__).parent)], check=True, timeout=900)
    tag = tmp_path / "ckpt" / "global_step1"
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    with open_reader(tag) as r:
        assert r.format == "deepspeed" and r.tensors.keys() == module.keys()
        for name, t in module.items():
            assert torch.equal(r.read(name, 0, t.numel()), t.reshape(-1)), name


# --------------------------------------------------------- torch.save reader hardening
def _boxes(tmp_path, boxes):
    """A (2, 4) float32 global tensor stored as (2, 2) boxes at the given offsets."""
    from relex.formats.base import MappedFiles
    from relex.formats.chunked import Chunk, ChunkedTensor
    from relex.formats.unpickler import Storage, StoredTensor
    f = tmp_path / "data.bin"
    f.write_bytes(torch.arange(8, dtype=torch.float32).numpy().tobytes())
    st = Storage("0", torch.float32, 8, f, 0)
    chunks = [Chunk(offs, StoredTensor(st, 4 * i, (2, 2), (2, 1))) for i, offs in
              enumerate(boxes)]
    return ChunkedTensor("w", "F32", (2, 4), chunks, MappedFiles(), str(f))


def test_overlapping_nd_chunks_refused(tmp_path):
    """Two boxes at one offset and a gap of the same size: the element count is right, but the
    cover is not (read would return uninitialised memory)."""
    ct = _boxes(tmp_path, [(0, 0), (0, 2)])
    assert torch.equal(ct.read(0, 8), torch.tensor([0., 1, 4, 5, 2, 3, 6, 7]))
    with pytest.raises(RelexError, match=r"data\.bin: tensor 'w': chunks of shape \[2, 2\] at "
                                         r"\[0, 0\] and \[2, 2\] at \[0, 0\] overlap") as e:
        _boxes(tmp_path, [(0, 0), (0, 0)])
    assert "\n" not in str(e.value)
    with pytest.raises(RelexError, match="overlap"):
        _boxes(tmp_path, [(0, 1), (0, 2)])  # partly overlapping; column 0 left out


_LAZY = r"""
import sys
import torch
from relex.errors import RelexError
from relex.formats.unpickler import restricted_loads
lazy = ("torch._dynamo", "torch.onnx")
assert not any(m in sys.modules for m in lazy), [m for m in lazy if m in sys.modules]
for name in ("_dynamo", "onnx", "compile"):
    try:
        restricted_loads(b"\x80\x02ctorch\n" + name.encode() + b"\n.", "hostile.pkl")
    except RelexError as e:
        assert f"refusing to unpickle global 'torch.{name}'" in str(e), e
    else:
        raise SystemExit(f"torch.{name} was allowed")
assert restricted_loads(b"\x80\x02ctorch\nbfloat16\n.", "ok.pkl") is torch.bfloat16
assert restricted_loads(b"\x80\x02ctorch\nchannels_last\n.", "ok.pkl") is torch.channels_last
print([m for m in lazy if m in sys.modules])
"""


def test_refused_torch_global_imports_nothing():
    """Refusing `torch._dynamo` must not first import it (torch's lazy module __getattr__):
    in a fresh interpreter, so other tests' imports cannot mask it."""
    out = subprocess.run([sys.executable, "-c", _LAZY], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_deeply_nested_pickle_is_one_error(tmp_path):
    from relex.formats.torchzip import load
    n = 100_000
    f = tmp_path / "deep.pt"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
        z.writestr("archive/byteorder", "little")
    with pytest.raises(RelexError, match=r"deep\.pt: the pickle nests more than 100 "
                                         r"levels deep") as e:
        load(f)
    assert "\n" not in str(e.value)
