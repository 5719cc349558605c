"""relex in the training loop: what snapshots cost in memory and time, and what 16-bit snapshots
do to the accelerated curve.

    python benchmarks/bench_accelerate.py demo [--seeds 0 1]
        The demo task (relex demo's GRPO run) with relex.Accelerator, cycle 20 / jump 40, 200
        real steps, float16 and float32 snapshots, per seed: real steps to reach 0.90 / 0.93 /
        0.945 / 0.952, best accuracy, and the largest accuracy difference between the two dtypes.
    python benchmarks/bench_accelerate.py sharded [--layers 12] [--steps 25]
        torchrun, 2 CPU processes, FSDP2 (bf16 compute, fp32 masters, Adam) on a Qwen2-shaped
        model of ~120M parameters: one launch per setting (no relex; float16 snapshots in RAM;
        float32 in RAM; float16 spilled to a directory), each printing per rank the peak RSS,
        relex's held bytes, the time of a training step, a snapshot step and the jump, in units
        of the rank's fp32 shard. Cycle 20, every 2, jump 40 (T = 10).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def demo(seeds: list[int]) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from relex.demo.run import BASE, accelerate
    torch.set_num_threads(1)
    rows = {}
    for seed in seeds:
        for dtype in ("float16", "float32"):
            started = time.perf_counter()
            r = accelerate(LlamaForCausalLM.from_pretrained(BASE), 200, seed, 20, 40, False,
                           snapshot_dtype=dtype, timing=True)
            curve = {p["real_step"]: p["accuracy"] for p in r["curve"]}
            reach = {t: next((s for s in sorted(curve) if curve[s] >= t - 5e-4), None)
                     for t in (0.90, 0.93, 0.945, 0.952)}
            rows[seed, dtype] = (curve, reach, r["snapshot_memory_mb"],
                                 time.perf_counter() - started)
            jump_s = sorted(j["seconds"] for j in r["jumps"])
            print(f"seed {seed} {dtype}: reach {reach}, best {max(curve.values()):.3f}, "
                  f"held {r['snapshot_memory_mb']} MB, {rows[seed, dtype][3]:.0f} s; a step "
                  f"{r['median_step_s']:.3f} s (median), a jump {jump_s[len(jump_s) // 2]:.3f} s "
                  f"(median of {len(jump_s)}): {jump_s[len(jump_s) // 2] / r['median_step_s']:.2f} "
                  f"steps", flush=True)
    print("\n| seed | snapshots | 0.90 | 0.93 | 0.945 | 0.952 | best | held MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (seed, dtype), (curve, reach, mb, _) in rows.items():
        print(f"| {seed} | {dtype} | " + " | ".join(str(reach[t]) for t in reach) +
              f" | {max(curve.values()):.3f} | {mb} |")
    for seed in seeds:
        a, b = rows[seed, "float16"][0], rows[seed, "float32"][0]
        print(f"seed {seed}: largest |accuracy(float16) - accuracy(float32)| at the same real "
              f"step: {max(abs(a[s] - b[s]) for s in a):.3f}")
    if len(seeds) > 1:
        a, b = rows[seeds[0], "float32"][0], rows[seeds[1], "float32"][0]
        print(f"run-to-run (float32, seeds {seeds[0]} vs {seeds[1]}): largest difference "
              f"{max(abs(a[s] - b[s]) for s in a):.3f}")


WORKER = r'''
import json, os, resource, sys, time
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM
import relex

setting, layers, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)
model = Qwen2ForCausalLM(cfg)
params = sum(p.numel() for p in model.parameters())
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh, mp_policy=mp)
fully_shard(model, mesh=mesh, mp_policy=mp)
opt = torch.optim.Adam(model.parameters(), lr=1e-5)
shard = sum(p.to_local().numel() * 4 for p in model.parameters())
acc = None
if setting != "none":
    dtype, spill = setting.split("-")
    acc = relex.Accelerator(model, cycle=20, jump=40, every=2, snapshot_dtype=dtype,
                            snapshot_dir=out + f"/snaps" if spill == "dir" else None)
ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(rank))
times, snap_times, held = [], [], [0]
for step in range(1, steps + 1):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    t1 = time.perf_counter()
    if acc is not None:
        acc.step(step, reward=0.5, optimizer=opt)
        held.append(acc.memory_bytes())
    t2 = time.perf_counter()
    times.append(t1 - t0)
    if step % 2 == 0 and step % 20:
        snap_times.append(t2 - t1)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump({"rank": rank, "params": params, "shard_bytes": shard, "peak_rss": rss,
           "held_max": max(held), "step_s": sorted(times)[len(times) // 2],
           "snapshot_s": sorted(snap_times)[len(snap_times) // 2] if snap_times else None,
           "jump_s": acc.jumps[0].seconds if acc is not None and acc.jumps else None,
           "jumps": len(acc.jumps) if acc is not None else 0},
          open(f"{out}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
'''


def sharded(layers: int, steps: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="relex-bench-acc-") as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for setting in ("none", "float16-ram", "float32-ram", "float16-dir"):
            out = Path(tmp) / setting
            out.mkdir()
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", str(script), setting, str(layers),
                            str(steps), str(out)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            results[setting] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
            r0 = results[setting][0]
            print(f"{setting}: {json.dumps(results[setting])}", flush=True)
    base = results["none"]
    print(f"\nmodel: {base[0]['params'] / 1e6:.1f}M parameters, fp32 shard "
          f"{base[0]['shard_bytes'] / 1e6:.0f} / {base[1]['shard_bytes'] / 1e6:.0f} MB per rank")
    print("| setting | rank | peak RSS GB | over no relex (x shard) | relex held (x shard) | "
          "step s | snapshot s | jump s | jump / step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting, ranks in results.items():
        for r, b in zip(ranks, base):
            over = (r["peak_rss"] - b["peak_rss"]) / r["shard_bytes"]
            jump = r["jump_s"]
            print(f"| {setting} | {r['rank']} | {r['peak_rss'] / 1e9:.2f} | {over:+.2f} | "
                  f"{r['held_max'] / r['shard_bytes']:.2f} | {r['step_s']:.2f} | "
                  f"{r['snapshot_s'] if r['snapshot_s'] is None else round(r['snapshot_s'], 2)}"
                  f" | {jump if jump is None else round(jump, 2)} | "
                  f"{'' if jump is None else round(jump / r['step_s'], 2)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    s = sub.add_parser("sharded")
    s.add_argument("--layers", type=int, default=12)
    s.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    if args.what == "demo":
        demo(args.seeds)
    else:
        sharded(args.layers, args.steps)


if __name__ == "__main__":
    main()
