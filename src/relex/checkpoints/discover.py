"""Find the checkpoints an RL trainer wrote, and their step numbers.

Trainers name step directories differently and put the Hugging Face weights at different depths.
Each known layout is a directory-name pattern plus the sub-paths where a checkpoint relex reads
may sit (HF safetensors or a trainer's native format: verl FSDP shards, DCP, DeepSpeed, NeMo-RL,
Megatron torch_dist); a Megatron save directory there (`latest_checkpointed_iteration.txt`,
`iter_NNNNNNN/`) stands for the iteration it holds. When a step directory holds weight files
relex cannot read, the error names the converter command that produces an HF directory.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from relex import formats
from relex.errors import RelexError


@dataclass(frozen=True)
class Layout:
    trainer: str
    pattern: str  # full-match regex on the directory name; group 1 is the step
    weights: tuple[str, ...]  # sub-paths that may hold HF weights, tried in order
    example: str  # how the layout looks, for error messages

    def step(self, name: str) -> int | None:
        m = re.fullmatch(self.pattern, name)
        return int(m.group(1)) if m else None


_HF = r"(?:[-_]hf)?"
LAYOUTS = (
    Layout("verl", rf"global_step_(\d+){_HF}",
           ("actor/huggingface", "actor/lora_adapter", "actor", "actor/dist_ckpt",
            "huggingface", "."),
           "global_step_N/actor/huggingface"),
    Layout("OpenRLHF", rf"global_step(\d+){_HF}", (".",), "global_stepN_hf"),
    Layout("TRL / transformers Trainer / ROLL", r"checkpoint-(\d+)",
           (".", "pytorch_model_fsdp_0"), "checkpoint-N"),
    Layout("NeMo-RL", rf"step_(\d+){_HF}",
           (".", "policy/weights/model/consolidated", "policy/weights/model", "policy/weights",
            "policy/weights/hf", "hf"), "step_N/policy/weights/model"),
    Layout("plain HF directories", rf"step-(\d+){_HF}", (".",), "step-N"),
    Layout("slime / Megatron", rf"iter_(\d+){_HF}", (".",), "iter_N_hf"),
)
LOOKED_FOR = ", ".join(f"{x.example} ({x.trainer})" for x in LAYOUTS)


@dataclass(frozen=True)
class Found:
    """One step directory: its step, the HF weights directory in it (or None) and the layout."""

    step: int
    dir: Path
    weights: Path | None
    layout: Layout

    def converter_hint(self) -> str:
        return converter_hint(self.dir, self.layout)


def converter_hint(step_dir: Path, layout: Layout) -> str:
    """The command that turns a step directory's native shards into an HF directory."""
    d = step_dir
    if layout.trainer == "verl":
        backend = "megatron" if (d / "actor" / "dist_ckpt").exists() else "fsdp"
        return (f"python -m verl.model_merger merge --backend {backend} --local_dir {d}/actor "
                f"--target_dir {d}/actor/huggingface  (or set checkpoint.save_contents to "
                f"include hf_model when training)")
    if layout.trainer.startswith("TRL") and (d / "pytorch_model_fsdp_0").exists():
        return (f"accelerate merge-weights {d}/pytorch_model_fsdp_0 {d}-merged  (then copy "
                f"config.json and the tokenizer from {d} into {d}-merged)")
    if layout.trainer == "OpenRLHF":
        return (f"train with --save_hf_ckpt (writes global_stepN_hf), or run DeepSpeed's "
                f"zero_to_fp32.py on {d} and copy config.json and the tokenizer beside it")
    if layout.trainer == "NeMo-RL":
        return (f"uv run examples/converters/convert_dcp_to_hf.py --config={d}/config.yaml "
                f"--dcp-ckpt-path={d}/policy/weights --hf-ckpt-path={d}-hf  (in the NeMo-RL repo)")
    if layout.trainer == "slime / Megatron" and any(d.glob("mp_rank_*")):
        return ("save with --ckpt-format torch_dist (relex reads torch_dist, not the legacy "
                "mp_rank_*/model_optim_rng.pt), or convert with Megatron-LM's "
                "tools/checkpoint/convert.py")
    if layout.trainer == "slime / Megatron":
        return (f"python tools/convert_torch_dist_to_hf.py --input-dir {d} --output-dir {d}_hf "
                f"--origin-hf-dir BASE_HF_DIR  (in the slime repo)")
    return "save the checkpoint with transformers' save_pretrained (safetensors)"


def _weights_dir(step_dir: Path, layout: Layout) -> Path | None:
    """The checkpoint directory relex reads inside a step directory (HF weights or a native
    format relex reads), or None."""
    for sub in layout.weights:
        cand = step_dir / sub
        if formats.detect(cand):
            return formats.megatron.resolve(cand) or cand
    # Unknown nesting (e.g. ROLL's per-worker folders): one HF dir at most 3 levels down.
    found = sorted({p.parent for depth in ("*", "*/*", "*/*/*")
                    for name in ("model.safetensors", "model.safetensors.index.json")
                    for p in step_dir.glob(f"{depth}/{name}")})
    preferred = [p for p in found if re.search(r"actor|policy", str(p.relative_to(step_dir)))]
    found = preferred or found
    if len(found) > 1:
        raise RelexError(f"{step_dir}: several model directories inside "
                         f"({', '.join(str(p.relative_to(step_dir)) for p in found)}); "
                         f"pick one with --checkpoint STEP=PATH")
    return found[0] if found else None


#: file names only a checkpoint's weights have: a step directory holding one but nothing relex
#: reads is damaged or unconverted, and is never left out without a word
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.distcp", ".metadata",
                "model_world_size_*_rank_*.pt", "*model_states.pt", "model_optim_rng.pt")


def weight_file(step_dir: Path) -> Path | None:
    """A weights file (WEIGHT_FILES) in step_dir or at most 3 levels below it, or None."""
    for depth in ("", "*/", "*/*/", "*/*/*/"):
        for pattern in WEIGHT_FILES:
            for p in step_dir.glob(depth + pattern):
                return p
    return None


def scan(run_dir: Path) -> list[Found]:
    """Every step directory directly under ``run_dir`` (or one level deeper if none is there)."""
    def scan_level(root: Path) -> list[Found]:
        out = []
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            for layout in LAYOUTS:
                step = layout.step(child.name)
                if step is not None:
                    out.append(Found(step, child, _weights_dir(child, layout), layout))
                    break
        return out

    found = scan_level(run_dir)
    if not found:
        for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            found += scan_level(sub)
    return found


def discover(run_dir: str | Path, skip_unreadable: bool = False,
             strict: bool = True) -> dict[int, Path]:
    """Map step -> HF weights directory for every checkpoint a trainer wrote under ``run_dir``.

    Raises RelexError when nothing usable is found (naming the layouts looked for, or the
    converter to run when only native shards exist), when two directories claim one step, or
    when a step directory holds weight files (WEIGHT_FILES) but nothing relex reads; with
    skip_unreadable that step is left out with a warning on stderr instead. strict=False leaves
    such steps out silently (relex watch: they may still be being written).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RelexError(f"{run_dir}: no such run directory")
    found = scan(run_dir)
    usable = [f for f in found if f.weights is not None]
    if not usable:
        if found:
            f = found[0]
            raise RelexError(f"{f.dir}: {f.layout.trainer} checkpoint without Hugging Face "
                             f"safetensors weights; convert it first: {f.converter_hint()}")
        if formats.detect(run_dir):
            raise RelexError(f"{run_dir}: is a single model directory, not a run; pass the "
                             f"directory that holds the step directories, or --checkpoint "
                             f"STEP=PATH for each checkpoint")
        raise RelexError(f"{run_dir}: no checkpoints found; looked for {LOOKED_FOR}; "
                         f"or pass --checkpoint STEP=PATH for each checkpoint")
    for f in found if strict else ():
        evidence = weight_file(f.dir) if f.weights is None else None
        if evidence is None:
            if f.weights is None and any(f.dir.iterdir()):  # e.g. config.json alone
                print(f"relex: warning: leaving out step {f.step}: {f.dir} holds no weights "
                      f"(only {', '.join(sorted(p.name for p in f.dir.iterdir())[:3])}); a "
                      f"checkpoint still being written, or saved without its weights?",
                      file=sys.stderr)
            continue
        msg = (f"{f.dir}: holds {evidence.relative_to(f.dir)} but no {f.layout.trainer} "
               f"checkpoint relex reads; convert it first: {f.converter_hint()}")
        if not skip_unreadable:
            raise RelexError(f"{msg}; or leave the step out with --skip-unreadable")
        print(f"relex: warning: skipping step {f.step}: {msg}", file=sys.stderr)
    steps: dict[int, Path] = {}
    for f in usable:
        if f.step in steps:
            raise RelexError(f"step {f.step} is claimed by both {steps[f.step]} and {f.weights}; "
                             f"remove one or list checkpoints with --checkpoint STEP=PATH")
        steps[f.step] = f.weights
    return dict(sorted(steps.items()))


def parse_checkpoint_arg(text: str) -> tuple[int, Path]:
    """'STEP=PATH' -> (step, path), as given to --checkpoint."""
    step, sep, path = text.partition("=")
    if not sep or not step.strip().isdigit() or not path:
        raise RelexError(f"--checkpoint '{text}': expected STEP=PATH, e.g. 50=runs/a/checkpoint-50")
    return int(step), Path(path)
