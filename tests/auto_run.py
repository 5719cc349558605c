"""One rank of the 2-rank jump="auto" test (tests/test_sizing.py starts two with torchrun).

A tiny Llama, FSDP2-sharded on a CPU gloo group (each rank holds a different half of every
weight), trains with Adam on rank-dependent data; each rank reports a different training reward
(rank 0 above, rank 1 below the shared trend), so only pooled quantities can make the ranks
agree. Each rank saves its Accelerator's decisions and jumps to OUT/rank{R}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import relex

out = Path(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=8, head_dim=4, intermediate_size=9,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=32))
mesh = init_device_mesh("cpu", (2,))
for layer in m.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(m, mesh=mesh)
opt = torch.optim.Adam(m.parameters(), lr=3e-3)
acc = relex.Accelerator(m, cycle=6, every=2, jump="auto", guard_steps=2, optimizer=opt)
g = torch.Generator().manual_seed(100 + rank)
ids = torch.randint(0, 37, (2, 8), generator=g)
for step in range(1, 37):
    loss = m(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    reward = min(1.0, 0.02 * step) + (0.1 if rank == 0 else -0.1)
    acc.step(step, reward=reward, optimizer=opt)
torch.save({"decisions": [(s, d.size, d.reason, d.horizon) for s, d in acc.decisions],
            "jumps": [j.as_dict() for j in acc.jumps], "disabled": acc.disabled,
            "skipped": acc.skipped}, out / f"rank{rank}.pt")
dist.barrier()  # both ranks done before the group goes (gloo aborts a rank that leaves first)
dist.destroy_process_group()
