"""jump="auto" against fixed jumps, on the demo's task: real steps to reach the plain run's level.

For each seed: the plain GRPO run of --steps steps, and accelerated runs of --steps / 2 real
steps with relex.Accelerator (its default cycle: 20, auto 10) at each --schedule (a fixed jump,
or auto). The share is the real steps an accelerated run needed to first reach (plain's final
accuracy - 0.01), divided by the real steps plain needed to first reach that same level; also
the accelerated run's accuracy at the end of its budget (a collapse shows there). Held-out
accuracy every 10 steps on the demo's 500 problems. Seeds run in --jobs processes (one core each). A schedule
with the suffix -dev gives the Accelerator a held-out check (eval_fn): greedy accuracy on 200
other problems (a dev set, never the 500 that are measured). A schedule may set its cycle and
auto's max_jump (in steps): 'auto@c10' (cycle 10), 'auto@c10m80' (cycle 10, max_jump 80),
'40@c12'; snapshots every 2 steps.

    python benchmarks/bench_auto.py                          # seeds 0-4, jumps 40, 60, auto
    python benchmarks/bench_auto.py --seeds 0 1 --schedule 40 auto auto-dev --plot auto.png
    python benchmarks/bench_auto.py --schedule auto@c10 40@c10 auto@c10m80 --cache cache/
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def one(seed: int, schedule: str, steps: int) -> dict:
    """One run in this process: 'plain' or a jump schedule; its held-out curve."""
    import warnings

    import torch
    from transformers import LlamaForCausalLM

    from relex.demo.grpo import GRPOConfig, train
    from relex.demo.run import BASE, accelerate
    from relex.evaluation.generation import quiet_transformers
    warnings.filterwarnings("ignore")
    quiet_transformers()
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(BASE)
    if schedule == "plain":
        curve = {}
        train(model, Path("unused"), GRPOConfig(steps=steps, seed=seed, eval_every=10),
              on_step=lambda row: curve.update({row["step"]: row["accuracy"]}
                                               if "accuracy" in row else {}), keep=set())
        return {"curve": curve}
    jump, cycle, max_jump = parse(schedule)
    eval_fn = None
    if schedule.endswith("-dev"):
        from relex.demo import arithmetic as A
        dev = A.heldout(200, seed=4321)
        eval_fn = lambda: A.accuracy(model, dev)  # noqa: E731
    r = accelerate(model, steps // 2, seed, cycle, jump, False, eval_fn=eval_fn,
                   max_jump=max_jump)
    return {"curve": {p["real_step"]: p["accuracy"] for p in r["curve"]},
            "jumps": [(j["real_step"], j["size"], j["rolled_back"]) for j in r["jumps"]]}


def parse(schedule: str) -> tuple[int | str, int | None, int | None]:
    """'60', 'auto', 'auto@c10', 'auto@c10m80', '40@c12-dev': (jump, cycle, auto's max_jump)."""
    m = re.fullmatch(r"(auto|\d+)(?:@c(\d+)(?:m(\d+))?)?(?:-dev)?", schedule)
    if m is None:
        raise SystemExit(f"schedule {schedule!r}: a jump or auto, then optionally @c<cycle> and "
                         f"m<max_jump>, then optionally -dev (e.g. auto@c10m80-dev)")
    jump = m[1] if m[1] == "auto" else int(m[1])
    cycle = int(m[2]) if m[2] else None  # the Accelerator's default: 20, auto 10
    return jump, cycle, None if m[3] is None else int(m[3])


def first(curve: dict, level: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] >= level - 5e-4), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--schedule", nargs="+", default=["40", "60", "auto"])
    p.add_argument("--steps", type=int, default=400, help="the plain run's steps")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--plot", type=Path, help="accuracy vs real steps per seed (PNG)")
    p.add_argument("--cache", type=Path, help="keep each run's result here (JSON) and reuse "
                   "it when the same seed, schedule and steps come again")
    p.add_argument("--one", nargs=2, metavar=("SEED", "SCHEDULE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a worker process
        print(json.dumps(one(int(args.one[0]), args.one[1], args.steps)))
        return
    for k in args.schedule:
        parse(k)  # a bad name fails before anything runs
    runs = [(s, k) for s in args.seeds for k in ["plain", *args.schedule]]

    def launch(run):
        kept = args.cache / f"{run[0]}-{run[1]}-{args.steps}.json" if args.cache else None
        if kept is not None and kept.is_file():
            return run, json.loads(kept.read_text())
        out = subprocess.run([sys.executable, __file__, "--one", str(run[0]), run[1],
                              "--steps", str(args.steps)], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(result))
        return run, result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(launch, runs))
    print("| seed | schedule | plain final | level | plain reaches it | run reaches it | share | "
          "run's final | jumps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    shares: dict[str, list] = {k: [] for k in args.schedule}
    ends: dict[str, list] = {k: [] for k in args.schedule}
    for seed in args.seeds:
        plain = results[seed, "plain"]["curve"]
        plain = {int(s): a for s, a in plain.items()}
        final = plain[max(plain)]
        level = round(final - 0.01, 3)
        at = first(plain, level)
        for k in args.schedule:
            r = results[seed, k]
            curve = {int(s): a for s, a in r["curve"].items()}
            got = first(curve, level)
            share = got / at if got is not None and at else None
            shares[k].append(share)
            ends[k].append(curve[max(curve)] - final)
            sizes = ",".join(f"{n}{'x' if back else ''}" for _, n, back in r["jumps"])
            print(f"| {seed} | {k} | {final:.3f} | {level:.3f} | {at} | {got} | "
                  f"{'-' if share is None else f'{share:.0%}'} | {curve[max(curve)]:.3f} | "
                  f"{sizes} |")
    print()
    for k in args.schedule:
        known = sorted(x for x in shares[k] if x is not None)
        median = known[len(known) // 2] if len(known) == len(shares[k]) else None
        print(f"{k}: median share {'(some seeds never reach the level)' if median is None else f'{median:.0%}'}"
              f"; reached in {len(known)} of {len(shares[k])} seeds; worst final vs plain's "
              f"{min(ends[k]):+.3f}")
    print()  # the same, one row per schedule (docs/performance.md's table)
    print("| schedule | " + " | ".join(f"seed {s}" for s in args.seeds) +
          " | median | worst final vs plain's |")
    print("| --- " * (len(args.seeds) + 3) + "|")
    for k in args.schedule:
        known = sorted(x for x in shares[k] if x is not None)
        median = f"{known[len(known) // 2]:.0%}" if len(known) == len(shares[k]) else "-"
        name = k if k.startswith("auto") else f"jump {k}"
        print(f"| {name} | " + " | ".join("-" if x is None else f"{x:.0%}" for x in shares[k]) +
              f" | {median} | {min(ends[k]):+.3f} |")
    if args.plot:
        plot(args.plot, {seed: {k if k == "plain" or k.startswith("auto") else f"jump {k}":
                                results[seed, k]["curve"] for k in ["plain", *args.schedule]}
                         for seed in args.seeds})


def plot(path: Path, curves: dict, budget: int | None = None, styles: dict | None = None) -> None:
    """One panel per seed ({seed: {label: {step: accuracy}}}): accuracy vs real steps, and a
    line at `budget` real steps if given; styles: {label: matplotlib keywords}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), sharey=True,
                             squeeze=False)
    for ax, (seed, runs) in zip(axes[0], curves.items()):
        for label, c in runs.items():
            c = {int(s): a for s, a in c.items()}
            ax.plot(sorted(c), [c[s] for s in sorted(c)], label=label,
                    **(styles or {}).get(label, {}))
        if budget:
            ax.axvline(budget, color="gray", lw=0.6)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("real steps")
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")

if __name__ == "__main__":
    main()
