"""What checking torch.save CRC-32s costs: `relex extrapolate` on a verl FSDP run, with and without.

The 100M x 30 synthetic run of bench_extrapolate.py (generated once into --data) is written once
more as verl rank files (world size 1: `global_step_N/actor/model_world_size_1_rank_0.pt`, plain
bf16 tensors by torch.save, config in actor/huggingface/); the base stays HF. Rounds alternate
relex with the check (default) and with --no-verify-checksums; medians and the median ratio are
printed, of wall time and of CPU time (user + system: less disturbed by other load on a shared
machine). The page cache holds the inputs after the first round (6.2 GB), so this is the CPU
cost.

    python benchmarks/bench_checksums.py                 # 100M x 30, 3 rounds
    python benchmarks/bench_checksums.py --repeat 5 --checkpoints 10
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench_extrapolate import HERE, LAST_CPU, generate, median, timed_child


def verl_run(data: Path, checkpoints: int) -> Path:
    """data/verl<checkpoints>: the first checkpoints of data/run as verl rank files."""
    run = data / f"verl{checkpoints}"
    if run.is_dir():
        return run
    tmp = data / f".verl{checkpoints}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpts = sorted((data / "run").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    for c in ckpts[:checkpoints]:
        actor = tmp / f"global_step_{c.name[11:]}" / "actor"
        (actor / "huggingface").mkdir(parents=True)
        torch.save(load_file(str(c / "model.safetensors")),
                   actor / "model_world_size_1_rank_0.pt")
        shutil.copy(c / "config.json", actor / "huggingface" / "config.json")
    tmp.rename(run)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HERE.parent / "bench-data" / "100m")
    p.add_argument("--checkpoints", type=int, default=30)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    generate(args.data, max(args.checkpoints, 30))
    run = verl_run(args.data, args.checkpoints)
    subprocess.run(["sync"], check=True)
    times: dict[str, list[float]] = {"crc": [], "no-crc": []}
    cpu: dict[str, list[float]] = {"crc": [], "no-crc": []}
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        for r in range(args.repeat + 1):  # round 0 fills the page cache, not counted
            for label, extra in (("crc", []), ("no-crc", ["--no-verify-checksums"])):
                out = Path(tmp) / f"out-{label}"
                wall, rss, _ = timed_child([sys.executable, "-m", "relex", "extrapolate",
                                            str(run), "--base", str(args.data / "base"),
                                            "--target", "500", "--output", str(out), "-q",
                                            *extra])
                shutil.rmtree(out)
                if r:
                    times[label].append(wall)
                    cpu[label].append(LAST_CPU[0])
                print(f"round {r} {label:>6}: {wall:6.2f} s, CPU {LAST_CPU[0]:6.2f} s, peak RSS "
                      f"{rss / 1e9:.2f} GB", flush=True)
    a, b = median(times["crc"]), median(times["no-crc"])
    ratios = median([x / y for x, y in zip(times["crc"], times["no-crc"])])
    print(f"median: with CRC-32 check {a:.2f} s, without {b:.2f} s; median ratio {ratios:.3f}")
    a, b = median(cpu["crc"]), median(cpu["no-crc"])
    ratios = median([x / y for x, y in zip(cpu["crc"], cpu["no-crc"])])
    print(f"CPU:    with CRC-32 check {a:.2f} s, without {b:.2f} s; median ratio {ratios:.3f}")


if __name__ == "__main__":
    main()
