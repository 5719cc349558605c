"""LoRA trajectories: exact adapter deltas vs merging first, and reading adapters vs merged exports.

    .venv/bin/python benchmarks/bench_lora.py            # both parts (~10 min, ~32 GB in /tmp)
    .venv/bin/python benchmarks/bench_lora.py --part precision    # part 1 only (seconds)

Part 1 (precision): one 512 x 512 bf16 weight (std 0.02), r=8, 10 checkpoints whose adapter
deltas scaling * B_t @ A_t follow a rank-1 drift plus noise. Rank-1 explained variance and
relative error of the deltas, taken exactly (float32 factors) or from the checkpoints merged
into the bf16 base (what peft's merge_and_unload exports), at two delta sizes; then relex on
6 such adapted tensors, from the adapters and from the merged exports, against the float64
extrapolation of the exact merged weights: elements beyond one bf16 ulp.

Part 2 (scale): a LoRA run of Qwen2.5-0.5B's shape (494M parameters, bf16 base, tied
embeddings), r=16 on every linear layer (q, k, v, o, gate, up, down), 30 checkpoints; relex
extrapolates it from the adapters (Gram from the factors), and from the same run's merged bf16
exports (30 x 0.99 GB); time and bytes read of each, then the adapter output (--output-format
lora). Everything is written under --dir and deleted at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import relex

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 896, 4864, 24, 14, 2, 151936
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ev1(d: np.ndarray) -> float:
    """Rank-1 explained variance of the rows of d."""
    s = np.linalg.svd(d, compute_uv=False)
    return float(s[0] ** 2 / (s ** 2).sum())


def trajectory_factors(g, m, n, r, steps, rms, noise=0.01):
    """Factors (A_t (r, n), B_t (m, r)) with scaling 2 whose deltas drift along one rank-r
    direction linearly in the step, plus noise; delta rms ~ `rms` at the last step."""
    a0 = torch.randn(r, n, generator=g) / n ** 0.5
    b1 = torch.randn(m, r, generator=g)
    out = []
    for s in steps:
        frac = s / steps[-1]
        a = a0 + noise * torch.randn(r, n, generator=g) / n ** 0.5
        b = frac * b1 + noise * torch.randn(m, r, generator=g)
        out.append((a, b))
    # scale so that the last delta's rms is `rms`
    a, b = out[-1]
    k = rms / float((2 * b @ a).pow(2).mean().sqrt())
    return [(a, b * k) for a, b in out]


def write_adapter(path: Path, factors: dict, r: int, base: Path, targets) -> None:
    path.mkdir(parents=True)
    t = {}
    for module, (a, b) in factors.items():
        t[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        t[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(t, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
         "base_model_name_or_path": str(base)}))


def reference_rank1(base64: np.ndarray, deltas: np.ndarray, steps, target) -> np.ndarray:
    """float64 RELEX (rank 1, linear fit), the textbook way: SVD of the stacked deltas."""
    _, s, vt = np.linalg.svd(deltas, full_matrices=False)
    c = deltas @ vt[0]
    a, b = np.polyfit(np.asarray(steps, float), c, 1)
    return base64 + (a * target + b) * vt[0]


def beyond_ulp(out: torch.Tensor, ref: np.ndarray, base: np.ndarray) -> tuple[int, float]:
    """Elements of a bf16 output more than one bf16 ulp from ref (the ulp at the larger of
    |ref| and |theta_0|, as the tests measure it); the worst, in ulps."""
    got = out.double().numpy()
    _, e = np.frexp(np.maximum(np.maximum(np.abs(ref), np.abs(base)), 1e-38))
    ulp = np.ldexp(1.0, e - 8)
    err = np.abs(got - ref) / ulp
    return int((err > 1).sum()), float(err.max())


def part_precision(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    m = n = 512
    steps = list(range(1, 11))
    w0 = (0.02 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
    w64 = w0.double()
    print("part 1: 512x512 bf16 weight ~0.02, r=8, 10 checkpoints, rank-1 drift + noise")
    print(f"  {'deltas':<48} {'rank-1 EV':>10} {'rel. error':>11}")
    for rms in (5.7e-4, 5.7e-5):
        fac = trajectory_factors(g, m, n, 8, steps, rms)
        exact = np.stack([(2 * b.double() @ a.double()).reshape(-1).numpy() for a, b in fac])
        merged = np.stack([((w0.float() + 2 * b @ a).to(torch.bfloat16).double() - w64)
                           .reshape(-1).numpy() for a, b in fac])
        err = np.linalg.norm(merged - exact) / np.linalg.norm(exact)
        if rms == 5.7e-4:
            print(f"  {'adapter deltas scaling * B_t @ A_t (exact)':<48} {ev1(exact):>10.4f} "
                  f"{0:>11}")
        print(f"  {f'merged into bf16, deltas rms {rms:.1e}':<48} {ev1(merged):>10.4f} "
              f"{err:>10.0%}")
    # relex on 6 adapted tensors, from the adapters and from the merged exports
    base, run, merged_run = root / "p1" / "base", root / "p1" / "run", root / "p1" / "merged"
    base.mkdir(parents=True)
    names = [f"layers.{i}.proj" for i in range(6)]
    bases = {f"{n_}.weight": (0.02 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
             for n_ in names}
    save_file(bases, base / "model.safetensors", metadata={"format": "pt"})
    cfg = {"model_type": "bench", "tie_word_embeddings": False}
    (base / "config.json").write_text(json.dumps(cfg))
    facs = {n_: trajectory_factors(g, m, n, 8, steps, 5.7e-5) for n_ in names}
    for t, s in enumerate(steps):
        write_adapter(run / f"checkpoint-{s}", {n_: facs[n_][t] for n_ in names}, 8, base,
                      ["proj"])
        d = merged_run / f"checkpoint-{s}"
        d.mkdir(parents=True)
        save_file({f"{n_}.weight": (bases[f"{n_}.weight"].float()
                                    + 2 * facs[n_][t][1] @ facs[n_][t][0]).to(torch.bfloat16)
                   for n_ in names}, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
    target = 20
    relex.extrapolate(run, base=base, targets=[target], output=root / "p1" / "a",
                      progress=False)
    relex.extrapolate(merged_run, base=base, targets=[target], output=root / "p1" / "m",
                      progress=False)
    outs = {k: load_file(root / "p1" / k / f"step-{target}" / "model.safetensors")
            for k in ("a", "m")}
    print(f"  relex at step {target} vs the float64 extrapolation of the exact merged weights "
          f"(6 adapted 512x512 bf16 tensors, deltas rms 5.7e-5):")
    for k, label in (("a", "from the adapters (exact deltas)"),
                     ("m", "from the merged bf16 exports")):
        bad, worst = [], 0.0
        for n_ in names:
            key = f"{n_}.weight"
            deltas = np.stack([(2 * b.double() @ a.double()).reshape(-1).numpy()
                               for a, b in facs[n_]])
            b64 = bases[key].double().reshape(-1).numpy()
            ref = reference_rank1(b64, deltas, steps, target)
            count, w = beyond_ulp(outs[k][key].reshape(-1), ref, b64)
            bad.append(count)
            worst = max(worst, w)
        print(f"    {label:<34} tensors beyond 1 ulp: {sum(c > 0 for c in bad)} of 6, "
              f"elements beyond: {sum(bad)} of {6 * m * n}, worst {worst:.2f} ulp")


def qwen05b_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    kv = HIDDEN // HEADS * KV
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "self_attn.k_proj.weight": (kv, HIDDEN), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def part_scale(root: Path, layers: int, t_count: int, r: int) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = qwen05b_shapes(layers)
    base, run, merged_run = root / "p2" / "base", root / "p2" / "run", root / "p2" / "merged"
    base.mkdir(parents=True)
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_hidden_layers": layers,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    started = time.perf_counter()
    state = {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps(cfg))
    n_params = sum(t.numel() for t in state.values())
    adapted = [k for k in shapes if k.endswith(".weight") and k.split(".")[-2] in LINEAR]
    steps = [10 * (i + 1) for i in range(t_count)]
    # per adapted weight: a fixed direction and per-step noise, generated step by step
    dirs = {k: (torch.randn(r, shapes[k][1], generator=g) / shapes[k][1] ** 0.5,
                torch.randn(shapes[k][0], r, generator=g)) for k in adapted}
    scale = {k: 5.7e-5 / float((2 * dirs[k][1] @ dirs[k][0]).pow(2).mean().sqrt())
             for k in adapted}
    for s in steps:
        frac = s / steps[-1]
        fac = {}
        for k in adapted:
            a0, b1 = dirs[k]
            a = a0 + 0.01 * torch.randn(a0.shape, generator=g) / a0.shape[1] ** 0.5
            b = scale[k] * (frac * b1 + 0.01 * torch.randn(b1.shape, generator=g))
            fac[k.removesuffix(".weight")] = (a, b)
        write_adapter(run / f"checkpoint-{s}", fac, r, base, LINEAR)
        merged = dict(state)
        for module, (a, b) in fac.items():
            key = module + ".weight"
            merged[key] = (state[key].float() + 2 * b @ a).to(torch.bfloat16)  # peft's merge
        d = merged_run / f"checkpoint-{s}"
        d.mkdir(parents=True)
        save_file(merged, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*.safetensors"))  # noqa: E731
    print(f"part 2: Qwen2.5-0.5B-shaped LoRA run, {n_params / 1e6:.0f}M parameters (bf16 "
          f"base), r={r} on {len(adapted)} linear weights, {t_count} checkpoints (made in "
          f"{time.perf_counter() - started:.0f} s)")
    print(f"  adapters {size(run) / 1e9:.2f} GB on disk, merged exports "
          f"{size(merged_run) / 1e9:.2f} GB")
    target = 2 * steps[-1]
    results = {}
    for label, src in (("adapters", run), ("merged exports", merged_run)):
        out = root / "p2" / f"out-{label.split()[0]}"
        rep = relex.extrapolate(src, base=base, targets=[target], output=out, progress=False)
        results[label] = out
        print(f"  relex extrapolate from the {label:<15} {rep.seconds:7.1f} s, "
              f"{rep.bytes_read / 1e9:6.2f} GB read")
        shutil.rmtree(out / f"step-{target}") if label != "adapters" else None
    rep = relex.extrapolate(run, base=base, targets=[target], output=root / "p2" / "out-lora",
                            output_format="lora", progress=False)
    shares = list(rep.norm_share[target].values())
    print(f"  relex extrapolate --output-format lora  {rep.seconds:7.1f} s, "
          f"{rep.bytes_read / 1e9:6.2f} GB read, adapter "
          f"{size(root / 'p2' / 'out-lora') / 1e6:.1f} MB, norm share kept at r={rep.lora_rank}"
          f": mean {np.mean(shares):.4f}, min {np.min(shares):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["precision", "scale", "all"], default="all")
    ap.add_argument("--dir", default="/tmp/relex-bench-lora", help="scratch directory")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--checkpoints", type=int, default=30)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    try:
        if args.part in ("precision", "all"):
            part_precision(root)
        if args.part in ("scale", "all"):
            part_scale(root, args.layers, args.checkpoints, args.rank)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
