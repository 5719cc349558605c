"""The `relex` command: a thin face over relex.extrapolate / relex.reconstruct.

It parses flags, calls the library, prints a summary table, and turns RelexError into one line
on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from relex import api
from relex.stream import torchrun
from relex.version import __version__
from relex.errors import RelexError, one_line
from relex.checkpoints import hub

EPILOG = """examples:
  relex demo                                    # a real GRPO run on this CPU, ~4 minutes
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


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number")
    return n


def _inputs(p: argparse.ArgumentParser, run_dir_required: bool = False) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("run_dir", nargs=None if run_dir_required else "?", metavar="RUN_DIR",
                   help="training output directory holding the step checkpoints, or "
                        "hf://ORG/REPO (its step_N branches)")
    g.add_argument("--base", metavar="DIR",
                   help="the model before RL (step 0); default: the run's step-0 checkpoint "
                        "(or ORG/REPO[@REV] on the hub)")
    g.add_argument("--revision-pattern", default=hub.DEFAULT_PATTERN, metavar="PATTERN",
                   help="with hf://ORG/REPO: the branch names of the checkpoints, {N} the step "
                        "(default step_{N})")
    g.add_argument("--checkpoint", action="append", default=[], metavar="STEP=PATH",
                   help="add a checkpoint explicitly (repeatable)")
    sel = g.add_mutually_exclusive_group()
    sel.add_argument("--observe-until", type=int, metavar="K",
                     help="use the checkpoints with step <= K")
    sel.add_argument("--steps", metavar="S1,S2,...", help="use exactly these observed steps")


def _integrity(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("damaged inputs (see docs/robustness.md)")
    g.add_argument("--skip-unreadable", action="store_true",
                   help="leave out discovered checkpoints that cannot be opened, with a warning "
                        "naming each (default: stop with an error)")
    g.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false",
                   help="do not check the CRC-32 of torch.save tensor bytes as they are read "
                        "(verl FSDP, DCP, DeepSpeed); damaged bytes then go unnoticed")


def _output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and resources")
    g.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="directory to create; gets step-S/ model directories and the fit")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"],
                   help="output dtype of float tensors (default: the base model's)")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget per process; tensors whose inputs (or, for fp16 "
                        "inputs, float delta rows) do not fit are streamed twice (default: a "
                        "quarter of the available RAM, at least 512MB; under torchrun shared "
                        "by the processes of a node)")
    g.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output safetensors shard (default 5GB)")
    g.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda")
    g.add_argument("--threads", type=_positive, metavar="N",
                   help="worker threads (default: all cores; 8 feeding a GPU)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relex", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Predict late RLVR checkpoints from a short prefix of the run (RELEX: "
                    "rank-1 weight trajectories, linear in the step).")
    parser.add_argument("--version", action="version", version=f"relex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser("extrapolate", help="write the models of future steps",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                        description="Fit the observed checkpoints and write the model of each "
                                    "--target step as a Hugging Face directory OUT/step-S/.")
    _inputs(ex)
    _integrity(ex)
    ex.add_argument("--from-fit", metavar="PATH",
                    help="reuse a saved fit (an extrapolate/analyze output dir or its "
                         "relex-fit.safetensors): no Gram pass; --steps / --observe-until pick "
                         "among its steps")
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
    lo = ex.add_argument_group("LoRA runs")
    lo.add_argument("--output-format", default="hf", choices=["hf", "lora"],
                    help="hf: a model directory per target (default); lora: a PEFT adapter "
                         "directory per target (adapter_config.json + "
                         "adapter_model.safetensors; a LoRA run only)")
    lo.add_argument("--lora-rank", type=int, metavar="R",
                    help="with --output-format lora: the adapter's rank (default: the run's r; "
                         "at most T*r, the rank of the extrapolated delta)")

    rc = sub.add_parser("reconstruct", help="write the rank-r projection of observed steps",
                        description="Write theta_0 + the rank-r projection of each observed "
                                    "checkpoint's delta (is the trajectory really rank r?).")
    _inputs(rc)
    _integrity(rc)
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
    _integrity(an)
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
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="buffer budget (default: a quarter of the available RAM, at least 512MB)")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--threads", type=_positive, metavar="N",
                   help="worker threads (default: all cores; 8 feeding a GPU)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    ev = sub.add_parser("eval", help="score models with a verifiable reward, or grade "
                                     "responses made elsewhere",
                        description="Generate with vLLM (if installed and a GPU is present) or "
                                    "transformers, grade with math-verify (exact match for the "
                                    "demo's arithmetic task), report accuracy, avg@n and "
                                    "pass@k. With --output, samples are written as they are "
                                    "graded and an interrupted run resumes.")
    ev.add_argument("models", nargs="*", metavar="MODEL_DIR", help="model directories to score")
    ev.add_argument("--responses", metavar="FILE.jsonl",
                    help="grade these completions instead of generating (one JSON object per "
                         "line with the gold answer and the response)")
    ev.add_argument("--response-field", default="response", help="(with --responses)")
    ev.add_argument("--id-field", help="(with --responses) rows sharing it are samples of one "
                                      "problem")
    _eval_args(ev)
    ev.add_argument("--output", "-o", metavar="DIR", help="write samples and summary.json here")

    sw = sub.add_parser("sweep", help="extrapolate to many steps, score each on a dev set, keep "
                                      "the best",
                        description="One streaming pass writes every --targets step; each is "
                                    "scored on --dataset (and real checkpoints at those steps, "
                                    "for comparison); OUT/best points at the winner.")
    _inputs(sw)
    sw.add_argument("--targets", required=True, metavar="S1,S2,...",
                    help="target steps to try, e.g. 200,300,400,600,800")
    sw.add_argument("--method", default="relex", choices=["relex", "linear-weights"])
    sw.add_argument("--rank", type=int, default=1)
    sw.add_argument("--fit", default="linear", metavar="linear|polyN")
    sw.add_argument("--window", type=int, metavar="W")
    sw.add_argument("--keep-all", action="store_true", help="keep every candidate, not only "
                                                            "the best")
    sw.add_argument("--metric", help="what to maximise: accuracy (default) or avg@N / pass@K")
    _eval_args(sw)
    sw.add_argument("--output", "-o", required=True, metavar="DIR")
    sw.add_argument("--overwrite", action="store_true")
    sw.add_argument("--max-memory", metavar="SIZE",
                    help="buffer budget (default: a quarter of the available RAM, at least 512MB)")
    sw.add_argument("--device", default="cpu")

    wa = sub.add_parser("watch", help="follow a live run directory (verl, OpenRLHF, ...): "
                                      "analyze each new checkpoint, write the target once "
                                      "verified",
                        description="Poll RUN_DIR; at each new complete checkpoint rerun the "
                                    "analysis (explained variance, R^2, backtest horizon) and "
                                    "say whether --target lies inside the verified horizon. "
                                    "Checkpoints still being written are never read.")
    wa.add_argument("run_dir", metavar="RUN_DIR",
                    help="the training output directory; it must exist (mkdir -p it to wait for "
                         "a run that has not started yet)")
    wa.add_argument("--base", required=True, metavar="DIR", help="the model before RL")
    wa.add_argument("--target", type=int, required=True, metavar="S", help="step to predict")
    wa.add_argument("--write-when-verified", action="store_true",
                    help="write OUTPUT/step-S once the backtest verifies S, then exit")
    wa.add_argument("--output", "-o", metavar="DIR", help="where the target model goes")
    wa.add_argument("--report", metavar="DIR",
                    help="keep the latest analysis and watch.json here (default: temporary)")
    wa.add_argument("--interval", type=float, default=60.0, metavar="SEC",
                    help="seconds between polls (default 60)")
    wa.add_argument("--once", action="store_true",
                    help="analyze the run as it is now (e.g. a finished run), write the report "
                         "(and the target with --write-when-verified) and exit; looks twice, "
                         "min(--interval, 2) seconds apart, so a checkpoint still being written "
                         "is not read")
    wa.add_argument("--timeout", type=float, metavar="SEC", help="stop after SEC seconds")
    wa.add_argument("--rank", type=int, default=1, help="subspace rank (default 1)")

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
    dm.add_argument("--cycle", type=int, default=20,
                    help="accelerated run: real steps per relex cycle (default 20)")
    dm.add_argument("--jump", type=int, default=40,
                    help="accelerated run: steps jumped after each cycle (default 40; 0 skips "
                         "the accelerated run)")
    dm.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    dm.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def _eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--dataset", help="JSONL/JSON/Parquet file, a hub dataset (math500, aime24, "
                                     "aime25, amc23 or a repo id), or arithmetic / "
                                     "arithmetic-dev (the demo's task)")
    g.add_argument("--question-field", help="default: question, problem or prompt")
    g.add_argument("--answer-field", default="answer")
    g.add_argument("--split", help="hub dataset split")
    g.add_argument("--limit", type=int, help="first N problems only")
    g.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); e.g. 0.6 with --n 8")
    g.add_argument("--max-tokens", type=int, default=1024, help="new tokens per response")
    g.add_argument("--template", default="auto",
                   help="auto (chat template if any), qwen-math, raw, or a string with "
                        "{question}")
    g.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    g.add_argument("--batch-size", type=int, default=16, help="problems per generate call")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", "-q", action="store_true")


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
    if "norm_share_mean" in s:
        rows.append((f"adapter rank {s['lora_rank']}",
                     f"keeps {s['norm_share_mean']:.4f} of the delta's Frobenius norm on "
                     f"average, {s['norm_share_min']:.4f} at least"))
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
        if args.command == "eval":
            return _eval(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "watch":
            return _watch(args)
        group = torchrun.from_environment(args.device)  # torchrun or not: decided here, once
        common = dict(group=group, base=args.base, checkpoints=args.checkpoint, steps=args.steps,
                      revision_pattern=args.revision_pattern,
                      observe_until=args.observe_until, output=args.output, dtype=args.dtype,
                      overwrite=args.overwrite, max_memory=args.max_memory,
                      max_shard_size=args.max_shard_size, device=args.device,
                      threads=args.threads, progress=not args.quiet,
                      skip_unreadable=args.skip_unreadable,
                      verify_checksums=args.verify_checksums)
        if args.command == "extrapolate":
            with warnings.catch_warnings():  # notes are printed below, as one line each
                warnings.simplefilter("ignore", UserWarning)
                report = api.extrapolate(args.run_dir, targets=args.target,
                                           method=args.method, rank=args.rank, fit=args.fit,
                                           window=args.window,
                                           allow_interpolation=args.allow_interpolation,
                                           from_fit=args.from_fit,
                                           output_format=args.output_format,
                                           lora_rank=args.lora_rank, **common)
        else:
            report = api.reconstruct(args.run_dir, rank=args.rank, **common)
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
    if group.leader:
        for note in report.notes:
            print(f"relex: note: {note}", file=sys.stderr)
    if not args.quiet and group.leader:  # torchrun: rank 0 reports
        print(f"relex {args.command}: wrote {report.output}")
        print(_table(report))
    return 0


def _analyze(args) -> int:
    res = api.analyze(args.run_dir, output=args.output, base=args.base,
                        checkpoints=args.checkpoint, observe_until=args.observe_until,
                        steps=args.steps, rank=args.rank, fit=args.fit, window=args.window,
                        revision_pattern=args.revision_pattern,
                        from_fit=args.from_fit, overwrite=args.overwrite,
                        max_memory=args.max_memory, device=args.device, threads=args.threads,
                        progress=not args.quiet, skip_unreadable=args.skip_unreadable,
                        verify_checksums=args.verify_checksums)
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
    scores = evaluate(args.models, args.dataset, n=args.n, temperature=args.temperature,
                      max_tokens=args.max_tokens, template=args.template,
                      backend=args.backend, seed=args.seed, batch_size=args.batch_size,
                      limit=args.limit, question_field=args.question_field,
                      answer_field=args.answer_field, split=args.split, output=args.output,
                      progress=not args.quiet)
    print(_metrics_table({s.label: s.metrics for s in scores}))
    if args.output:
        print(f"samples and summary.json in {args.output}")
    return 0


def _sweep(args) -> int:
    from relex.evaluation.sweep import sweep
    from relex.checkpoints.inputs import parse_steps
    if not args.dataset:
        raise RelexError("--dataset is required (a dev set, not your test set)")
    res = sweep(args.run_dir, targets=parse_steps(args.targets), dataset=args.dataset,
                output=args.output, base=args.base, checkpoints=args.checkpoint,
                observe_until=args.observe_until, steps=args.steps, method=args.method,
                rank=args.rank, fit=args.fit, window=args.window, keep_all=args.keep_all,
                metric=args.metric, n=args.n, temperature=args.temperature,
                max_tokens=args.max_tokens, template=args.template, backend=args.backend,
                seed=args.seed, limit=args.limit, question_field=args.question_field,
                answer_field=args.answer_field, split=args.split, overwrite=args.overwrite,
                max_memory=args.max_memory, device=args.device,
                revision_pattern=args.revision_pattern, progress=not args.quiet)
    print(f"relex sweep: {res.metric} on the dev set by target step")
    print(f"  {'step':>6} {'extrapolated':>13} {'real':>7}")
    for t, v in res.scores.items():
        real = f"{res.real[t]:.3f}" if t in res.real else "-"
        mark = "  <- best" if t == res.best_step else ""
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
        res = watch(args.run_dir, base=args.base, target=args.target,
                    write_when_verified=args.write_when_verified, output=args.output,
                    report=args.report, interval=args.interval,
                    once=args.once, timeout=args.timeout, rank=args.rank)
    except KeyboardInterrupt:  # outputs are atomic: nothing half-written is left
        print("relex watch: interrupted", file=sys.stderr)
        return 130
    return 0 if res.written is not None or not args.write_when_verified else 1


def _demo(args) -> int:
    from relex.demo.run import run_demo, table
    result = run_demo(args.output, steps=args.steps, observe_until=args.observe_until,
                      seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
                      cycle=args.cycle, jump=args.jump)
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
