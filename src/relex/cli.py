"""The `relex` command: a thin face over relex.extrapolate / relex.reconstruct.

It parses flags, calls the library, prints a summary table, and turns RelexError into one line
on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from relex import api
from relex.checkpoints.inputs import parse_steps
from relex.errors import RelexError, one_line
from relex.options import (EvalOptions, FitOptions, Inputs, LoopOptions, OutputOptions,
                           Resources)
from relex.stream import torchrun
from relex.version import __version__

EPILOG = """examples:
  relex demo                                    # a real GRPO run on this CPU, ~2 minutes
  relex extrapolate runs/grpo --base Qwen2.5-Math-1.5B --observe-until 75 \\
        --target 500 --target 750 --output out
  relex analyze runs/grpo --base Qwen2.5-Math-1.5B --observe-until 75 --output report
  relex sweep runs/grpo --base Qwen2.5-Math-1.5B --observe-until 75 \\
        --targets 200,300,500,750,1000 --dataset dev.jsonl --output sweep
  relex eval out/step-500 --dataset math500 --n 8 --temperature 0.6 --output eval
  relex extrapolate --from-fit out --target 1000 --output out-1000

many processes / nodes: torchrun --nproc-per-node N [--nnodes M ...] -m relex extrapolate ...

RUN_DIR layouts read (docs/formats.md):
  verl           global_step_N/actor/huggingface, or the FSDP1/FSDP2 rank files
                 global_step_N/actor/model_world_size_W_rank_R.pt; LoRA: .../actor/lora_adapter
  TRL / ROLL     checkpoint-N, or its FSDP torch DCP dir checkpoint-N/pytorch_model_fsdp_0
  OpenRLHF       global_stepN_hf, or DeepSpeed ZeRO-1/2 checkpoints _actor/global_stepN
  NeMo-RL        step_N/policy/weights (torch DCP, per-rank safetensors, or consolidated/)
  PEFT LoRA      checkpoint-N/adapter_model.safetensors + adapter_config.json (needs --base)
  the Hub        hf://ORG/REPO, a branch per checkpoint (step_N; --revision-pattern)
  anything       step-N, step_N, or --checkpoint STEP=PATH (repeatable)"""


def arg(*flags: str, **kw) -> tuple:
    """An option that one command alone has (declared here, in its row of COMMANDS)."""
    return flags, kw


@dataclass
class Command:
    """One row of the command table: its help, its option groups and the function it runs.

    groups: (option group, {field: changes} or None, fields to use or None) in help order;
    extra: the command's own arguments (arg(...))."""

    help: str
    description: str
    run: Callable[[argparse.Namespace], int]
    groups: list[tuple] = field(default_factory=list)
    extra: list[tuple] = field(default_factory=list)
    epilog: bool = False


FIT = ["method", "rank", "fit", "window"]
RESOURCES = (Resources, None, None)
REQUIRED_OUTPUT = {"output": {"required": True}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relex", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Predict late RLVR checkpoints from a short prefix of the run (RELEX: "
                    "rank-1 weight trajectories, linear in the step).")
    parser.add_argument("--version", action="version", version=f"relex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        look = dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG) \
            if cmd.epilog else {}
        p = sub.add_parser(name, help=cmd.help, description=cmd.description, **look)
        for group, changes, only in cmd.groups:
            group.add_to(p, changes, only)
        for flags, kw in cmd.extra:
            p.add_argument(*flags, **kw)
        p.set_defaults(run=cmd.run)
    return parser


def call(fn, args: argparse.Namespace, **extra):
    """fn with the parsed options it takes (flags' destinations are the API's keyword names)."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RelexError as e:
        print(f"relex: error: {one_line(e)}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        print(f"relex: error: the GPU ran out of memory ({str(e).splitlines()[0][:160]}); "
              f"give a smaller --max-memory or fewer --threads; nothing was written",
              file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: nothing was moved into place
        print(f"relex: error: {e}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("relex: interrupted; nothing was written", file=sys.stderr)
        return 130


def _write_models(args) -> int:
    """extrapolate and reconstruct: torchrun or not is decided here, once."""
    group = torchrun.from_environment(args.device)
    fn = api.extrapolate if args.command == "extrapolate" else api.reconstruct
    with warnings.catch_warnings():  # notes are printed below, as one line each
        warnings.simplefilter("ignore", UserWarning)
        report = call(fn, args, group=group)
    if group.leader:
        for note in report.notes:
            print(f"relex: note: {note}", file=sys.stderr)
        for line in report.warnings:
            print(f"relex: warning: {line}", file=sys.stderr)
    if args.progress and group.leader:  # torchrun: rank 0 reports
        print(f"relex {args.command}: wrote {report.output}")
        print(report)
    return 0


def _jump(args) -> int:
    from relex.loop.restart import jump
    with warnings.catch_warnings():  # printed below, one line each
        warnings.simplefilter("ignore", UserWarning)
        report = call(jump, args)
    for line in report.warnings:
        print(f"relex: warning: {line}", file=sys.stderr)
    if args.progress:
        print(f"relex jump: wrote {report.output}")
        print(report)
    for note in report.notes:
        print(f"relex: {note}")
    return 0


def _analyze(args) -> int:
    res = call(api.analyze, args)
    if not args.progress:
        return 0
    print(f"relex analyze: wrote {res.output / 'report.html'}")
    print(res)
    return 0


def _eval(args) -> int:
    from relex.evaluation.evaluate import evaluate, grade_responses
    if args.responses:
        if args.models:
            raise RelexError("give MODEL_DIRs or --responses, not both")
        m = grade_responses(args.responses, answer_field=args.answer_field,
                            response_field=args.response_field, id_field=args.id_field,
                            output=args.output)
        print(_metrics_table({args.responses: m}))
        return 0
    if not args.models or not args.dataset:
        raise RelexError("give MODEL_DIR(s) and --dataset (or --responses FILE)")
    scores = call(evaluate, args)
    print(_metrics_table({s.label: s.metrics for s in scores}))
    if args.output:
        print(f"samples and summary.json in {args.output}")
    return 0


def _sweep(args) -> int:
    from relex.evaluation.sweep import sweep
    if not args.dataset:
        raise RelexError("--dataset is required (a dev set, not your test set)")
    res = call(sweep, args)
    print(f"relex sweep: {res.metric} on the dev set by target step")
    print(f"  {'step':>6} {'extrapolated':>13} {'real':>7}")
    for t, v in res.scores.items():
        real = f"{res.real[t]:.3f}" if t in res.real else "-"
        mark = ("  <- best" if t == res.best_step else "") + (
            "  (beyond the verified horizon)" if t in res.beyond else "")
        print(f"  {t:>6} {v:>13.3f} {real:>7}{mark}")
    print(f"best: step {res.best_step} -> {res.output / 'best'} ({res.best_dir}); plot: "
          f"{res.output / 'sweep.png'}")
    return 0


def _metrics_table(rows: dict[str, dict]) -> str:
    keys = []
    for m in rows.values():
        keys += [k for k in m if k not in keys and k not in ("problems", "samples_per_problem")]
    width = max(len(str(k)) for k in rows) if rows else 5
    head = f"{'model':<{width}} {'problems':>8} {'n':>3} " + " ".join(f"{k:>9}" for k in keys)
    lines = [head]
    for name, m in rows.items():
        vals = " ".join(f"{m[k]:>9.4f}" if k in m else f"{'-':>9}" for k in keys)
        lines.append(f"{name:<{width}} {m['problems']:>8} {m['samples_per_problem']:>3} {vals}")
    return "\n".join(lines)


def _watch(args) -> int:
    from relex.analysis.watch import watch
    try:
        res = call(watch, args, target=args.targets)
    except KeyboardInterrupt:  # outputs are atomic: nothing half-written is left
        print("relex watch: interrupted", file=sys.stderr)
        return 130
    return 0 if res.written is not None or not args.write_when_verified else 1


def _demo(args) -> int:
    from relex.demo.run import run_demo, table
    result = call(run_demo, args)
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


COMMANDS = {
    "extrapolate": Command(
        "write the models of future steps",
        "Fit the observed checkpoints and write the model of each --target step as a Hugging "
        "Face model directory OUT/step-S/.", _write_models, epilog=True,
        groups=[(Inputs, None, None),
                (FitOptions, {"targets": {"required": True}}, None),
                (OutputOptions, REQUIRED_OUTPUT, None), RESOURCES]),
    "reconstruct": Command(
        "write the rank-r projection of observed steps",
        "Write theta_0 + the rank-r projection of each observed checkpoint's delta (is the "
        "trajectory really rank r?).", _write_models,
        groups=[(Inputs, None, [f for f in Inputs.names() if f != "from_fit"]),
                (FitOptions, None, ["rank"]),
                (OutputOptions, REQUIRED_OUTPUT,
                 ["output", "overwrite", "dtype", "max_shard_size", "progress"]), RESOURCES]),
    "jump": Command(
        "jump a running training ahead through its own checkpoints (any trainer)",
        "The restart loop: fit the checkpoints RUN_DIR saved since the last jump, write the "
        "model --ahead steps further into a copy of its last checkpoint (optimizer, schedule, "
        "data order kept: --output-format native) as OUT/jump-K/, and print the trainer's "
        "resume command. Stop the trainer, run this, resume; repeat.", _jump,
        groups=[(Inputs, {"run_dir": {"nargs": None, "help": "the training output directory"},
                          "base": {"required": True,
                                   "help": "the model before RL (used by the first jump)"}},
                 ["run_dir", "base"]),
                (FitOptions, None, ["method", "fit", "window"]),
                (OutputOptions, {"output": {"required": True,
                                            "help": "directory of the jumps (jump-1/, ...)"}},
                 ["output", "progress", "allow_fresh_optimizer"]),
                (Resources, None, ["max_memory", "threads"])],
        extra=[arg("--ahead", type=int, required=True, metavar="J",
                   help="steps to jump past the latest checkpoint")]),
    "analyze": Command(
        "measure a run's rank-1 geometry and backtest how far it extrapolates",
        "Finding 1 (explained variance by rank), Finding 2 (linearity of the rank-1 "
        "coefficient), denoising, and a backtest: fit on early checkpoints, predict later ones "
        "that exist. Writes OUT/report.html (self-contained), PNG figures, summary.json and "
        "tensors.csv.", _analyze,
        groups=[(Inputs, {"from_fit": {"help": "analyse a saved fit (relex-fit.safetensors or "
                                               "its directory); reads no weights"}}, None),
                (FitOptions, None, ["rank", "fit", "window"]),
                (OutputOptions, {"output": {"required": True, "help": "report directory"}},
                 ["output", "overwrite", "progress"]), RESOURCES]),
    "eval": Command(
        "score models with a verifiable reward, or grade responses made elsewhere",
        "Generate with vLLM (if installed and a GPU is present) or transformers, grade with "
        "math-verify (exact match for the demo's arithmetic task), report accuracy, avg@n and "
        "pass@k. With --output, samples are written as they are graded and an interrupted run "
        "resumes.", _eval,
        extra=[arg("models", nargs="*", metavar="MODEL_DIR", help="model directories to score"),
               arg("--responses", metavar="FILE.jsonl",
                   help="grade these completions instead of generating (one JSON object per "
                        "line with the gold answer and the response)"),
               arg("--response-field", default="response", help="(with --responses)"),
               arg("--id-field", help="(with --responses) rows sharing it are samples of one "
                                      "problem")],
        groups=[(EvalOptions, None, None),
                (OutputOptions, {"output": {"help": "write samples and summary.json here"}},
                 ["output", "progress"])]),
    "sweep": Command(
        "extrapolate to many steps, score each on a dev set, keep the best",
        "One streaming pass writes every --targets step; each is scored on --dataset (and real "
        "checkpoints at those steps, for comparison); OUT/best points at the winner.", _sweep,
        groups=[(Inputs, None, ["run_dir", "base", "revision_pattern", "checkpoints",
                                "observe_until", "steps"]),
                (FitOptions, {"targets": {"flags": ("--targets",), "action": "store",
                                          "type": parse_steps, "required": True,
                                          "metavar": "S1,S2,...",
                                          "help": "target steps to try, e.g. 200,300,400,600,800"}},
                 ["targets", *FIT]),
                (EvalOptions, None, None),
                (OutputOptions, {"output": {"required": True,
                                            "help": "directory of the candidates, scores and "
                                                    "best/"}},
                 ["output", "overwrite", "progress"]),
                (Resources, None, ["max_memory", "device"])],
        extra=[arg("--keep-all", action="store_true",
                   help="keep every candidate, not only the best"),
               arg("--metric", help="what to maximise: accuracy (default) or avg@N / pass@K")]),
    "watch": Command(
        "follow a live run directory (verl, OpenRLHF, ...): analyze each new checkpoint, write "
        "the target once verified",
        "Poll RUN_DIR; at each new complete checkpoint rerun the analysis (explained variance, "
        "R^2, backtest horizon) and say whether --target lies inside the verified horizon. "
        "Checkpoints still being written are never read.", _watch,
        groups=[(Inputs, {"run_dir": {"nargs": None, "help": "the training output directory; "
                                      "it must exist (mkdir -p it to wait for a run that has "
                                      "not started yet)"},
                          "base": {"required": True, "help": "the model before RL"}},
                 ["run_dir", "base"]),
                (FitOptions, {"targets": {"action": "store", "required": True,
                                          "help": "step to predict"}}, ["targets", "rank"]),
                (OutputOptions, {"output": {"help": "where the target model goes"}},
                 ["output"])],
        extra=[arg("--write-when-verified", action="store_true",
                   help="write OUTPUT/step-S once the backtest verifies S, then exit"),
               arg("--report", metavar="DIR",
                   help="keep the latest analysis and watch.json here (default: temporary)"),
               arg("--interval", type=float, default=60.0, metavar="SEC",
                   help="seconds between polls (default 60)"),
               arg("--once", action="store_true",
                   help="analyze the run as it is now (e.g. a finished run), write the report "
                        "(and the target with --write-when-verified) and exit; looks twice, "
                        "min(--interval, 2) seconds apart, so a checkpoint still being written "
                        "is not read"),
               arg("--timeout", type=float, metavar="SEC", help="stop after SEC seconds")]),
    "demo": Command(
        "a real GRPO run on this CPU, extrapolated and checked",
        "Train a 0.4M-parameter Llama with GRPO on 3-digit addition (about 2 minutes on 2 "
        "cores), observe the first 15% of the run, extrapolate it with relex and the "
        "linear-weights baseline, and score real vs extrapolated checkpoints.", _demo,
        groups=[(OutputOptions, {"output": {"default": "relex-demo",
                                            "help": "working directory for checkpoints and the "
                                                    "report (default relex-demo)"},
                                 "progress": {"help": "no progress bar"}},
                 ["output", "overwrite", "progress"]),
                (Inputs, {"observe_until": {"help": "steps relex observes (default 15%% of "
                                                    "--steps)"}}, ["observe_until"]),
                (LoopOptions, {"cycle": {"help": "accelerated run: real steps per relex cycle "
                                                 "(default 20; 10 with --jump auto)"},
                               "jump": {"help": "accelerated run: steps jumped after each cycle "
                                                "(default auto; 0 skips the accelerated run)"}},
                 ["cycle", "jump"])],
        extra=[arg("--steps", type=int, default=400, help="GRPO steps (default 400)"),
               arg("--seed", type=int, default=0, help="GRPO sampling seed (default 0)")]),
}


if __name__ == "__main__":
    sys.exit(main())
