"""One rank of the sharded Accelerator test (tests/test_accelerate_sharded.py starts two).

    torchrun --nproc-per-node 2 tests/sharded_run.py LAYOUT OUT [SNAPSHOT_DTYPE [SPILL]]
    RELEX_VIA_VERL=1 torchrun ... fsdp2 OUT     (in an environment with verl)

LAYOUT: fsdp2 | hsdp | zero2 | zero3. A tiny Llama (hidden 7, so shards are uneven and ZeRO-3
partitions padded; one (1, 5) parameter, so FSDP2 gives rank 1 an empty shard) trains with Adam
on rank-dependent data; relex.Accelerator (cycle 6, every 2, jump 12, guard 1 step) runs four
cycles: A jumps and is kept; B jumps and the guard rolls it back (the reward drops); C is skipped
because rank 1 fails (its snapshot directory is full, it runs out of memory storing a snapshot
(fsdp2), or its parameter names differ); D is
skipped because rank 1's shard holds a NaN. Each rank saves, gathered to full tensors: the fp32
masters at every step (before relex acts) and right after each acc.step that jumped or rolled
back, the 16-bit weights the next forward uses, optimizer-state identities and step counts, and
its Accelerator's records. With RELEX_VIA_VERL=1 the Accelerator is created and stepped the way
relex's verl trainer mode does it: through verl's own `Worker.execute_with_func_generator` on a
verl Worker whose `actor.engine` holds the module and optimizer, as verl's FSDP engine does.
"""

import errno
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import relex
import relex.output.model

layout, out = sys.argv[1], Path(sys.argv[2])
dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
spill = len(sys.argv) > 4
torch.set_num_threads(1)
CYCLE, EVERY, JUMP = 6, 2, 12


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=37, hidden_size=7, head_dim=4, intermediate_size=9,
                      num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                      max_position_embeddings=32, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    m.extra = torch.nn.Parameter(torch.randn(1, 5))  # never in the forward: a zero trajectory
    return m


if layout in ("zero2", "zero3"):
    import deepspeed
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed("gloo")
    from deepspeed.utils import safe_get_full_fp32_param
else:
    dist.init_process_group("gloo")
rank = dist.get_rank()
m = model()
opt = torch.optim.Adam(m.parameters(), lr=1e-2)
if layout in ("fsdp2", "hsdp"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    mesh = (init_device_mesh("cpu", (2,)) if layout == "fsdp2" else
            init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    names = {id(p): n for n, p in m.named_parameters()}  # sharded DTensors, as the optimizer's
    engine, target = m, m
    fsdp = [x for x in m.modules() if isinstance(x, FSDPModule)]
else:
    conf = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
            "zero_optimization": {"stage": int(layout[-1]),
                                  "stage3_param_persistence_threshold": 50},
            "zero_allow_untested_optimizer": True}
    engine, dopt, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=conf)
    target = engine if layout == "zero2" else engine.module  # both entry points


def masters() -> dict[str, torch.Tensor]:
    """The fp32 master weights, gathered (a collective)."""
    if layout in ("fsdp2", "hsdp"):  # from the optimizer's DTensors: no reshard here, relex must
        return {names[id(p)]: p.full_tensor().detach().clone()  # do that itself
                for g in opt.param_groups for p in g["params"]}
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in m.named_parameters()}


def forward_weights() -> dict[str, torch.Tensor]:
    """The 16-bit weights the next forward computes with."""
    if layout in ("fsdp2", "hsdp"):
        for x in fsdp:
            x.unshard()
        got = {n: p.detach().clone() for n, p in m.named_parameters()}
        for x in fsdp:
            x.reshard()
        return got
    if layout == "zero3":
        with deepspeed.zero.GatheredParameters(list(m.parameters())):
            return {n: p.detach().clone() for n, p in m.named_parameters()}
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def optimizer_state() -> dict:
    inner = opt if layout in ("fsdp2", "hsdp") else engine.optimizer.optimizer
    return {i: (id(s["exp_avg"]), int(s["step"])) for i, s in enumerate(inner.state.values())
            if s}


PWRITE = os.pwrite


def full_disk(fd, data, pos):
    raise OSError(errno.ENOSPC, "No space left on device")


g = torch.Generator().manual_seed(100 + rank)
ids = torch.randint(0, 37, (2, 8), generator=g)
options = dict(cycle=CYCLE, jump=JUMP, every=EVERY, guard_steps=1, guard_margin=0.05,
               snapshot_dtype=dtype, snapshot_dir=str(out / f"snaps{rank}") if spill else None)
via_verl = os.environ.get("RELEX_VIA_VERL") == "1"
if via_verl:
    from types import SimpleNamespace

    from verl.single_controller.base import Worker

    from relex.integrations import verl as plugin

    worker = Worker()
    worker.actor = SimpleNamespace(engine=SimpleNamespace(module=target, optimizer=opt))
    options = plugin.options({"relex": options})
    assert worker.execute_with_func_generator(plugin.worker_start, 0, options) is None
    acc = worker._relex
else:
    acc = relex.Accelerator(target, **options)
record = {"kind": acc.layout.kind, "masters": {0: masters()}, "after": {}, "forward": {},
          "opt": {}, "pre_jump_files": {}}
for step in range(1, 4 * CYCLE + 2):
    if layout in ("fsdp2", "hsdp"):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # an eval forward: the root keeps unsharded copies (reshard pitfall)
            m(input_ids=ids)
    else:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    record["masters"][step] = masters()
    reward = 0.0 if step == 2 * CYCLE + 1 else 0.5  # the step after jump B: the guard drops it
    if step == 3 * CYCLE + 1:  # cycle C: rank 1 fails
        if spill and rank == 1:
            relex.output.model.os.pwrite = full_disk
        elif rank == 1 and layout == "fsdp2":  # out of host memory while storing a snapshot
            real_add = acc.store.add

            def no_memory(parts):
                acc.store.add = real_add
                raise MemoryError("simulated: no host memory for the snapshot")
            acc.store.add = no_memory
        elif rank == 1:
            acc._shapes[0] = ("renamed",) + acc._shapes[0][1:]
    if step == 3 * CYCLE + 2:
        relex.output.model.os.pwrite = PWRITE
    if step == 4 * CYCLE + 1 and rank == 1:  # cycle D: a NaN in rank 1's shard
        part = next(p for p in acc._parts() if p.tensor.numel())
        with torch.no_grad():
            part.tensor[0] = float("nan")
            if part.flush is not None:
                part.flush()
    before = optimizer_state()
    jumps, rolled = len(acc.jumps), sum(j.rolled_back for j in acc.jumps)
    if via_verl:
        got = worker.execute_with_func_generator(plugin.worker_step, step, reward)
        assert got["virtual_step"] == acc.virtual_step and got["disabled"] is None
    else:
        acc.step(step, reward=reward, optimizer=engine.optimizer if layout == "zero2" else opt)
    if len(acc.jumps) != jumps or sum(j.rolled_back for j in acc.jumps) != rolled:
        record["after"][step] = masters()
        record["forward"][step] = forward_weights()
        record["opt"][step] = (before, optimizer_state())
        if spill:
            record["pre_jump_files"][step] = sorted(
                str(f.relative_to(out)) for f in (out / f"snaps{rank}").rglob("*.safetensors"))
record.update(jumps=[j.as_dict() for j in acc.jumps], skipped=acc.skipped,
              disabled=acc.disabled, files_left=sorted(
                  str(f.relative_to(out)) for f in (out / f"snaps{rank}").rglob("*.safetensors")))
torch.save(record, out / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
