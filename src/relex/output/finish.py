"""Finishing a written step directory: what a served model needs beside its weights, and the
provenance (relex.json) that says how it was made."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

from relex.errors import RelexError
from relex.stream.trajectory import Trajectory
from relex.version import __version__

#: non-weight files of a model directory that a served model needs (config, tokenizer, template)
MODEL_FILES = re.compile(
    r"(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\..*|merges\.txt|.*\.tiktoken|chat_template\..*|"
    r"preprocessor_config\.json|processor_config\.json|(configuration|modeling|tokenization)_.*\.py)")
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def metadata_source(traj: Trajectory) -> Path:
    """Config and tokenizer come from the last observed checkpoint when it has them (what the
    trainer actually ran), else from the base."""
    for ckpt in (traj.checkpoints[-1], traj.base):
        if ckpt.meta_dir is not None and (ckpt.meta_dir / "config.json").is_file():
            return ckpt.meta_dir
    return traj.base.meta_dir or traj.base.path


def copy_model_files(src: Path, dst: Path, traj: Trajectory) -> None:
    """Copy config, tokenizer and template files from `src`; config.json records the dtype the
    weights are written in."""
    for f in sorted(src.iterdir()):
        if f.is_file() and MODEL_FILES.fullmatch(f.name):
            shutil.copyfile(f, dst / f.name)
    cfg_file = dst / "config.json"
    if not cfg_file.is_file():
        raise RelexError(f"{src}: has no config.json, so the output would not load; copy the "
                         f"base model's config.json there")
    codes = {p.out_dtype for p in traj.plans if p.moves}
    if len(codes) == 1:
        cfg = json.loads(cfg_file.read_text())
        name = _TORCH_NAMES[codes.pop()]
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = name
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_provenance(path: Path, report, traj: Trajectory, config, step: int, mode: str,
                     from_fit, native=None) -> None:
    """relex.json: the version, the inputs (absolute paths), the fit and its statistics; for
    native output (native: output.native.Template) what was copied and the step it resumes
    at."""
    prov = {
        "relex_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "step": step,
        "method": config.method,
        "rank": config.rank,
        "fit": config.fit_name,
        "window": config.window,
        "observed_steps": report.observed_steps,
        "base": str(traj.base.path.resolve()),
        "checkpoints": {str(s): str(c.path.resolve()) for s, c in
                        zip(traj.steps, traj.checkpoints)},
        "dtypes": sorted({p.out_dtype for p in traj.plans}),
        "tied_embeddings": traj.tied,
        "from_fit": str(from_fit) if from_fit is not None else None,
        "summary": report.summary(),
        "tensors": report.stats,
    }
    if report.horizon is not None:
        prov["horizon"] = dict(report.horizon, beyond=report.warnings)
    if native is not None:
        prov["output_format"] = "native"
        prov["native"] = {"copy_of": str(native.root.resolve()), "directory": str(native.rel),
                          "resume": native.resume_hint(
                              Path(report.output).resolve() / f"step-{step}"),
                          "resume_step": report.observed_steps[-1],
                          "model_copies": [str(s) for s in native.stores]}
    if report.output_format == "lora":
        prov["output_format"] = "lora"
        prov["lora"] = {"rank": report.lora_rank, "norm_share": report.norm_share.get(step, {}),
                        "notes": report.notes}
    path.write_text(json.dumps(prov, indent=1) + "\n")
