"""Every user-facing option, declared once: name, default, help and how it looks as a flag.

An option group is a dataclass (Inputs, FitOptions, Resources, OutputOptions, EvalOptions,
LoopOptions). The same declaration serves four faces:

- the Python API: `@takes(Inputs, FitOptions, ...)` lets a public function accept the groups'
  fields as keyword arguments (with a real signature and an "Options" section in its docstring)
  and hands it the filled groups;
- the CLI: `Group.add_to(parser)` adds the flags, `Group.from_args(namespace)` reads them back;
- the loop: `Accelerator`, the TRL callback and verl's `relex.` config section all take
  LoopOptions' fields.

A command may show an option differently (required, another flag name, its own help wording)
through `add_to(parser, changes)`; the option itself stays declared here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from relex.checkpoints import hub
from relex.errors import RelexError


def option(default: Any, *flags: str, help: str, section: str | None = None,
           exclusive: str | None = None, **argparse_kw) -> Any:
    """A dataclass field that also says how it appears on the command line.

    flags: its flags ("--base") or, for a positional argument, its name ("run_dir");
    section: the help section (argparse argument group) it is listed under; exclusive: options
    sharing this tag are mutually exclusive on the command line."""
    meta = {"flags": flags, "help": help, "section": section, "exclusive": exclusive,
            "argparse": argparse_kw}
    return field(default=default, metadata=meta)


def jump_size(text: str) -> int | str:
    """argparse type of --jump: a number of steps or "auto"."""
    return "auto" if str(text) == "auto" else int(text)


jump_size.expects = "int (steps) or 'auto'"


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number")
    return n


class OptionGroup:
    """What every option dataclass can do: add itself to a parser, read itself back."""

    #: the keyword under which @takes hands the filled group to the function
    key: ClassVar[str]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def add_to(cls, parser: argparse.ArgumentParser, changes: dict | None = None,
               only: list[str] | None = None) -> None:
        """Add the group's flags to `parser` (or only the fields named in `only`).

        changes: {field name: argparse keyword arguments} for this command only, e.g.
        {"output": {"required": True, "help": "report directory"}}; "flags" renames the flag."""
        changes = changes or {}
        sections = parser.__dict__.setdefault("_relex_sections", {})
        exclusive: dict[str, Any] = {}
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            kw = {"help": meta["help"], **meta["argparse"], **changes.get(f.name, {})}
            flags = kw.pop("flags", meta["flags"])
            title = kw.pop("section", meta["section"])
            target = parser
            if title is not None:
                if title not in sections:
                    sections[title] = parser.add_argument_group(title)
                target = sections[title]
            if meta["exclusive"] is not None:
                tag = meta["exclusive"]
                if tag not in exclusive:
                    exclusive[tag] = target.add_mutually_exclusive_group()
                target = exclusive[tag]
            if flags[0].startswith("-"):
                kw.setdefault("dest", f.name)
                kw.setdefault("default", f.default)
            target.add_argument(*flags, **kw)

    @classmethod
    def from_args(cls, ns: argparse.Namespace):
        """The group as parsed; fields the command did not offer keep their defaults."""
        return cls(**{n: getattr(ns, n) for n in cls.names() if hasattr(ns, n)})

    @staticmethod
    def doc_line(f) -> str:
        """One docstring line for field `f`: its name, help and default."""
        shown = f.default is MISSING or "default" in f.metadata["help"]
        default = "" if shown else f"; default {f.default!r}"
        return f"    {f.name}: {f.metadata['help']}{default}"


# --- options shared by several groups (one declaration each) -------------------------------
def _method():
    return option("relex", "--method", choices=["relex", "linear-weights"],
                  help="relex: rank-r projection + coefficient fit (default); linear-weights: "
                       "per-parameter least-squares line (baseline)", section="fit")


def _rank():
    return option(1, "--rank", type=int, help="singular components kept (default 1)",
                  section="fit")


def _seed():
    return option(0, "--seed", type=int, help="sampling seed (default 0)")


@dataclass
class Inputs(OptionGroup):
    """Where the checkpoints come from (checkpoints/inputs.py resolves them)."""

    key: ClassVar[str] = "inputs"
    run_dir: str | Path | None = option(
        None, "run_dir", nargs="?", metavar="RUN_DIR", section="inputs",
        help="training output directory holding the step checkpoints, or hf://ORG/REPO (its "
             "step_N branches)")
    base: str | Path | None = option(
        None, "--base", metavar="DIR", section="inputs",
        help="the model before RL (step 0); default: the run's step-0 checkpoint (or "
             "ORG/REPO[@REV] on the hub)")
    hf_config: str | Path | None = option(
        None, "--hf-config", metavar="PATH", section="inputs",
        help="the run's Hugging Face config.json (or its directory), for checkpoints that keep "
             "none (Megatron torch_dist: default, one beside or above the checkpoint, or the "
             "base's)")
    revision_pattern: str = option(
        hub.DEFAULT_PATTERN, "--revision-pattern", metavar="PATTERN", section="inputs",
        help="with hf://ORG/REPO: the branch names of the checkpoints, {N} the step (default "
             "step_{N})")
    checkpoints: list[str] | dict[int, str | Path] | None = option(
        None, "--checkpoint", action="append", metavar="STEP=PATH", section="inputs",
        help="add a checkpoint explicitly (repeatable)")
    observe_until: int | None = option(
        None, "--observe-until", type=int, metavar="K", section="inputs", exclusive="window",
        help="use the checkpoints with step <= K")
    steps: str | list[int] | None = option(
        None, "--steps", metavar="S1,S2,...", section="inputs", exclusive="window",
        help="use exactly these observed steps")
    from_fit: str | Path | None = option(
        None, "--from-fit", metavar="PATH", section="inputs",
        help="reuse a saved fit (an extrapolate/analyze output dir or its "
             "relex-fit.safetensors): no Gram pass; --steps / --observe-until pick among its "
             "steps; with RUN_DIR its checkpoints are found there (a run that moved)")
    skip_unreadable: bool = option(
        False, "--skip-unreadable", action="store_true",
        section="damaged inputs (see docs/robustness.md)",
        help="leave out discovered checkpoints that cannot be opened, with a warning naming "
             "each (default: stop with an error)")
    verify_checksums: bool = option(
        True, "--no-verify-checksums", action="store_false",
        section="damaged inputs (see docs/robustness.md)",
        help="do not check the CRC-32 of torch.save tensor bytes as they are read (verl FSDP, "
             "DCP, DeepSpeed); damaged bytes then go unnoticed")


@dataclass
class FitOptions(OptionGroup):
    """What is fitted and predicted (fit.py)."""

    key: ClassVar[str] = "fit"
    targets: int | list[int] | None = option(
        None, "--target", action="append", type=int, metavar="S", section="fit",
        help="step to predict (repeatable)")
    method: str = _method()
    rank: int = _rank()
    fit: str = option("linear", "--fit", metavar="linear|polyN", section="fit",
                      help="coefficient fit: linear (default) or a polynomial, e.g. poly2")
    window: int | None = option(None, "--window", type=int, metavar="W", section="fit",
                                help="fit on the last W observed checkpoints only")
    allow_interpolation: bool = option(
        False, "--allow-interpolation", action="store_true", section="fit",
        help="allow targets at or before the last observed step")
    strict_horizon: bool = option(
        False, "--strict-horizon", action="store_true", section="fit",
        help="refuse targets beyond the verified horizon (the window's own backtest, as in "
             "relex analyze); by default each such target gets a warning")


@dataclass
class Resources(OptionGroup):
    """Memory, device and threads of the streaming pass (stream/)."""

    key: ClassVar[str] = "resources"
    max_memory: str | int | None = option(
        None, "--max-memory", metavar="SIZE", section="output and resources",
        help="memory budget per process; tensors whose inputs (or, for fp16 inputs, float "
             "delta rows) do not fit are streamed twice (default: a quarter of the available "
             "RAM, at least 512MB; under torchrun shared by the processes of a node)")
    device: str = option("cpu", "--device", section="output and resources",
                         help="where to compute: cpu (default) or cuda")
    threads: int | None = option(None, "--threads", type=positive, metavar="N",
                                 section="output and resources",
                                 help="worker threads (default: all cores; 8 feeding a GPU)")


@dataclass
class OutputOptions(OptionGroup):
    """Where and how results are written (output/)."""

    key: ClassVar[str] = "out"
    output: str | Path | None = option(
        None, "--output", "-o", metavar="DIR", section="output and resources",
        help="directory to create; gets step-S/ model directories and the fit")
    overwrite: bool = option(False, "--overwrite", action="store_true",
                             section="output and resources",
                             help="replace --output if it exists")
    dtype: str | None = option(None, "--dtype", choices=["bf16", "fp16", "fp32", "fp64"],
                               section="output and resources",
                               help="output dtype of float tensors (default: the base model's)")
    max_shard_size: str | int = option("5GB", "--max-shard-size", metavar="SIZE",
                                       section="output and resources",
                                       help="largest output safetensors shard (default 5GB)")
    progress: bool = option(True, "--quiet", "-q", action="store_false",
                            section="output and resources",
                            help="no progress bar or table")
    output_format: str = option(
        "hf", "--output-format", choices=["hf", "lora", "native"],
        section="output and resources",
        help="hf: a model directory per target (default); native: a copy of the run's last "
             "checkpoint in the trainer's own layout with the target's weights, optimizer and "
             "step kept, to resume the trainer from; lora: a PEFT adapter directory per target "
             "(a LoRA run only)")
    allow_fresh_optimizer: bool = option(
        False, "--allow-fresh-optimizer", action="store_true", section="output and resources",
        help="with --output-format native: accept a last checkpoint without optimizer state "
             "(resuming from it starts a fresh optimizer)")
    lora_rank: int | None = option(
        None, "--lora-rank", type=int, metavar="R", section="LoRA runs",
        help="with --output-format lora: the adapter's rank (default: the run's r; at most "
             "T*r, the rank of the extrapolated delta)")


@dataclass
class EvalOptions(OptionGroup):
    """How models are scored on a dataset (evaluation/)."""

    key: ClassVar[str] = "evaluation"
    dataset: str | None = option(
        None, "--dataset", section="evaluation",
        help="JSONL/JSON/Parquet file, a hub dataset (math500, aime24, aime25, amc23 or a repo "
             "id), or arithmetic / arithmetic-dev (the demo's task)")
    question_field: str | None = option(None, "--question-field", section="evaluation",
                                        help="default: question, problem or prompt")
    answer_field: str = option("answer", "--answer-field", section="evaluation",
                               help="field of the gold answer (default answer)")
    split: str | None = option(None, "--split", section="evaluation", help="hub dataset split")
    limit: int | None = option(None, "--limit", type=int, section="evaluation",
                               help="first N problems only")
    n: int = option(1, "--n", type=int, section="evaluation",
                    help="samples per problem (default 1)")
    temperature: float = option(0.0, "--temperature", type=float, section="evaluation",
                                help="0 = greedy (default); e.g. 0.6 with --n 8")
    max_tokens: int = option(1024, "--max-tokens", type=int, section="evaluation",
                             help="new tokens per response (default 1024)")
    template: str = option("auto", "--template", section="evaluation",
                           help="auto (chat template if any), qwen-math, raw, or a string with "
                                "{question}")
    backend: str = option("auto", "--backend", choices=["auto", "vllm", "transformers"],
                          section="evaluation", help="generation backend (default auto)")
    batch_size: int = option(16, "--batch-size", type=int, section="evaluation",
                             help="problems per generate call (default 16)")
    seed: int = _seed()


#: seconds relex's own collectives wait for the other ranks (RELEX_LOOP_TIMEOUT): below the
#: 600 s NCCL timeout of torch and verl, so a stuck relex disables itself before the job dies
DEFAULT_TIMEOUT = float(os.environ.get("RELEX_LOOP_TIMEOUT", "180"))


@dataclass
class LoopOptions(OptionGroup):
    """Jumps inside a training run: relex.Accelerator, the TRL callback, verl's `relex.`."""

    key: ClassVar[str] = "loop"
    cycle: int | None = option(None, "--cycle", type=int,
                               help="real steps per cycle (default 20; 10 with --jump auto)")
    jump: int | str = option("auto", "--jump", type=jump_size,
                             help="steps jumped after each cycle: auto (the default) sizes "
                                  "each jump from the run's own evidence (loop/sizing.py); a "
                                  "number jumps that many (0 observes only)")
    max_jump: int | None = option(None, "--max-jump", type=int,
                                  help="jump=auto: the largest jump (default 6 cycles)")
    growth: float = option(1.5, "--growth", type=float,
                           help="jump=auto: factor per confirmed jump once the run had a "
                                "setback (before: x2; default 1.5)")
    flat: float = option(0.01, "--flat", type=float,
                         help="jump=auto: gain of the mean reward per cycle below which (twice "
                              "in a row) the reward is flat and jumps shrink (reward units; "
                              "default 0.01)")
    every: int = option(2, "--every", type=int,
                        help="a snapshot every N steps (cycle / every >= 2; default 2)")
    method: str = _method()
    rank: int = _rank()
    reset_optimizer: bool = option(
        False, "--reset-optimizer", action="store_true",
        help="clear the optimizer state at each jump (an ablation; worse on the demo)")
    guard_steps: int | None = option(
        None, "--guard-steps", type=int,
        help="training steps compared before and after a jump (default cycle // 4)")
    guard_margin: float = option(
        0.05, "--guard-margin", type=float,
        help="reward drop after a jump that rolls it back (reward units; 0.05 suits rewards "
             "in [0, 1])")
    snapshot_dtype: str = option(
        "float16", "--snapshot-dtype", choices=["float16", "float32"],
        help="float16: scaled deltas, half the bytes; float32: the weights, exact")
    snapshot_dir: str | os.PathLike | None = option(
        None, "--snapshot-dir", metavar="DIR",
        help="spill snapshots to this local disk so RAM holds about one copy of the rank's "
             "weights")
    timeout: float = option(DEFAULT_TIMEOUT, "--timeout", type=float,
                            help="seconds relex's collectives wait for the other ranks")
    verbose: bool = option(True, "--quiet-jumps", action="store_false",
                           help="one line on stderr per jump (rank 0); off: the jumps go to the "
                                "relex.loop.accelerator logger at INFO only (rollbacks and "
                                "errors are always logged as warnings)")

    @property
    def cycle_steps(self) -> int:
        """The cycle, or its default: 10 with jump=auto (its jumps start early enough to reach
        the plain run's level in about a fifth of its steps on the demo: bench_auto.py), else
        20."""
        return self.cycle if self.cycle is not None else 10 if self.jump == "auto" else 20

    @classmethod
    def typed(cls, values: dict, where: str) -> dict:
        """`values` (e.g. strings from a config file) converted to the fields' types; an unknown
        name or a bad value is a one-line error naming `where`.key."""
        known = {f.name: f for f in fields(cls)}
        out = {}
        for name, value in values.items():
            if name not in known:
                raise RelexError(f"{where}.{name}: not an option of relex's loop mode; use "
                                 f"{', '.join(known)}")
            if value is None:
                continue
            f = known[name]
            kind = f.metadata["argparse"].get("type") or (
                type(f.default) if f.default is not None else str)
            try:
                out[name] = _boolean(value) if kind is bool else kind(value)
            except (TypeError, ValueError):
                expected = getattr(kind, "expects", kind.__name__)
                raise RelexError(f"{where}.{name}={value!r}: expected {expected}") from None
        return out


def _boolean(value) -> bool:
    """A config file's true/false (bool("false") would be True)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if str(value).lower() not in words:
        raise ValueError(value)
    return words[str(value).lower()]
