"""Benchmark `relex extrapolate` on a synthetic 100M-parameter Qwen2 run (30 bf16 checkpoints).

Prints wall time, peak RSS, bytes read, the floors measured in the same run (a plain read of
every input file, and the Gram matmuls alone), relex's ratio to those floors, and optionally
the "precompute fp16 deltas, then SVD" pipeline of the paper's scripts for comparison.

    python benchmarks/bench_extrapolate.py                 # relex + floors (~2 min first time)
    python benchmarks/bench_extrapolate.py --baseline      # + the delta-file pipeline (~2 min)
    python benchmarks/bench_extrapolate.py --data /big/disk/relex-bench --checkpoints 30

The model is generated once into --data (5.6 GB) from a transformers config, never downloaded:
theta_t = theta_0 + (a t) v + noise per tensor, saved in bf16 with safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
              max_position_embeddings=2048)


def generate(data: Path, checkpoints: int, every: int = 2) -> None:
    """Base model + `checkpoints` bf16 checkpoints (steps every, 2*every, ...) in data/."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM
    if (data / "done.json").is_file() and json.loads((data / "done.json").read_text()) == {
            "checkpoints": checkpoints, "config": CONFIG}:
        return
    shutil.rmtree(data, ignore_errors=True)
    print(f"generating {checkpoints} checkpoints of a 100M Qwen2 model in {data} ...",
          flush=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(data / "base")
    base = {k: v.float() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=g) * v.std().clamp_min(1e-3) * 1e-3
                 for k, v in base.items()}
    for i in range(1, checkpoints + 1):
        step = every * i
        out = data / "run" / f"checkpoint-{step}"
        out.mkdir(parents=True)
        tensors = {k: (v + step * direction[k] + 1e-4 * v.std().clamp_min(1e-3)
                       * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                   for k, v in base.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(data / "base" / "config.json", out / "config.json")
    (data / "done.json").write_text(json.dumps({"checkpoints": checkpoints, "config": CONFIG}))


# A small launcher process runs the command: a child forked straight from this (large) process
# would report this process's memory in its peak RSS.
_LAUNCHER = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t, "rss": usage.ru_maxrss * 1024,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def timed_child(cmd: list[str]) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS bytes, its output)."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    info = json.loads(lines[-1]) if lines else {"code": 1}
    if info["code"] != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return info["wall"], info["rss"], "\n".join(lines[:-1])


def read_floor(files: list[Path]) -> tuple[float, int]:
    """Seconds to read every input file once (warm page cache), 16 MiB at a time."""
    buf = bytearray(16 << 20)
    total, start = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return time.perf_counter() - start, total


def gram_floor(numel: int, t: int) -> dict[str, float]:
    """Seconds of the Gram matmuls alone, D @ D.T over numel columns of t float32 rows."""
    out = {}
    cols = 1 << 20
    d = torch.randn(t, cols)
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        d @ d.T
        start = time.perf_counter()
        for _ in range(5):
            d @ d.T
        out[f"{threads} thread(s)"] = (time.perf_counter() - start) / 5 * numel / cols
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HERE.parent / "bench-data",
                   help="where the synthetic run lives (generated once)")
    p.add_argument("--checkpoints", type=int, default=30)
    p.add_argument("--target", type=int, default=500)
    p.add_argument("--baseline", action="store_true",
                   help="also time the precompute-deltas-then-SVD pipeline")
    p.add_argument("--repeat", type=int, default=3, help="relex runs (best and median shown)")
    args = p.parse_args()

    generate(args.data, args.checkpoints)
    files = sorted(args.data.rglob("*.safetensors"))
    with safe_open(str(args.data / "base" / "model.safetensors"), "pt") as f:
        numel = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    read_floor(files)  # the second read is the warm-cache number
    read_s, read_bytes = read_floor(files)
    grams = gram_floor(numel, args.checkpoints)

    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        before = set(args.data.rglob("*"))
        runs = []
        for i in range(args.repeat):
            out = Path(tmp) / f"out{i}"
            wall, rss, log = timed_child([
                sys.executable, "-m", "relex.cli", "extrapolate", str(args.data / "run"),
                "--base", str(args.data / "base"), "--target", str(args.target),
                "--output", str(out), "--quiet"])
            prov = json.loads((out / f"step-{args.target}" / "relex.json").read_text())
            runs.append((wall, rss, prov["summary"]["seconds"], prov["summary"]["bytes_read"]))
            # relex may create nothing but its output directory
            extra = [f for f in set(args.data.rglob("*")) - before
                     if not f.is_relative_to(tmp)] + [f for f in Path(tmp).iterdir() if f != out]
            shutil.rmtree(out)
        baseline = None
        if args.baseline:
            out = Path(tmp) / "baseline"
            wall, rss, log = timed_child([
                sys.executable, str(HERE / "baseline_delta_files.py"), str(args.data / "run"),
                str(args.data / "base"), str(out), str(args.target)])
            baseline = (wall, rss, json.loads(log.strip().splitlines()[-1]))

    runs.sort()
    best, median = runs[0], runs[len(runs) // 2]
    floor = read_s + min(grams.values())
    print(f"\nrelex extrapolate: {args.checkpoints} bf16 checkpoints of a "
          f"{numel / 1e6:.0f}M-parameter Qwen2 model ({read_bytes / 1e9:.2f} GB of inputs), "
          f"1 target, {os.cpu_count()} cores, torch {torch.__version__}")
    rows = [
        ("relex wall, end to end (best / median)", f"{best[0]:.2f} s / {median[0]:.2f} s"),
        ("relex in-process (best / median)", f"{best[2]:.2f} s / {median[2]:.2f} s"),
        ("relex peak RSS (max of runs)", f"{max(r[1] for r in runs) / 2**20:.0f} MiB"),
        ("bytes read by relex", f"{best[3] / 1e9:.2f} GB"),
        ("intermediate files left or created", f"{len(extra)}"),
        ("floor: plain read of all inputs (warm)", f"{read_s:.2f} s"),
    ] + [(f"floor: Gram matmuls alone, {k}", f"{v:.2f} s") for k, v in grams.items()] + [
        ("relex end to end / (read + best Gram floor)", f"{best[0] / floor:.2f}x"),
        ("relex in-process / (read + best Gram floor)", f"{best[2] / floor:.2f}x"),
    ]
    if baseline:
        wall, rss, info = baseline
        rows += [("baseline (fp16 delta files, then SVD) wall", f"{wall:.2f} s"),
                 ("baseline peak RSS", f"{rss / 2**20:.0f} MiB"),
                 ("baseline intermediate files", f"{info['delta_bytes'] / 1e9:.2f} GB"),
                 ("speed-up of relex (end to end, best)", f"{wall / best[0]:.1f}x")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
