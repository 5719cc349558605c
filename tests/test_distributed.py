"""torchrun: two gloo processes write the same bytes as one; bad input stops every rank cleanly.

Processes are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), once through torchrun itself; a fault (a rank that dies, a full disk) is injected
into one rank by a small launcher script."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import relex
from relex.stream import torchrun as distributed

pytest.importorskip("torch.distributed")

LAUNCHER = """
import errno, os, sys
from relex import cli
from relex.stream import torchrun as distributed
fault = os.environ.get("RELEX_TEST_FAULT") if os.environ.get("RANK") == "1" else None
if fault == "die":
    from relex.stream import engine
    engine.Engine.run = lambda *a, **k: os._exit(3)
elif fault == "enospc":
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    os.pwrite = full
try:
    code = cli.main(sys.argv[1:])
finally:
    distributed.reset()
sys.exit(code)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(relex.__file__).parents[1]), OMP_NUM_THREADS="1",
               RELEX_DIST_TIMEOUT="60", **extra)
    return env


def launch(tmp_path, argv_of_rank, fault=None, timeout=120, module=False):
    """Start 2 ranks by hand (as torchrun would); return [(returncode, stderr)]."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    port = _port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RELEX_TEST_FAULT=fault or "")
        cmd = ["-m", "relex"] if module else [str(script)]
        procs.append(subprocess.Popen([sys.executable, *cmd, *argv_of_rank(rank)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def args(run, base, out, *extra):
    return ["extrapolate", str(run), "--base", str(base), "--target", "30", "--output",
            str(out), "--quiet", "--max-shard-size", "40KB", "--max-memory", "3MB", *extra]


def files_of(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*"))
            if f.is_file() and f.name != "relex.json"}


def test_torchrun_two_processes_write_the_bytes_of_one(run_factory, tmp_path):
    run, base = run_factory(base_dtype=torch.bfloat16, shards=2)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "one", progress=False,
                      max_shard_size="40KB", max_memory="3MB")
    # `python -m relex` with torchrun's environment, started by hand: torchrun's own agent
    # process would add another torch import (several seconds on 2 busy cores)
    res = launch(tmp_path, lambda r: args(run, base, tmp_path / "two"), module=True)
    assert [code for code, _ in res] == [0, 0], res
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert len([f for f in one if f.endswith(".safetensors")]) > 2  # several shards + fit
    assert one.keys() == two.keys()
    for name in one:  # the models and the fit file
        assert one[name] == two[name], name
    p1 = json.loads((tmp_path / "one/step-30/relex.json").read_text())
    p2 = json.loads((tmp_path / "two/step-30/relex.json").read_text())
    assert p1["tensors"] == p2["tensors"]
    assert p1["summary"]["bytes_read"] == p2["summary"]["bytes_read"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_torchrun_native_output_equals_one_process(run_factory, tmp_path):
    """Native output under torchrun: rank 0 copies the last checkpoint, each rank writes its
    tensors into the copy; the same files as one process."""
    run, base = run_factory(shards=2)
    torch.save({"state": {}}, run / "checkpoint-10" / "optimizer.pt")
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "one", progress=False,
                      max_memory="3MB", output_format="native")
    res = launch(tmp_path, lambda r: ["extrapolate", str(run), "--base", str(base), "--target",
                                      "30", "--output", str(tmp_path / "two"), "--quiet",
                                      "--max-memory", "3MB", "--output-format", "native"],
                 module=True)
    assert [code for code, _ in res] == [0, 0], res
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert "step-30/checkpoint-10/optimizer.pt" in one and one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name
    assert one["step-30/checkpoint-10/model-00001-of-00002.safetensors"] != (
        run / "checkpoint-10" / "model-00001-of-00002.safetensors").read_bytes()


def test_ranks_that_disagree_fail_together(run_factory, tmp_path):
    run, base = run_factory()
    out = tmp_path / "out"
    res = launch(tmp_path, lambda r: args(run, base, out, "--target", str(40 + r)))
    for code, err in res:
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "ranks disagree" in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("fault", ["die", "enospc"])
def test_a_failing_rank_stops_the_others_and_leaves_nothing(run_factory, tmp_path, fault):
    run, base = run_factory()
    out = tmp_path / "out"
    res = launch(tmp_path, lambda r: args(run, base, out), fault=fault)
    (code0, err0), (code1, err1) = res
    assert code0 != 0 and code1 != 0
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relex: error:"), err0
    if fault == "enospc":
        assert "No space left" in lines[0] and "rank 1" in lines[0]
    else:
        assert "stopped" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_disk_full_while_writing_removes_the_temp_dir(run_factory, tmp_path, monkeypatch,
                                                      capsys):
    import errno

    from relex import cli

    run, base = run_factory()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    code = cli.main(args(run, base, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_split_by_bytes_is_deterministic_and_balanced():
    sizes = [100, 1, 50, 50, 30, 20, 1, 1]
    owner = distributed.split(sizes, 2)
    assert owner == distributed.split(list(sizes), 2)
    loads = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert loads == [130, 123]  # largest first onto the least-loaded rank
    assert distributed.split(sizes, 1) == [0] * len(sizes)
