"""Hub trajectories: `hf://ORG/REPO` as RUN_DIR, one branch per checkpoint (`step_1` ...).

The RELEX authors publish each run as one model repo whose branches `step_N` hold the checkpoint
of step N. relex lists the branches (`list_repo_refs`), picks the steps it needs (the observed
ones; later ones too for `analyze`), and downloads only those revisions and only the files a
checkpoint needs (weights, config, tokenizer) through huggingface_hub, into the normal HF cache,
with huggingface_hub's own progress bars. Each snapshot is then an ordinary directory that any
format module reads. Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable) the branches already
in the local cache are used (`refs/<branch>` -> `snapshots/<commit>/`).

This module is not in FORMATS: it turns a repo into step -> local directory for
checkpoints/inputs.py.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from relex.errors import RelexError

PREFIX = "hf://"
DEFAULT_PATTERN = "step_{N}"
#: the files a checkpoint needs: weights (HF or LoRA), config, tokenizer, chat template
ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model",
         "*.tiktoken", "*.jinja"]
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub(run_dir) -> bool:
    return isinstance(run_dir, str) and run_dir.startswith(PREFIX)


def repo_id(run_dir: str) -> str:
    repo = run_dir[len(PREFIX):].strip("/")
    if not _REPO.fullmatch(repo):
        raise RelexError(f"{run_dir}: expected hf://ORG/REPO, e.g. "
                         f"hf://relex-rlvr/RLVR-Qwen2.5-Math-1.5B")
    return repo


def pattern_regex(pattern: str) -> re.Pattern:
    """'step_{N}' -> a full-match regex whose group 1 is the step."""
    if pattern.count("{N}") != 1:
        raise RelexError(f"--revision-pattern {pattern}: must contain {{N}} exactly once, e.g. "
                         f"step_{{N}}")
    head, tail = pattern.split("{N}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def cache_dir() -> Path:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return env in ("1", "ON", "YES", "TRUE") or (env == "" and bool(constants.HF_HUB_OFFLINE))


def cached_branches(repo: str) -> dict[str, str]:
    """branch -> commit for the repo's refs in the local cache.

    Read from the ref files themselves (`models--ORG--NAME/refs/<branch>`), not scan_cache_dir,
    which drops a whole repo when one snapshot is incomplete."""
    refs = cache_dir() / f"models--{repo.replace('/', '--')}" / "refs"
    if not refs.is_dir():
        return {}
    return {f.relative_to(refs).as_posix(): f.read_text().strip()
            for f in sorted(refs.rglob("*")) if f.is_file()}


def branches(run_dir: str, pattern: str = DEFAULT_PATTERN) -> dict[int, str]:
    """step -> branch name for every branch matching `pattern` (online, else from the cache)."""
    repo, regex = repo_id(run_dir), pattern_regex(pattern)
    names: list[str] | None = None
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
        try:
            names = [b.name for b in HfApi().list_repo_refs(repo).branches]
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise RelexError(f"{run_dir}: {type(e).__name__} (log in with `hf auth login` for "
                             f"a private or gated repo, or check the name)") from None
        except Exception as e:  # noqa: BLE001 - no network: fall back to the cache
            warnings.warn(f"{run_dir}: hub unreachable ({type(e).__name__}); using the "
                          f"branches in the local cache {cache_dir()}", stacklevel=2)
    where = "on the hub"
    if names is None:
        names, where = list(cached_branches(repo)), f"in the local cache {cache_dir()}"
    steps: dict[int, str] = {}
    for name in names:
        m = regex.fullmatch(name)
        if m:
            step = int(m.group(1))
            if step in steps:
                raise RelexError(f"{run_dir}: branches {steps[step]} and {name} both name step "
                                 f"{step}; pick one with --revision-pattern")
            steps[step] = name
    if not steps:
        raise RelexError(f"{run_dir}: no branch named like '{pattern}' {where}; pass "
                         f"--revision-pattern (e.g. 'step_{{N}}') or download the branches "
                         f"first (hf download {repo} --revision step_N)")
    return dict(sorted(steps.items()))


def download(repo: str, revision: str | None = None) -> Path:
    """The local snapshot of one revision: from the cache, downloaded first when online."""
    from huggingface_hub import snapshot_download
    local = offline()
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW,
                                      cache_dir=cache_dir(), local_files_only=local))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds
        rev = f"@{revision}" if revision else ""
        how = ("it is not in the local cache and HF_HUB_OFFLINE is set" if local
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise RelexError(f"{repo}{rev}: cannot get this revision ({how}); download it with "
                         f"`hf download {repo}{' --revision ' + revision if revision else ''}`"
                         ) from None


def checkpoints(run_dir: str, wanted, pattern: str = DEFAULT_PATTERN) -> dict[int, Path]:
    """step -> local snapshot for the steps of `run_dir` that `wanted(step)` selects."""
    repo = repo_id(run_dir)
    return {step: download(repo, name) for step, name in branches(run_dir, pattern).items()
            if wanted(step)}


def resolve_base(text: str) -> Path:
    """--base ORG/REPO[@REV]: its snapshot, downloaded when online and not cached."""
    repo, _, rev = text.partition("@")
    return download(repo, rev or None)
