"""The restart loop with native output against relex in the loop and plain GRPO, on the demo task.

Per seed, held-out accuracy (the demo's 500 problems, greedy) every 10 real steps of:
  plain     plain GRPO, --plain-steps real steps (bench_auto's plain run);
  in-loop   relex.Accelerator, cycle 20 / jump 40, --budget real steps (relex.demo.run.accelerate);
  restart   the restart loop with Adam kept: train a cycle of 20 real steps saving
            checkpoint-N/ every 2 steps (model.safetensors, optimizer.pt, rng_state.pth,
            trainer_state.json), relex.extrapolate the cycle's checkpoints (steps relative to
            the cycle start; base: the cycle's start weights) 40 steps past the cycle end with
            output_format="native", resume the trainer from OUT/step-60/checkpoint-N/ (weights
            = the extrapolation; Adam, RNG and step counter = the last real checkpoint's);
            until the budget is spent;
  restart-fresh   the same, but a new Adam at every resume (what restarting from an HF export
            does to the optimizer; data order and step counter continue as above, so the
            difference is the optimizer's alone).
At a cycle end the restart loops are scored on the weights they resume from (the jumped ones),
as the in-loop run is scored after its jump. The demo's learning rate is constant (no schedule).
Reported: real steps to first reach 0.90, 0.93 and (plain's final accuracy - 0.01), and the
accuracy after --budget real steps. One process, one thread; with --results FILE the runs are
kept there (JSON) as they finish, and a rerun with the same file reuses them.

    python benchmarks/bench_restart.py                                  # seeds 0 1 2
    python benchmarks/bench_restart.py --seeds 0 --plot restart.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_auto import first, one, plot

SCHEDULES = ("plain", "in-loop", "restart", "restart-fresh")
CYCLE, JUMP = 20, 40


def restart(seed: int, budget: int, keep_adam: bool, work: Path) -> dict:
    """The restart loop through native output; its held-out curve against real steps."""
    import torch
    from transformers import LlamaForCausalLM

    import relex
    from relex.demo import arithmetic as A
    from relex.demo.grpo import GRPOConfig, train
    from relex.demo.run import BASE
    from relex.evaluation.generation import quiet_transformers
    warnings.filterwarnings("ignore")
    quiet_transformers()
    torch.set_num_threads(1)
    test = A.heldout()
    model = LlamaForCausalLM.from_pretrained(BASE)
    run, base, resume = work / "run", BASE, None
    curve, jumps, fit_s = {}, [], 0.0
    for end in range(CYCLE, budget + 1, CYCLE):
        start = end - CYCLE
        train(model, run, GRPOConfig(steps=end, seed=seed, eval_every=10, save_every=2),
              on_step=lambda row: curve.update({row["step"]: row["accuracy"]}
                                               if "accuracy" in row else {}),
              save_state=True, resume_from=resume, resume_optimizer=keep_adam)
        out = work / f"jump-{end}"
        started = time.perf_counter()
        report = relex.extrapolate(
            base=base, checkpoints=[f"{s - start}={run / f'checkpoint-{s}'}"
                                    for s in range(start + 2, end + 1, 2)],
            targets=[CYCLE + JUMP], output=out, output_format="native", progress=False)
        fit_s += time.perf_counter() - started
        resume = out / f"step-{CYCLE + JUMP}" / f"checkpoint-{end}"
        before = curve[end]
        curve[end] = A.accuracy(LlamaForCausalLM.from_pretrained(resume), test)
        horizon = (report.horizon or {}).get("verified_up_to_step")
        jumps.append({"real_step": end, "before": before, "after": curve[end],
                      "verified_up_to": horizon})
        if start:  # the previous cycle's checkpoints and jump are no longer needed
            shutil.rmtree(work / f"jump-{start}")
        for s in range(start + 2, end, 2):
            shutil.rmtree(run / f"checkpoint-{s}")
        base = resume
    return {"curve": curve, "jumps": jumps, "extrapolate_s": round(fit_s, 1)}


def measure(seed: int, schedule: str, args) -> dict:
    started = time.perf_counter()
    if schedule == "plain":
        r = one(seed, "plain", args.plain_steps)
    elif schedule == "in-loop":
        r = one(seed, str(JUMP), 2 * args.budget)  # bench_auto runs steps // 2 real steps
    else:
        with tempfile.TemporaryDirectory(prefix=f"restart-{seed}-", dir=args.work) as tmp:
            r = restart(seed, args.budget, schedule == "restart", Path(tmp))
    r["curve"] = {str(s): a for s, a in sorted(r["curve"].items(), key=lambda x: int(x[0]))}
    r["seconds"] = round(time.perf_counter() - started, 1)
    return r


def median(xs: list) -> float | None:
    """The median, None (not reached) counting as larger than any step."""
    xs = sorted(xs, key=lambda x: float("inf") if x is None else x)
    return xs[len(xs) // 2] if len(xs) % 2 else (
        None if None in xs[len(xs) // 2 - 1:len(xs) // 2 + 1]
        else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=200, help="real steps of the relex runs")
    p.add_argument("--plain-steps", type=int, default=400)
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--work", type=Path, default=None, help="where the restart runs' checkpoints "
                                                           "go (a temporary directory each)")
    p.add_argument("--results", type=Path, help="keep the runs' curves in this JSON file")
    p.add_argument("--plot", type=Path, help="accuracy vs real steps per seed (PNG)")
    args = p.parse_args()
    if "plain" not in args.schedules:
        args.schedules.insert(0, "plain")
    results = json.loads(args.results.read_text()) if args.results and args.results.is_file() \
        else {}

    def key(seed, k):
        return f"{seed}/{k}/{args.plain_steps if k == 'plain' else args.budget}"

    def curve(seed, k):
        return {int(s): a for s, a in results[key(seed, k)]["curve"].items()}

    for seed in args.seeds:
        for k in args.schedules:
            if key(seed, k) not in results:
                results[key(seed, k)] = measure(seed, k, args)
                if args.results:
                    args.results.write_text(json.dumps(results, indent=1) + "\n")
            c = curve(seed, k)
            print(f"seed {seed} {k}: {results[key(seed, k)]['seconds']} s, accuracy "
                  f"{c[max(c)]:.3f} after {max(c)} real steps", flush=True)

    reach: dict[str, dict[str, list]] = {k: {"0.90": [], "0.93": [], "level": [], "end": []}
                                         for k in args.schedules}
    print(f"\n| seed | schedule | 0.90 | 0.93 | plain final - 0.01 | accuracy at "
          f"{args.budget} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed in args.seeds:
        plain = curve(seed, "plain")
        level = round(plain[max(plain)] - 0.01, 3)
        for k in args.schedules:
            c = curve(seed, k)
            got = [first(c, 0.90), first(c, 0.93), first(c, level)]
            end = c[args.budget]
            for name, x in zip(("0.90", "0.93", "level"), got):
                reach[k][name].append(x)
            reach[k]["end"].append(end)
            cells = ["-" if x is None else str(x) for x in got]
            print(f"| {seed} | {k} | {cells[0]} | {cells[1]} | {cells[2]} (of {level:.3f}) | "
                  f"{end:.3f} |")
    print(f"\nmedians over seeds {' '.join(map(str, args.seeds))} ('-': not reached in the "
          f"median seed)\n")
    print(f"| schedule | 0.90 | 0.93 | plain final - 0.01 | accuracy at {args.budget} |")
    print("| --- | --- | --- | --- | --- |")
    for k in args.schedules:
        m = [median(reach[k][n]) for n in ("0.90", "0.93", "level")]
        print(f"| {k} | " + " | ".join("-" if x is None else f"{x:g}" for x in m) +
              f" | {median(reach[k]['end']):.3f} |")
    if args.plot:
        plot(args.plot, {seed: {k: curve(seed, k) for k in args.schedules}
                         for seed in args.seeds}, args.budget,
             styles={"in-loop": {"lw": 4, "alpha": 0.4}})  # visible under an equal restart

if __name__ == "__main__":
    main()
