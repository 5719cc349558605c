"""Benchmark `relex extrapolate` on synthetic Qwen2 runs, against floors measured in the same run.

Prints, per round, relex's wall time and peak RSS, a plain sequential read of the same input
files, optionally the "precompute fp16 deltas, then SVD" pipeline of the paper's scripts
(--baseline) and relex under torchrun (--torchrun N); then medians and the median of the
per-round ratios. Rounds alternate the commands, so drift of this machine's disk and load hits
all of them alike; compare only figures of one invocation.

    python benchmarks/bench_extrapolate.py                            # 97.7M x 30, cached
    python benchmarks/bench_extrapolate.py --baseline --repeat 3      # + delta-file pipeline
    python benchmarks/bench_extrapolate.py --checkpoints 75           # the paper's window
    python benchmarks/bench_extrapolate.py --params 0.5b --drop-caches --torchrun 2
                                                                      # 29 GB, beyond RAM

The models are generated once into --data (default bench-data/<params>; 100m x 75: 14 GB,
0.5b x 30: 29 GB) from a transformers config, never downloaded: theta_t = theta_0 + (a t) v +
noise per tensor, saved in bf16 with safetensors; fewer --checkpoints than generated use the
first ones (a directory of symlinks). --drop-caches (root) runs `sync` and drops the page cache
before every timed command, so inputs come from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
#: model shapes (transformers Qwen2 configs): "0.5b" and "1.5b" are Qwen2.5-0.5B's (494M) and
#: Qwen2.5-1.5B's (1.54B; vocab 151936, tied)
CONFIGS = {
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
                 max_position_embeddings=2048),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 tie_word_embeddings=True, max_position_embeddings=32768),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 tie_word_embeddings=True, max_position_embeddings=32768),
}
CONFIG = CONFIGS["100m"]


def generate(data: Path, checkpoints: int, every: int = 2, params: str = "100m") -> None:
    """Base model + `checkpoints` bf16 checkpoints (steps every, 2*every, ...) in data/.

    Noise comes from one pool per tensor read at a shifted offset per checkpoint (a view, no
    new random numbers): the 0.5B x 30 set (29 GB) is then disk-bound to write."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = CONFIGS[params]
    want = {"checkpoints": checkpoints, "config": config, "noise": "pool"}
    if (data / "done.json").is_file() and json.loads((data / "done.json").read_text()) == want:
        return
    shutil.rmtree(data, ignore_errors=True)
    print(f"generating {checkpoints} checkpoints of a {params} Qwen2 model in {data} ...",
          flush=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).to(torch.bfloat16)
    model.save_pretrained(data / "base")
    base = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del model
    g = torch.Generator().manual_seed(1)
    direction, noise = {}, {}
    for k, v in base.items():
        std = v.float().std().clamp_min(1e-3) if v.numel() > 1 else torch.tensor(1e-3)
        direction[k] = (torch.randn(v.numel(), generator=g) * std * 1e-3).to(torch.bfloat16)
        noise[k] = (torch.randn(v.numel() + 4099, generator=g) * std * 1e-4).to(torch.bfloat16)
    for i in range(1, checkpoints + 1):
        step = every * i
        out = data / "run" / f"checkpoint-{step}"
        out.mkdir(parents=True)
        shift = (i * 131) % 4099
        tensors = {k: (v.float().view(-1) + step * direction[k].float()
                       + noise[k][shift: shift + v.numel()].float()
                       ).to(torch.bfloat16).view(v.shape)
                   for k, v in base.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        shutil.copy(data / "base" / "config.json", out / "config.json")
    (data / "done.json").write_text(json.dumps(want))


def subset(data: Path, checkpoints: int) -> Path:
    """A run directory with the first `checkpoints` checkpoints of data/run (symlinks)."""
    run = data / f"run{checkpoints}"
    if not run.is_dir():
        tmp = data / f".run{checkpoints}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ckpts = sorted((data / "run").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        if len(ckpts) < checkpoints:
            sys.exit(f"{data}/run has only {len(ckpts)} checkpoints")
        for c in ckpts[:checkpoints]:
            (tmp / c.name).symlink_to(c.resolve())
        tmp.rename(run)
    return run


# A small launcher process runs the command: a child forked straight from this (large) process
# would report this process's memory in its peak RSS.
_LAUNCHER = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t, "rss": usage.ru_maxrss * 1024,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


#: CPU seconds (user + system) of the last timed_child command and its children
LAST_CPU = [0.0]


def timed_child(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS bytes, its output); LAST_CPU[0] gets its
    CPU seconds (on a shared machine, wall time over CPU time shows how much it waited)."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    info = json.loads(lines[-1]) if lines else {"code": 1}
    if info["code"] != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    LAST_CPU[0] = info["cpu"]
    return info["wall"], info["rss"], "\n".join(lines[:-1])


class Timeline:
    """Samples, while a command runs, the machine's disk reads (MB/s, /proc/diskstats of the
    device holding `path`) and its busy and I/O-waiting cores (/proc/stat): where a run waits
    on the disk and where the disk idles while it computes. System-wide: run it on an otherwise
    idle machine."""

    def __init__(self, path: Path, every: float = 0.25):
        dev = os.stat(path).st_dev
        self.dev, self.every = (os.major(dev), os.minor(dev)), every
        self.samples: list[tuple[float, float, float, float]] = []  # t, MB/s, busy, iowait
        self._stop = threading.Event()

    def _read(self) -> tuple[float, float, float, float]:
        sectors = 0
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if (int(f[0]), int(f[1])) == self.dev:
                sectors = int(f[5])
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]  # user nice system irq softirq
        return time.perf_counter(), sectors * 512, busy / os.sysconf("SC_CLK_TCK"), \
            cpu[4] / os.sysconf("SC_CLK_TCK")

    def _loop(self) -> None:
        last = self._read()
        start = last[0]
        while not self._stop.wait(self.every):
            now = self._read()
            dt = now[0] - last[0]
            self.samples.append((now[0] - start, (now[1] - last[1]) / dt / 1e6,
                                 (now[2] - last[2]) / dt, (now[3] - last[3]) / dt))
            last = now

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plot_timelines(timelines: dict[str, Timeline], read_rate: float, file: Path) -> None:
    """One row per command: disk MB/s (with the plain read's average rate) and busy cores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 2.6 * len(timelines)), squeeze=False,
                             sharex=True)
    for ax, (kind, tl) in zip(axes[:, 0], timelines.items()):
        t = [s[0] for s in tl.samples]
        ax.plot(t, [s[1] for s in tl.samples], color="tab:blue", lw=1, label="disk read MB/s")
        ax.axhline(read_rate, color="tab:blue", ls=":", lw=1, label="cat's average")
        ax.set_ylabel("MB/s")
        ax.set_title(kind, fontsize=9, loc="left")
        cores = ax.twinx()
        cores.plot(t, [s[2] for s in tl.samples], color="tab:red", lw=1, label="busy cores")
        cores.plot(t, [s[3] for s in tl.samples], color="tab:gray", lw=1, label="I/O wait")
        cores.set_ylim(0, (os.cpu_count() or 1) * 1.05)
        cores.set_ylabel("cores")
        if ax is axes[0, 0]:
            ax.legend(loc="upper left", fontsize=7)
            cores.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


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


def drop_caches() -> None:
    """sync, then drop the page cache (root only), so the next command reads from disk."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        sys.exit(f"--drop-caches: cannot drop the page cache ({e}); run as root or leave "
                 f"the flag out (inputs then come from the page cache)")


def cat_floor(files: list[Path]) -> float:
    """Seconds for `cat` to read every input file once, sequentially."""
    start = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)], check=True)
    return time.perf_counter() - start


def compare(a: Path, b: Path, base: Path) -> str:
    """How far apart two output directories are: the share of equal values, and the largest
    difference in units of the last place at the magnitude of the operands of base + delta,
    max(|a|, |b|, |base|) (where the result cancels to near zero, two correct results can be
    many of the result's own ulps apart)."""
    equal = total = 0
    worst = 0.0
    with safe_open(str(base / "model.safetensors"), "pt") as w:
        for fa in sorted(a.glob("*.safetensors")):
            with safe_open(str(fa), "pt") as x, safe_open(str(b / fa.name), "pt") as y:
                for k in x.keys():
                    u, v = x.get_tensor(k), y.get_tensor(k)
                    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24,
                            torch.float64: 53}[u.dtype]
                    u, v = u.double(), v.double()
                    if not torch.equal(u.isnan(), v.isnan()):
                        worst = float("inf")  # NaN in one output only
                    scale = torch.maximum(torch.maximum(u.abs(), v.abs()),
                                          w.get_tensor(k).double().abs())
                    exponent = torch.frexp(scale.clamp_min(1e-38))[1]
                    ulp = torch.ldexp(torch.ones_like(scale), exponent - bits)
                    equal += int(((u == v) | (u.isnan() & v.isnan())).sum())
                    total += u.numel()
                    worst = max(worst, float(((u - v).abs() / ulp).nan_to_num(0.0).max()))
    return (f"{equal / total:.6f} of {total} values equal; most apart {worst:.2f} ulp at the "
            f"operands' magnitude")


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _short(label: str, width: int = 48) -> str:
    """A variant's label for the table (a NUMBA_CPU_FEATURES value is ~900 characters)."""
    return label if len(label) <= width else label[: width - 3] + "..."

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", choices=sorted(CONFIGS), default="100m",
                   help="model shape: 100m (97.7M), 0.5b (Qwen2.5-0.5B, 494M) or 1.5b "
                        "(Qwen2.5-1.5B, 1.54B)")
    p.add_argument("--device", default="cpu", help="relex's --device (cpu or cuda)")
    p.add_argument("--compare-device", metavar="DEV",
                   help="also time relex on DEV each round; the first round compares the two "
                        "outputs (share equal, most apart in ulps at the operands' magnitude)")
    p.add_argument("--data", type=Path, help="where the synthetic run lives (generated once; "
                                             "default bench-data/<params>)")
    p.add_argument("--checkpoints", type=int, default=30)
    p.add_argument("--target", type=int, default=500)
    p.add_argument("--baseline", action="store_true",
                   help="also time the precompute-deltas-then-SVD pipeline each round")
    p.add_argument("--torchrun", type=int, metavar="N",
                   help="also time `torchrun --nproc-per-node N -m relex` each round")
    p.add_argument("--drop-caches", action="store_true",
                   help="sync and drop the page cache before every timed command (root)")
    p.add_argument("--max-memory", help="passed to relex (default: relex's own default)")
    p.add_argument("--variant", action="append", default=[], metavar="VAR=VALUE",
                   help="also time relex with this environment setting each round, e.g. "
                        "RELEX_GRAM=numpy (BLAS Gram) or RELEX_PREFETCH=off|madvise; repeatable")
    p.add_argument("--repeat", type=int, default=3, help="rounds (medians shown)")
    p.add_argument("--gram-floor", action="store_true", help="also time the Gram matmuls alone")
    p.add_argument("--timeline", type=Path, metavar="PNG",
                   help="plot disk reads and busy cores over time for each command of the "
                        "first round (system-wide: use an idle machine)")
    args = p.parse_args()

    data = args.data or HERE.parent / "bench-data" / args.params
    done = data / "done.json"
    have = json.loads(done.read_text()) if done.is_file() else {}
    if have.get("config") != CONFIGS[args.params] or have.get("checkpoints", 0) < args.checkpoints:
        generate(data, args.checkpoints, params=args.params)
        have = json.loads(done.read_text())
    run = data / "run" if have["checkpoints"] == args.checkpoints else subset(data,
                                                                             args.checkpoints)
    subprocess.run(["sync"], check=True)  # let writeback of generated data finish first
    files = [data / "base" / "model.safetensors"] + [
        c / "model.safetensors" for c in sorted(run.iterdir()) if c.name.startswith("checkpoint-")]
    in_bytes = sum(f.stat().st_size for f in files)
    with safe_open(str(files[0]), "pt") as f:
        numel = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    mem = ["--max-memory", args.max_memory] if args.max_memory else []

    def relex_cmd(out: Path, torchrun: int | None = None, device: str = args.device) -> list[str]:
        launch = [sys.executable, "-m", "relex"] if not torchrun else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(torchrun), "-m", "relex"]
        return launch + ["extrapolate", str(run), "--base", str(data / "base"), "--target",
                         str(args.target), "--output", str(out), "--quiet", *mem,
                         "--device", device]

    rows: dict[str, list] = {"read": [], "relex": []}
    if args.baseline:
        rows["baseline"] = []
    if args.torchrun:
        rows["torchrun"] = []
    other, compared = f"relex --device {args.compare_device}", "not compared"
    if args.compare_device:
        rows[other] = []
    modes = args.variant
    for m in modes:
        if "=" not in m:
            sys.exit(f"--variant {m}: expected VAR=VALUE")
        rows[f"relex[{m}]"] = []
    state = "page cache dropped before each" if args.drop_caches else "warm page cache"
    print(f"{args.params} Qwen2 shape ({numel / 1e6:.1f}M parameters) x {args.checkpoints} bf16 "
          f"checkpoints, {in_bytes / 1e9:.2f} GB of inputs, {state}; {os.cpu_count()} cores, "
          f"torch {torch.__version__}", flush=True)
    if not args.drop_caches:
        cat_floor(files)  # warm the cache once
    timelines: dict[str, Timeline] = {}
    with tempfile.TemporaryDirectory(dir=data) as tmp:
        for i in range(args.repeat):
            if args.drop_caches:
                drop_caches()
            with Timeline(data) if args.timeline and i == 0 else nullcontext() as tl:
                rows["read"].append((cat_floor(files), 0, in_bytes))
            if tl:
                timelines["cat (plain sequential read)"] = tl
            print(f"  round {i + 1}: read {rows['read'][-1][0]:.2f} s", end="", flush=True)
            kinds = ["relex"] + [f"relex[{m}]" for m in modes] + (
                ["torchrun"] if args.torchrun else []) + (["baseline"] if args.baseline else []) + (
                [other] if args.compare_device else [])
            if i % 2:  # alternate the order of the commands between rounds
                kinds = kinds[::-1]
            for kind in kinds:
                out = Path(tmp) / f"out{list(rows).index(kind)}-{i}"  # variants can be long
                if args.drop_caches:
                    drop_caches()
                if kind == "baseline":
                    cmd = [sys.executable, str(HERE / "baseline_delta_files.py"), str(run),
                           str(data / "base"), str(out), str(args.target)]
                elif kind == other:
                    cmd = relex_cmd(out, device=args.compare_device)
                else:
                    cmd = relex_cmd(out, args.torchrun if kind == "torchrun" else None)
                env = dict(os.environ)
                if kind.startswith("relex["):
                    var, value = kind[6:-1].split("=", 1)
                    env[var] = value
                with Timeline(data) if args.timeline and i == 0 else nullcontext() as tl:
                    wall, rss, _ = timed_child(cmd, env)
                if tl:
                    timelines[_short(kind, 90)] = tl
                read = 0
                if kind != "baseline":
                    prov = json.loads((out / f"step-{args.target}" / "relex.json").read_text())
                    read = prov["summary"]["bytes_read"]
                rows[kind].append((wall, rss, read, LAST_CPU[0]))
                print(f", {_short(kind)} {wall:.2f} s ({LAST_CPU[0]:.0f} CPU s, "
                      f"{rss / 2**20:.0f} MiB)",
                      end="", flush=True)
                if not (i == 0 and args.compare_device and kind in ("relex", other)):
                    shutil.rmtree(out)
            print(flush=True)
            if i == 0 and args.compare_device:
                kept = [Path(tmp) / f"out{list(rows).index(k)}-0" for k in ("relex", other)]
                compared = compare(*(k / f"step-{args.target}" for k in kept), data / "base")
                for k in kept:
                    shutil.rmtree(k)

    def med(kind: str) -> float:
        return median([r[0] for r in rows[kind]])

    def ratio(a: str, b: str) -> str:
        rs = [x[0] / y[0] for x, y in zip(rows[a], rows[b])]
        return f"median {median(rs):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in rs)})"

    out = [("plain sequential read (cat), median", f"{med('read'):.2f} s"),
           ("relex wall, median", f"{med('relex'):.2f} s"),
           ("relex peak RSS (max)", f"{max(r[1] for r in rows['relex']) / 2**20:.0f} MiB"),
           ("relex bytes read", f"{rows['relex'][0][2] / 1e9:.2f} GB"),
           ("relex CPU seconds (user + sys), median", f"{median([r[3] for r in rows['relex']]):.1f} s"),
           ("relex / read", ratio("relex", "read"))]
    for m in modes:
        out += [(f"relex {_short(m)}, median", f"{med(f'relex[{m}]'):.2f} s"),
                (f"relex {_short(m)} / relex", ratio(f"relex[{m}]", "relex"))]
    if args.torchrun:
        out += [(f"torchrun x{args.torchrun} wall, median", f"{med('torchrun'):.2f} s"),
                (f"torchrun x{args.torchrun} / relex", ratio("torchrun", "relex"))]
    if args.baseline:
        out += [("baseline (fp16 delta files, then SVD), median", f"{med('baseline'):.2f} s"),
                ("baseline peak RSS (max)",
                 f"{max(r[1] for r in rows['baseline']) / 2**20:.0f} MiB"),
                ("speed-up: baseline / relex", ratio("baseline", "relex"))]
    if args.compare_device:
        out += [(f"{other} wall, median", f"{med(other):.2f} s"),
                (f"relex / {other}", ratio("relex", other)),
                (f"outputs --device {args.device} vs {args.compare_device}", compared)]
    if args.gram_floor:
        out += [(f"Gram matmuls alone, {k}", f"{v:.2f} s")
                for k, v in gram_floor(numel, args.checkpoints).items()]
    if args.timeline:
        plot_timelines(timelines, in_bytes / med("read") / 1e6, args.timeline)
        out.append(("timeline of round 1", str(args.timeline)))
    width = max(len(k) for k, _ in out)
    for k, v in out:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
