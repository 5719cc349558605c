"""The README's examples, run as written, so the front page stays true.

Every `relex ...` line in the README's shell blocks and every complete Python block runs on a
tiny generated run: `base-model` is the demo's 0.4M-parameter Llama (tokenizer-free, so the
`arithmetic` datasets grade it), `runs/grpo/checkpoint-N` (N = 5, 10, ..., 100, each with an
optimizer.pt) follow a rank-1 trajectory with a coefficient linear in the step plus noise. Each example runs in a directory of
its own beside those two (and beside `out`, the README's first extrapolation, for the examples
that read it). Skipped, with the reason printed: lines marked `# needs: network` or `# needs:
GPU`, Python fragments (`...` in place of a training loop: tests/test_accelerate.py runs those
calls), and `make` / `pip` lines (CI runs `make test`; `make demo` runs `relex demo`).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from relex.demo.run import BASE

README = Path(__file__).parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", TEXT, flags=re.S)


def shell_lines() -> list[str]:
    lines = []
    for lang, body in BLOCKS:
        if lang in ("", "bash", "sh"):
            lines += [s.strip() for s in body.replace("\\\n", " ").splitlines()
                      if s.strip().startswith(("relex ", "make ", "pip "))]
    return lines


COMMANDS = shell_lines()
PYTHON = [body for lang, body in BLOCKS if lang == "python"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(BASE, root / "base-model")
    base = load_file(str(Path(BASE) / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for step in range(5, 101, 5):
        d = root / "runs" / "grpo" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        shutil.copy(Path(BASE) / "config.json", d)
        save_file({k: v + (2e-4 * step + 1e-5 * torch.randn((), generator=g)) * direction[k]
                   + 1e-6 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(d / "model.safetensors"))
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")  # as a Trainer saves
    first = next(c for c in COMMANDS if c.startswith("relex extrapolate runs/grpo"))
    relex(first, root)
    return root


def relex(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line, comments=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-m", "relex", *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def place(run: Path, tmp_path: Path, reads_out: bool) -> Path:
    for name in ("runs", "base-model") + (("out",) if reads_out else ()):
        (tmp_path / name).symlink_to(run / name)
    return tmp_path


def test_readme_has_examples():
    assert len(COMMANDS) >= 6 and PYTHON, "the README lost its examples"


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command(line, run, tmp_path):
    needs = re.search(r"#\s*needs:\s*(.+)$", line)
    if needs:
        pytest.skip(f"needs {needs.group(1)}: {line}")
    if line.startswith(("make ", "pip ")):
        pytest.skip(f"{line.split()[0]} line (CI runs make test; make demo is relex demo)")
    argv = shlex.split(line, comments=True)
    writes = argv[argv.index("--output") + 1] if "--output" in argv else None
    cwd = place(run, tmp_path, reads_out=writes != "out")
    relex(line, cwd)
    if writes:
        assert (cwd / writes).is_dir(), f"{line}: wrote nothing to {writes}"


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_readme_python(code, run, tmp_path, monkeypatch):
    if re.search(r"^\s*\.\.\.", code, flags=re.M) or "..." in code.replace('"..."', ""):
        pytest.skip("a fragment around a user's training loop (tests/test_accelerate.py and "
                    "tests/test_trl.py run these calls)")
    monkeypatch.chdir(place(run, tmp_path, reads_out=False))
    exec(compile(code, str(README), "exec"), {})
