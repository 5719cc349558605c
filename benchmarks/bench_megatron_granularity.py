"""How much worse is a rank-1 fit of Megatron's stacked / fused tensors than relex's fit per
layer and per HF weight?

Megatron stores all layers of a weight as one tensor ([num_layers, ...]) and fuses q/k/v
(`linear_qkv`) and gate/up (`linear_fc1`); relex reads them per layer and per HF weight
(formats/megatron.py) because the paper fits each HF tensor on its own. This generates a
trajectory in which every HF tensor j of every layer moves along its own random direction v_j
with its own coefficient c_j(t) = a_j (t / t_last)^p_j (a_j log-normal, so tensors move by
different amounts), plus independent noise on every checkpoint, observes steps 5, 10, ..., 50,
and extrapolates to 2x and 4x the window with relex's own fit (rank 1, a line through the
coefficients: fit.extrapolation_weights) at four granularities:

- per HF weight per layer (relex): q_proj, k_proj, v_proj, gate_proj, up_proj of layer i;
- fused per layer: linear_qkv / linear_fc1 of layer i;
- stacked per HF weight: q_proj of all layers as one tensor, ...;
- Megatron's key: linear_qkv / linear_fc1 of all layers as one tensor.

The Gram matrix of a group is the sum of its members' Gram matrices, so every granularity
fits from the same per-tensor Grams. Scored against the noise-free trajectory at the target:
relative error ||pred - true|| / ||true - theta_0|| over all attention (q, k, v) and all MLP
(gate, up) weights. Scenarios: "same shape" (every p_j = 1: the coefficients are proportional
across tensors) and "mixed shapes" (p_j uniform in [0.7, 1.3]: some tensors speed up, some
slow down, as layers of a real run do).

    python benchmarks/bench_megatron_granularity.py                 # 8 layers, 3 seeds
    python benchmarks/bench_megatron_granularity.py --layers 16 --seeds 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from relex.fit import FitConfig, extrapolation_weights

STEPS = np.arange(5, 55, 5, dtype=np.float64)
TARGETS = np.array([100.0, 200.0])  # 2x and 4x the last observed step


def shapes(hidden: int, heads: int, groups: int, ffn: int) -> dict[str, tuple[int, int]]:
    d = hidden // heads
    return {"q": (heads * d, hidden), "k": (groups * d, hidden), "v": (groups * d, hidden),
            "gate": (ffn, hidden), "up": (ffn, hidden)}


def trajectory(rng, layers: int, sizes: dict, mixed: bool, noise: float) -> dict:
    """{(layer, weight): (observed deltas (T, n), true deltas at TARGETS (K, n))}."""
    out = {}
    for i in range(layers):
        for w, shape in sizes.items():
            n = shape[0] * shape[1]
            v = rng.standard_normal(n) / np.sqrt(n)
            a = np.exp(rng.normal(0.0, 0.5))
            p = rng.uniform(0.7, 1.3) if mixed else 1.0

            def coef(t):
                return a * (t / STEPS[-1]) ** p
            obs = np.outer(coef(STEPS), v) + noise * a * rng.standard_normal((len(STEPS), n)) \
                / np.sqrt(n)
            out[i, w] = (obs, np.outer(coef(TARGETS), v))
    return out


def groups(layers: int, sizes: dict) -> dict[str, list[list[tuple[int, str]]]]:
    """Each granularity: its groups of (layer, weight) fitted as one tensor."""
    attn, mlp = ("q", "k", "v"), ("gate", "up")
    return {
        "per HF weight per layer (relex)": [[(i, w)] for i in range(layers) for w in sizes],
        "fused per layer (linear_qkv[i], linear_fc1[i])":
            [[(i, w) for w in part] for i in range(layers) for part in (attn, mlp)],
        "stacked per HF weight (q_proj of all layers, ...)":
            [[(i, w) for i in range(layers)] for w in sizes],
        "Megatron key (linear_qkv, linear_fc1)":
            [[(i, w) for i in range(layers) for w in part] for part in (attn, mlp)],
    }


def errors(traj: dict, grouping: list[list[tuple[int, str]]]) -> dict[str, np.ndarray]:
    """Relative extrapolation error per target over the attention and the MLP weights."""
    config = FitConfig("relex", 1, 1, None)
    sq = {"attn": np.zeros(len(TARGETS)), "mlp": np.zeros(len(TARGETS))}
    ref = {"attn": np.zeros(len(TARGETS)), "mlp": np.zeros(len(TARGETS))}
    for members in grouping:
        gram = sum(traj[m][0] @ traj[m][0].T for m in members)
        w = extrapolation_weights(gram, STEPS, TARGETS, config).weights  # (K, T)
        for m in members:
            obs, true = traj[m]
            part = "attn" if m[1] in ("q", "k", "v") else "mlp"
            sq[part] += ((w @ obs - true) ** 2).sum(axis=1)
            ref[part] += (true ** 2).sum(axis=1)
    return {p: np.sqrt(sq[p] / ref[p]) for p in sq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--noise", type=float, default=0.05,
                    help="noise rms per checkpoint, relative to the tensor's movement at the "
                         "last observed step")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    sizes = shapes(args.hidden, args.heads, args.kv_heads, args.ffn)
    started = time.perf_counter()
    print(f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv, "
          f"ffn {args.ffn}; observed steps {int(STEPS[0])}..{int(STEPS[-1])} (every 5), noise "
          f"{args.noise}; relative error at step {int(TARGETS[0])} (2x) / {int(TARGETS[1])} "
          f"(4x), mean of {args.seeds} seeds")
    for mixed in (False, True):
        print(f"\n{'mixed shapes (p in [0.7, 1.3])' if mixed else 'same shape (p = 1)'}")
        print(f"  {'granularity':52s} {'attention q/k/v':>18s} {'MLP gate/up':>18s}")
        table: dict[str, list] = {}
        for seed in range(args.seeds):
            traj = trajectory(np.random.default_rng(seed), args.layers, sizes, mixed,
                              args.noise)
            for name, grouping in groups(args.layers, sizes).items():
                table.setdefault(name, []).append(errors(traj, grouping))
        for name, runs in table.items():
            cells = []
            for part in ("attn", "mlp"):
                e = np.mean([r[part] for r in runs], axis=0)
                cells.append(f"{e[0]:8.4f} / {e[1]:.4f}")
            print(f"  {name:52s} {cells[0]:>18s} {cells[1]:>18s}")
    print(f"\n{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
