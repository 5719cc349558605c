"""When does projecting on the rank-1 direction beat the per-parameter line? The demo's task with
noisier updates.

The demo's GRPO run (32 prompts x 8 samples per step) moves its weights so close to one
direction that the per-parameter least-squares line (linear-weights, "lin-w") extrapolates as
well as relex. With fewer prompts per step each update carries more sampling noise; relex
projects the observed deltas on their top singular direction before fitting the line (the
paper's denoising finding), lin-w extrapolates every parameter's noise too. For each
--prompts value this trains the demo model for --steps GRPO steps (same seed, learning rate and
schedule), lets both methods observe the first 15% of the checkpoints, and scores real and
extrapolated checkpoints on the demo's 500 held-out problems.

    python benchmarks/bench_denoise.py                       # prompts 32 (the demo) and 4
    python benchmarks/bench_denoise.py --prompts 32 8 4 2 --steps 400

Prints per setting the accuracy of real / relex / lin-w at each target and the mean absolute
gap to the real run inside the run (targets <= --steps).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch


def one(prompts: int, steps: int, seed: int, root: Path) -> dict:
    from transformers import LlamaForCausalLM

    import relex
    from relex.demo import arithmetic as A
    from relex.demo.grpo import GRPOConfig, train
    from relex.demo.run import BASE, targets_for

    k = max(4, round(0.15 * steps / 2) * 2)
    targets = [t for t in targets_for(steps, k) if t <= steps]
    test = A.heldout()
    model = LlamaForCausalLM.from_pretrained(BASE)
    run = root / f"run-{prompts}"
    keep = set(range(2, k + 1, 2)) | set(targets)
    real: dict[int, float] = {}
    cfg = GRPOConfig(steps=steps, seed=seed, prompts=prompts, eval_every=10)
    train(model, run, cfg, on_step=lambda row: real.update(
        {row["step"]: row["accuracy"]} if "accuracy" in row else {}), keep=keep)
    out = {"real": {t: real[t] for t in targets}}
    for method in ("relex", "linear-weights"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            relex.extrapolate(run, base=BASE, observe_until=k, targets=targets,
                              output=root / f"{method}-{prompts}", method=method,
                              progress=False)
        out[method] = {t: A.accuracy(LlamaForCausalLM.from_pretrained(
            root / f"{method}-{prompts}" / f"step-{t}"), test) for t in targets}
    out["observed"] = k
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[32, 4],
                   help="GRPO prompts per step (x 8 samples each); the demo uses 32")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # the same numbers on every machine, as in the demo
    from relex.evaluation.generation import quiet_transformers
    quiet_transformers()
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        for prompts in args.prompts:
            r = one(prompts, args.steps, args.seed, Path(tmp))
            print(f"\nprompts {prompts} x 8 per step, observed {r['observed']} of {args.steps} "
                  f"steps; held-out accuracy")
            print(f"  {'step':>5} {'real':>6} {'relex':>6} {'lin-w':>6}")
            for t in r["real"]:
                print(f"  {t:>5} {r['real'][t]:>6.3f} {r['relex'][t]:>6.3f} "
                      f"{r['linear-weights'][t]:>6.3f}")
            gap = {m: sum(abs(r[m][t] - r["real"][t]) for t in r["real"]) / len(r["real"])
                   for m in ("relex", "linear-weights")}
            wins = sum(r["relex"][t] > r["linear-weights"][t] for t in r["real"])
            print(f"  mean |gap to real|: relex {gap['relex']:.3f}, lin-w "
                  f"{gap['linear-weights']:.3f}; relex higher at {wins} of {len(r['real'])} "
                  f"steps")


if __name__ == "__main__":
    main()
