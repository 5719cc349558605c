"""Native output for FSDP2 runs, loaded back the way the trainers load it, on 2 gloo processes.

A tiny Qwen2 is sharded with FSDP2 (and as HSDP, whose ranks each hold a replica) and trained
with Adam; every 2 steps each rank saves what verl saves (`global_step_N/actor/` model, optim
and extra-state rank files, `data.pt`, `latest_checkpointed_iteration.txt`) and what accelerate
saves (`checkpoint-N/pytorch_model_fsdp_0/` and `optimizer_0/` DCP directories). relex writes
the target natively; a second pair of processes loads it as the trainers do (torch.load of the
rank files + load_state_dict; dcp.load + set_model_state_dict / set_optimizer_state_dict) and
reports the full weights and Adam moments it resumed with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import relex

from conftest import TINY, load_dir

WORLD = 2
STEPS = (2, 4, 6, 8)
CONFIG = dict(TINY, vocab_size=97, intermediate_size=65)  # uneven shards


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **CONFIG))


def _sharded(kind: str):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    mesh = (init_device_mesh("cpu", (WORLD,)) if kind == "fsdp2" else
            init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ddp", "fsdp")))
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _full(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().detach().clone() if hasattr(v, "full_tensor") else v.clone()
            for k, v in model.state_dict().items()}


def _moments(model, opt) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    sd = get_optimizer_state_dict(model, opt)["state"]
    return {f"{k}.{m}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for k, s in sd.items() for m, v in s.items()}


def _train(rank: int, root: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    for kind in ("fsdp2", "hsdp"):
        g = torch.Generator().manual_seed(10 + rank)
        model, opt = _sharded(kind)
        full = _full(model)
        if rank == 0 and kind == "fsdp2":
            save_file(full, str(root / "base" / "model.safetensors"))
        for step in range(1, STEPS[-1] + 1):
            ids = torch.randint(0, CONFIG["vocab_size"], (4, 10), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if step not in STEPS:
                continue
            actor = root / kind / f"global_step_{step}" / "actor"
            torch.save(model.state_dict(), actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
            torch.save(opt.state_dict(), actor / f"optim_world_size_{WORLD}_rank_{rank}.pt")
            torch.save({"rng": torch.get_rng_state()},
                       actor / f"extra_state_world_size_{WORLD}_rank_{rank}.pt")
            if kind == "fsdp2":
                ckpt = root / "accel" / f"checkpoint-{step}"
                dcp.save({"model": get_model_state_dict(model)},
                         checkpoint_id=ckpt / "pytorch_model_fsdp_0")
                dcp.save({"optimizer": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=ckpt / "optimizer_0")
        # the last real state, as a resumed run must see it
        torch.save({"weights": _full(model), "moments": _moments(model, opt)},
                   root / f"last_{kind}_{rank}.pt")


def _resume(rank: int, root: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    seen = {}
    for kind in ("fsdp2", "hsdp"):  # verl: each rank loads its own files
        model, opt = _sharded(kind)
        actor = root / "out" / kind / "step-16" / "global_step_8" / "actor"
        model.load_state_dict(torch.load(actor / f"model_world_size_{WORLD}_rank_{rank}.pt",
                                         weights_only=False))
        opt.load_state_dict(torch.load(actor / f"optim_world_size_{WORLD}_rank_{rank}.pt",
                                       weights_only=False))
        seen[kind] = {"weights": _full(model), "moments": _moments(model, opt)}
    model, opt = _sharded("fsdp2")  # accelerate: DCP
    ckpt = root / "out" / "accel" / "step-16" / "checkpoint-8"
    sd = {"model": get_model_state_dict(model)}
    dcp.load(sd, checkpoint_id=ckpt / "pytorch_model_fsdp_0")
    set_model_state_dict(model, sd["model"])
    osd = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(osd, checkpoint_id=ckpt / "optimizer_0")
    set_optimizer_state_dict(model, opt, osd["optimizer"])
    seen["accel"] = {"weights": _full(model), "moments": _moments(model, opt)}
    torch.save(seen, root / f"resumed_{rank}.pt")


def _worker(rank: int, root: str, phase: str) -> None:
    import torch.distributed as dist
    root = Path(root)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg-{phase}", rank=rank,
                            world_size=WORLD)
    try:
        (_train if phase == "train" else _resume)(rank, root)
    finally:
        dist.destroy_process_group()


def _spawn(root: Path, phase: str) -> None:
    torch.multiprocessing.start_processes(_worker, args=(str(root), phase), nprocs=WORLD,
                                          join=True, start_method="fork")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-fsdp")
    (root / "base").mkdir()
    (root / "base" / "config.json").write_text(json.dumps(_model().config.to_dict()))
    for kind in ("fsdp2", "hsdp"):
        for step in STEPS:
            actor = root / kind / f"global_step_{step}" / "actor"
            (actor / "huggingface").mkdir(parents=True)
            (actor / "huggingface" / "config.json").write_text(
                (root / "base" / "config.json").read_text())
            torch.save({"dataloader": {"epoch": 0, "index": step}},
                       root / kind / f"global_step_{step}" / "data.pt")
        (root / kind / "latest_checkpointed_iteration.txt").write_text(str(STEPS[-1]))
    for step in STEPS:
        (root / "accel" / f"checkpoint-{step}").mkdir(parents=True)
        (root / "accel" / f"checkpoint-{step}" / "config.json").write_text(
            (root / "base" / "config.json").read_text())
    _spawn(root, "train")
    before = {f: f.read_bytes() for f in root.rglob("*") if f.is_file()}
    for kind in ("fsdp2", "hsdp", "accel"):
        relex.extrapolate(root / kind, base=root / "base", targets=[16],
                          output=root / "out" / kind, output_format="native", progress=False)
        relex.extrapolate(root / kind, base=root / "base", targets=[16],
                          output=root / "hf" / kind, progress=False)
    assert {f: f.read_bytes() for f in before} == before, "the input run changed"
    _spawn(root, "resume")
    return root


@pytest.mark.parametrize("kind", ["fsdp2", "hsdp", "accel"])
def test_fsdp2_resumes_from_native_output(resumed, kind):
    hf = load_dir(resumed / "hf" / kind / "step-16")
    for rank in range(WORLD):
        seen = torch.load(resumed / f"resumed_{rank}.pt", weights_only=False)[kind]
        last = torch.load(resumed / f"last_{'fsdp2' if kind == 'accel' else kind}_{rank}.pt",
                          weights_only=False)
        assert seen["weights"].keys() == hf.keys()
        for k, v in seen["weights"].items():
            assert torch.equal(v, hf[k]), (rank, k)
            assert not torch.equal(v, last["weights"][k]), (rank, k)
        assert seen["moments"].keys() == last["moments"].keys()
        for k, v in last["moments"].items():
            assert torch.equal(seen["moments"][k], v), (rank, k)


def test_verl_native_layout(resumed):
    out = resumed / "out" / "fsdp2" / "step-16"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "8"
    prov = json.loads((out / "relex.json").read_text())["native"]
    assert prov["resume"] == (f"verl: trainer.resume_mode=resume_path "
                              f"trainer.resume_from_path={out.resolve()}/global_step_8")
    src = resumed / "fsdp2" / "global_step_8"
    for f in src.rglob("*"):
        if f.is_file() and not f.name.startswith("model_world_size"):
            assert (out / "global_step_8" / f.relative_to(src)).read_bytes() == f.read_bytes()
    with relex.formats.open_reader(out / "global_step_8" / "actor") as r:
        assert r.checksums.enabled
        for name, meta in r.tensors.items():
            r.read(name, 0, meta.numel)
            r.release(name, 0, meta.numel)
        r.verify()  # every CRC-32 of the rewritten rank files holds
