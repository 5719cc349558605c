"""Gram step kernels on one core: relex's compiled kernel against numpy's and torch's BLAS.

Prints useful GFLOP/s (T (T+1) m per T x m block: the multiply-adds of one triangle) of
D @ D.T for float32 blocks, and ns per element of the whole Gram step from bf16 rows (convert,
subtract the base, Gram) as the engine ran it before (torch convert + subtract, numpy syrk)
and as it runs now (kernels.delta_gram). Medians of 5 timings, one thread.

    python benchmarks/bench_gram.py [--checkpoints 30 75] [--columns 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from relex.stream import kernels


def timed(fn, reps: int) -> float:
    """Median seconds of one call over 5 timings of reps calls (after a warm-up call)."""
    fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - start) / reps)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=int, nargs="+", default=[30, 75])
    p.add_argument("--columns", type=int, nargs="+", default=[8192, 32768, 131072])
    args = p.parse_args()
    if not kernels.available():
        raise SystemExit("numba is not installed: nothing to compare")
    torch.set_num_threads(1)
    print(f"{'T':>3} {'columns':>8} | GFLOP/s: {'kernel':>7} {'numpy':>7} {'torch':>7} | "
          f"ns/element from bf16: {'before':>7} {'now':>7}")
    with threadpool_limits(1):
        for t in args.checkpoints:
            for m in args.columns:
                gen = torch.Generator().manual_seed(0)
                base16 = (0.02 * torch.randn(m, generator=gen)).bfloat16()
                rows16 = (base16.float() + 1e-4 * torch.randn(t, m, generator=gen)).bfloat16()
                rows = list(rows16.unbind(0))
                x = (rows16.float() - base16.float()).numpy()
                xt = torch.from_numpy(x)
                reps = max(1, (1 << 22) // m)
                flops = t * (t + 1) * m
                gf = [flops / timed(f, reps) / 1e9 for f in (
                    lambda: kernels.gram(x), lambda: np.dot(x, x.T), lambda: xt @ xt.T)]
                base, d = torch.empty(m), torch.empty(t, m)
                stage = torch.empty(t, m, dtype=torch.bfloat16)

                def before():
                    base.copy_(base16)
                    torch._foreach_copy_(list(d.unbind(0)), rows)
                    d.sub_(base)
                    dn = d.numpy()
                    return np.dot(dn, dn.T)

                def now():
                    base.copy_(base16)
                    torch._foreach_copy_(list(stage.unbind(0)), rows)
                    return kernels.delta_gram(stage.view(torch.int16).numpy().view(np.uint16),
                                              base.numpy(), True)
                ns = [timed(f, reps) / (t * m) * 1e9 for f in (before, now)]
                print(f"{t:>3} {m:>8} | {'':9}{gf[0]:>7.1f} {gf[1]:>7.1f} {gf[2]:>7.1f} | "
                      f"{'':22}{ns[0]:>7.2f} {ns[1]:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
