"""The `relex` command: a thin face over relex.extrapolate / relex.reconstruct.

It parses flags, calls the library, prints a summary table, and turns RelexError into one line
on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

import relex
from relex.errors import RelexError

EPILOG = """examples:
  relex extrapolate runs/grpo --base Qwen2.5-Math-1.5B --observe-until 75 \\
        --target 500 --target 750 --output out
  relex extrapolate --from-fit out --target 1000 --output out-1000
  relex reconstruct runs/grpo --base Qwen2.5-Math-1.5B --steps 25,50,75 --output recon

RUN_DIR layouts read: verl global_step_N/actor/huggingface, TRL/ROLL checkpoint-N,
OpenRLHF global_stepN_hf, NeMo-RL step_N (consolidated HF), plain step-N / step_N."""


def _inputs(p: argparse.ArgumentParser, run_dir_required: bool = False) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("run_dir", nargs=None if run_dir_required else "?", metavar="RUN_DIR",
                   help="training output directory holding the step checkpoints")
    g.add_argument("--base", metavar="DIR",
                   help="the model before RL (step 0); default: the run's step-0 checkpoint")
    g.add_argument("--checkpoint", action="append", default=[], metavar="STEP=PATH",
                   help="add a checkpoint explicitly (repeatable)")
    sel = g.add_mutually_exclusive_group()
    sel.add_argument("--observe-until", type=int, metavar="K",
                     help="use the checkpoints with step <= K")
    sel.add_argument("--steps", metavar="S1,S2,...", help="use exactly these observed steps")


def _output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and resources")
    g.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="directory to create; gets step-S/ model directories and the fit")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"],
                   help="output dtype of float tensors (default: the base model's)")
    g.add_argument("--max-memory", default="512MB", metavar="SIZE",
                   help="buffer budget; larger tensors are streamed twice (default 512MB)")
    g.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output safetensors shard (default 5GB)")
    g.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda")
    g.add_argument("--threads", type=int, metavar="N", help="torch threads (default: all cores)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relex", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Predict late RLVR checkpoints from a short prefix of the run (RELEX: "
                    "rank-1 weight trajectories, linear in the step).")
    parser.add_argument("--version", action="version", version=f"relex {relex.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser("extrapolate", help="write the models of future steps",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                        description="Fit the observed checkpoints and write the model of each "
                                    "--target step as a Hugging Face directory OUT/step-S/.")
    _inputs(ex)
    ex.add_argument("--from-fit", metavar="PATH",
                    help="reuse a saved fit (OUT or OUT/relex-fit.safetensors): no Gram pass")
    f = ex.add_argument_group("fit")
    f.add_argument("--target", action="append", type=int, required=True, metavar="S",
                   help="step to predict (repeatable)")
    f.add_argument("--method", default="relex", choices=["relex", "linear-weights"],
                   help="relex: rank-r projection + coefficient fit (default); linear-weights: "
                        "per-parameter least-squares line (baseline)")
    f.add_argument("--rank", type=int, default=1, help="singular components kept (default 1)")
    f.add_argument("--fit", default="linear", metavar="linear|polyN",
                   help="coefficient fit: linear (default) or a polynomial, e.g. poly2")
    f.add_argument("--window", type=int, metavar="W",
                   help="fit on the last W observed checkpoints only")
    f.add_argument("--allow-interpolation", action="store_true",
                   help="allow targets at or before the last observed step")
    _output(ex)

    rc = sub.add_parser("reconstruct", help="write the rank-r projection of observed steps",
                        description="Write theta_0 + the rank-r projection of each observed "
                                    "checkpoint's delta (is the trajectory really rank r?).")
    _inputs(rc)
    rc.add_argument("--rank", type=int, default=1, help="singular components kept (default 1)")
    _output(rc)

    an = sub.add_parser("analyze", help="measure a run's rank-1 geometry and backtest how far "
                                        "it extrapolates",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Finding 1 (explained variance by rank), Finding 2 (linearity "
                                    "of the rank-1 coefficient), denoising, and a backtest: fit "
                                    "on early checkpoints, predict later ones that exist. Writes "
                                    "OUT/report.html (self-contained), PNG figures, summary.json "
                                    "and tensors.csv.")
    _inputs(an)
    an.add_argument("--from-fit", metavar="PATH",
                    help="analyse a saved fit (relex-fit.safetensors or its directory); reads no "
                         "weights")
    g = an.add_argument_group("fit")
    g.add_argument("--rank", type=int, default=1, help="subspace rank (default 1)")
    g.add_argument("--fit", default="linear", metavar="linear|polyN", help="coefficient fit")
    g.add_argument("--window", type=int, metavar="W", help="fit on the last W checkpoints")
    g = an.add_argument_group("output and resources")
    g.add_argument("--output", "-o", required=True, metavar="DIR", help="report directory")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g.add_argument("--max-memory", default="512MB", metavar="SIZE", help="buffer budget")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--threads", type=int, metavar="N", help="torch threads")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    dm = sub.add_parser("demo", help="a real GRPO run on this CPU, extrapolated and checked",
                        description="Train a 0.4M-parameter Llama with GRPO on 3-digit addition "
                                    "(a few minutes on 2 cores), observe the first 15%% of the "
                                    "run, extrapolate it with relex and the linear-weights "
                                    "baseline, and score real vs extrapolated checkpoints.")
    dm.add_argument("--output", "-o", default="relex-demo", metavar="DIR",
                    help="working directory for checkpoints and the report (default relex-demo)")
    dm.add_argument("--steps", type=int, default=400, help="GRPO steps (default 400)")
    dm.add_argument("--observe-until", type=int, metavar="K",
                    help="steps relex observes (default 15%% of --steps)")
    dm.add_argument("--seed", type=int, default=0, help="GRPO sampling seed (default 0)")
    dm.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    dm.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def _table(report) -> str:
    s = report.summary()
    rows = [("targets", ", ".join(f"step {k}: {v}" for k, v in report.targets.items())),
            ("observed steps", _steps(report.observed_steps)),
            ("tensors", f"{s['tensors']} ({s['trajectory_tensors']} fitted, "
                        f"{s['copied_tensors']} copied"
                        + (f", dropped tied {', '.join(s['dropped_tensors'])}"
                           if s["dropped_tensors"] else "") + ")"),
            ("read", f"{s['bytes_read'] / 1e9:.2f} GB in {report.seconds:.1f} s "
                     f"({s['bytes_read'] / 1e9 / max(report.seconds, 1e-9):.2f} GB/s)")]
    if "explained_variance_mean" in s:
        rows.append((f"explained var. (rank {report.rank})",
                     f"mean {s['explained_variance_mean']:.4f}, min "
                     f"{s['explained_variance_min']:.4f}"))
        rows.append(("R^2 of coefficient fit",
                     f"mean {s['r2_mean']:.4f}, min {s['r2_min']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _steps(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{len(steps)} checkpoints, {steps[0]} .. {steps[-1]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "analyze":
            return _analyze(args)
        common = dict(base=args.base, checkpoints=args.checkpoint, steps=args.steps,
                      observe_until=args.observe_until, output=args.output, dtype=args.dtype,
                      overwrite=args.overwrite, max_memory=args.max_memory,
                      max_shard_size=args.max_shard_size, device=args.device,
                      threads=args.threads, progress=not args.quiet)
        if args.command == "extrapolate":
            report = relex.extrapolate(args.run_dir, targets=args.target, method=args.method,
                                       rank=args.rank, fit=args.fit, window=args.window,
                                       allow_interpolation=args.allow_interpolation,
                                       from_fit=args.from_fit, **common)
        else:
            report = relex.reconstruct(args.run_dir, rank=args.rank, **common)
    except RelexError as e:
        print(f"relex: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: nothing was moved into place
        print(f"relex: error: {e}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("relex: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"relex {args.command}: wrote {report.output}")
        print(_table(report))
    return 0


def _analyze(args) -> int:
    res = relex.analyze(args.run_dir, output=args.output, base=args.base,
                        checkpoints=args.checkpoint, observe_until=args.observe_until,
                        steps=args.steps, rank=args.rank, fit=args.fit, window=args.window,
                        from_fit=args.from_fit, overwrite=args.overwrite,
                        max_memory=args.max_memory, device=args.device, threads=args.threads,
                        progress=not args.quiet)
    if args.quiet:
        return 0
    s = res.summary
    f1, bt = s["finding1_explained_variance"], s["backtest"]
    last = s["observed_steps"][-1]
    rows = [("observed steps", _steps(s["observed_steps"])),
            ("later steps (oracle)", _steps(s["later_steps"]) if s["later_steps"] else "none"),
            ("explained var. rank 1", f"mean {f1['by_rank_mean'][0]:.4f}, min "
                                      f"{f1['rank1_min']:.4f}" if f1["by_rank_mean"] else "-"),
            ("R^2 of coefficient line", f"mean {s['finding2_linearity']['r2_mean']}, min "
                                        f"{s['finding2_linearity']['r2_min']}"),
            ("backtest: verified horizon", f"{bt['verified_horizon_ratio']:.2f}x the window "
                                           f"(up to step {bt['verified_up_to_step']})"),
            ("backtest: estimated limit", "no limit in sight" if bt["estimated_limit_ratio"]
             is None else f"{bt['estimated_limit_ratio']:.1f}x (step "
                          f"{int(bt['estimated_limit_ratio'] * last)})"),
            ("read", f"{res.bytes_read / 1e9:.2f} GB in {res.seconds:.1f} s")]
    width = max(len(k) for k, _ in rows)
    print(f"relex analyze: wrote {res.output / 'report.html'}")
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return 0


def _demo(args) -> int:
    from relex.demo import run_demo, table
    result = run_demo(args.output, steps=args.steps, observe_until=args.observe_until,
                      seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    print(f"relex demo: GRPO for {result.steps} steps, relex observed the first "
          f"{result.observe_until}; held-out accuracy (500 problems, greedy):\n")
    print(table(result))
    print()
    for line in result.verdict:
        print(f"- {line}")
    t = result.timings
    print(f"\ntraining {t['train']:.0f} s, extrapolation "
          f"{sum(v for k, v in t.items() if k.startswith('extrapolate')):.1f} s, evaluation "
          f"{sum(v for k, v in t.items() if k.startswith('evaluate')):.1f} s")
    print(f"report: {result.output / 'summary.json'}, plot: {result.output / 'demo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
