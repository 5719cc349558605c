"""Which checkpoints a command uses: discovered steps, explicit ones, the base, the observed set."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from relex import formats
from relex.checkpoints.discover import discover, parse_checkpoint_arg
from relex.errors import RelexError
from relex.checkpoints import hub


@dataclass(frozen=True)
class Inputs:
    """base: the step-0 model dir; observed: step -> dir used for the fit; available: every
    checkpoint found (observed or not), step -> dir."""

    base: Path
    observed: dict[int, Path]
    available: dict[int, Path]


def resolve_base(base: str | Path, download: bool = False) -> Path:
    """A local model directory, or a repo id already in the local Hugging Face cache
    (download: fetch ORG/REPO[@REV] from the hub when not cached, as for hf:// runs)."""
    path = Path(base)
    if path.is_dir():
        return path
    text = str(base)
    if download and text.partition("@")[0].count("/") == 1 and not path.exists():
        return hub.resolve_base(text)
    if text.count("/") == 1 and not path.exists() and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            pass
        raise RelexError(f"--base {text}: not a directory and not in the local Hugging Face "
                         f"cache; download it first (hf download {text}) or pass a local path")
    raise RelexError(f"--base {text}: no such model directory")


def _wanted(observe_until, steps, later: bool, need_base: bool):
    """Which steps of a hub run to download: the observed ones (the selection select_steps will
    make), the later ones too when `later`, step 0 when it is the base."""
    chosen = parse_steps(steps)

    def wanted(step: int) -> bool:
        if step == 0:
            return need_base
        if chosen is not None:
            return step in chosen or (later and step > chosen[-1])
        return observe_until is None or step <= observe_until or later
    return wanted


def _adapter_base(found: dict[int, Path]) -> Path | None:
    """The local base model named by a LoRA checkpoint's adapter_config.json, if any."""
    for path in found.values():
        if formats.lora.detect(Path(path)):
            return formats.lora.base_of(Path(path))
    return None


def parse_steps(text: str | list[int] | None) -> list[int] | None:
    """'25,50,75' or [25, 50, 75] -> [25, 50, 75]; they must increase strictly."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            steps = [int(s) for s in text.replace(" ", "").split(",") if s]
        except ValueError:
            raise RelexError(f"--steps {text}: expected comma-separated step numbers") from None
    else:
        steps = [int(s) for s in text]
    if not steps:
        raise RelexError("--steps: no step given")
    for a, b in zip(steps, steps[1:]):
        if b == a:
            raise RelexError(f"--steps: step {a} is listed twice")
        if b < a:
            raise RelexError(f"--steps: steps must increase, got {a} before {b}")
    return steps


def resolve_inputs(run_dir: str | Path | None = None, *, base: str | Path | None = None,
                   checkpoints: list[str] | dict[int, str | Path] | None = None,
                   observe_until: int | None = None,
                   steps: str | list[int] | None = None,
                   revision_pattern: str = hub.DEFAULT_PATTERN, later: bool = False,
                   skip_unreadable: bool = False,
                   hf_config: str | Path | None = None) -> Inputs:
    """Discover checkpoints under run_dir, add explicit ones, pick the base and the observed set.

    checkpoints: extra "STEP=PATH" strings or a {step: path} dict. observe_until keeps steps <= K;
    steps names the observed steps exactly; with neither, every checkpoint found is observed.
    run_dir "hf://ORG/REPO": the repo's branches named like revision_pattern are the
    checkpoints; only the observed ones (and, with later=True, the ones after them) are
    downloaded. skip_unreadable: a discovered checkpoint that cannot be opened is left out
    with a warning on stderr naming it (default: its error stops the command). hf_config:
    the HF config of checkpoints that keep none (Megatron), for that check.
    """
    if hub.is_hub(run_dir):
        found = hub.checkpoints(run_dir, _wanted(observe_until, steps, later, base is None),
                                revision_pattern)
    else:
        found = dict(discover(run_dir, skip_unreadable)) if run_dir is not None else {}
    pairs = (checkpoints.items() if isinstance(checkpoints, dict)
             else [parse_checkpoint_arg(c) for c in checkpoints or []])
    explicit: dict[int, Path] = {}
    for step, path in pairs:
        step, path = int(step), Path(path)
        if step in explicit:
            raise RelexError(f"--checkpoint: step {step} is given twice ({explicit[step]}, {path})")
        if step in found and found[step].resolve() != path.resolve():
            raise RelexError(f"--checkpoint {step}={path}: step {step} is also {found[step]} in "
                             f"the run directory; give one of them")
        if not formats.detect(path):
            raise RelexError(f"--checkpoint {step}={path}: not a checkpoint directory relex "
                             f"reads (HF safetensors or a trainer format it knows)")
        explicit[step] = path
    found.update(explicit)
    if not found:
        raise RelexError("no checkpoints given: pass a RUN_DIR or --checkpoint STEP=PATH")
    if base is not None:
        base_dir = resolve_base(base, download=hub.is_hub(run_dir))
    elif 0 in found:
        base_dir = found[0]
    elif (adapter_base := _adapter_base(found)) is not None:
        base_dir = adapter_base
    else:
        raise RelexError("no --base given and the run has no step-0 checkpoint; pass --base "
                         "BASE_DIR (the model before RL)")
    available = {s: p for s, p in sorted(found.items()) if s != 0}
    if skip_unreadable:
        available = {s: p for s, p in available.items()
                     if s in explicit or _readable(s, p, base_dir, hf_config)}
    if not available:
        raise RelexError("only the base (step 0) was found; relex needs checkpoints after it")
    chosen = select_steps(list(available), observe_until, steps)
    observed = {s: available[s] for s in chosen}
    return Inputs(base_dir, observed, available)


def _readable(step: int, path: Path, base: Path, hf_config: str | Path | None) -> bool:
    """Can `path` be opened (names, shapes, pickles, zip headers)? If not, say so on stderr."""
    try:
        formats.open_reader(path, base=base, hf_config=hf_config).close()
        return True
    except RelexError as e:
        msg = str(e).replace("\n", "\\n")
        print(f"relex: warning: skipping step {step} ({path}): {msg}", file=sys.stderr)
        return False


def select_steps(available: list[int], observe_until: int | None = None,
                 steps: str | list[int] | None = None) -> list[int]:
    """The observed steps among the available ones: exactly `steps`, or those <= observe_until,
    or all of them."""
    chosen = parse_steps(steps)
    if chosen is not None and observe_until is not None:
        raise RelexError("give --observe-until or --steps, not both")
    if chosen is not None:
        missing = [s for s in chosen if s not in available]
        if missing:
            raise RelexError(f"--steps: no checkpoint for step {missing[0]}; available steps: "
                             f"{format_steps(available)}")
        return chosen
    if observe_until is not None:
        picked = [s for s in available if s <= observe_until]
        if not picked:
            raise RelexError(f"--observe-until {observe_until}: no checkpoint at or before it; "
                             f"available steps: {format_steps(available)}")
        return picked
    return list(available)


def format_steps(steps) -> str:
    """Steps for a message or a table: all of them up to 12, else the first 5 and the last 3
    with the count."""
    s = sorted(steps)
    if len(s) <= 12:
        return ", ".join(map(str, s))
    return (", ".join(map(str, s[:5])) + ", ..., " + ", ".join(map(str, s[-3:]))
            + f" ({len(s)} steps)")
