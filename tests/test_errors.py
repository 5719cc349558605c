"""Bad input: one clear line on stderr, exit status 2, nothing written, inputs untouched."""

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from relex.cli import main


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, args, root: Path):
    before = tree_digest(root)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert tree_digest(root) == before or code == 0, "inputs were modified"
    return code, err


def expect_error(capsys, args, root, pattern, out=None):
    code, err = run_cli(capsys, args, root)
    assert code == 2, err
    assert err.startswith("relex: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    if out is not None:
        assert not Path(out).exists()
        assert not any(p.name.startswith(f".{Path(out).name}.tmp")
                       for p in Path(out).parent.iterdir())


@pytest.fixture
def run(run_factory):
    return run_factory()


def base_args(run, tmp_path, *extra):
    r, b = run
    return ["extrapolate", r, "--base", b, "--target", "30", "--output", tmp_path / "out",
            "-q", *extra]


def test_missing_base(capsys, run, tmp_path):
    r, _ = run
    expect_error(capsys, ["extrapolate", r, "--base", tmp_path / "nope", "--target", "30",
                          "--output", tmp_path / "out"], tmp_path, "no such model directory",
                 tmp_path / "out")


def test_no_checkpoints(capsys, tmp_path, run):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["extrapolate", tmp_path / "empty", "--base", run[1], "--target", "3",
                          "--output", tmp_path / "out"], tmp_path, "no checkpoints found")


def test_too_few_checkpoints(capsys, run, tmp_path):
    expect_error(capsys, base_args(run, tmp_path, "--observe-until", "2"), tmp_path,
                 "degree-1 fit needs at least 2", tmp_path / "out")


def test_non_increasing_steps(capsys, run, tmp_path):
    expect_error(capsys, base_args(run, tmp_path, "--steps", "6,4"), tmp_path,
                 "steps must increase")
    expect_error(capsys, base_args(run, tmp_path, "--steps", "4,4,6"), tmp_path,
                 "listed twice")


def test_target_inside_window(capsys, run, tmp_path):
    r, b = run
    expect_error(capsys, ["extrapolate", r, "--base", b, "--target", "8", "-o",
                          tmp_path / "out"], tmp_path, "--allow-interpolation")


def test_output_exists(capsys, run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    expect_error(capsys, base_args(run, tmp_path), tmp_path, "exists.*--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    code, _ = run_cli(capsys, base_args(run, tmp_path, "--overwrite"), tmp_path / "r1")
    assert code == 0 and not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "step-30" / "model.safetensors").is_file()


def test_output_inside_input(capsys, run, tmp_path):
    r, b = run
    expect_error(capsys, ["extrapolate", r, "--base", b, "--target", "30", "-o", r,
                          "--overwrite"], tmp_path, "overlaps the input")


def test_shape_mismatch(capsys, run, tmp_path):
    r, _ = run
    f = r / "checkpoint-4" / "model.safetensors"
    t = load_file(str(f))
    t["model.norm.weight"] = torch.zeros(31)
    save_file(t, str(f), metadata={"format": "pt"})
    expect_error(capsys, base_args(run, tmp_path), tmp_path,
                 r"checkpoint-4: tensor 'model.norm.weight' has shape \[31\] but the base has "
                 r"\[32\]")


def test_name_mismatch(capsys, run, tmp_path):
    r, _ = run
    f = r / "checkpoint-6" / "model.safetensors"
    t = load_file(str(f))
    t["model.extra.weight"] = t.pop("model.norm.weight")
    save_file(t, str(f), metadata={"format": "pt"})
    expect_error(capsys, base_args(run, tmp_path), tmp_path,
                 "checkpoint-6: tensor 'model.norm.weight' of the base model .* is missing")


def test_integer_where_base_is_float(capsys, run, tmp_path):
    r, _ = run
    f = r / "checkpoint-6" / "model.safetensors"
    t = load_file(str(f))
    t["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(t, str(f), metadata={"format": "pt"})
    expect_error(capsys, base_args(run, tmp_path), tmp_path, "is I32 but F32 in the base")


def test_truncated_file(capsys, run, tmp_path):
    r, _ = run
    f = r / "checkpoint-8" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect_error(capsys, base_args(run, tmp_path), tmp_path,
                 r"checkpoint-8/model.safetensors: truncated")


def test_corrupt_header(capsys, run, tmp_path):
    r, _ = run
    f = r / "checkpoint-8" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    expect_error(capsys, base_args(run, tmp_path), tmp_path, "corrupt safetensors header")
    f.write_bytes(struct.pack("<Q", 10**12) + bytes(data[8:]))
    expect_error(capsys, base_args(run, tmp_path), tmp_path, "corrupt or truncated")


def test_nan_in_checkpoint(capsys, run, tmp_path):
    r, _ = run
    f = r / "checkpoint-6" / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    expect_error(capsys, base_args(run, tmp_path), tmp_path,
                 r"up_proj.weight': NaN or Inf values in .*checkpoint-6", tmp_path / "out")


def test_index_escaping_directory(capsys, run_factory, tmp_path):
    r, b = run_factory(shards=2)
    index = r / "checkpoint-4" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../../base/model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    expect_error(capsys, ["extrapolate", r, "--base", b, "--target", "30", "-o",
                          tmp_path / "out"], tmp_path, "escapes the checkpoint directory")


def test_pickle_weights_refused(capsys, run, tmp_path):
    r, _ = run
    ck = r / "checkpoint-4"
    (ck / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, ck / "pytorch_model.bin")
    expect_error(capsys, base_args(run, tmp_path), tmp_path,
                 r"pickled PyTorch weights \(.bin\).*save_pretrained")


def test_bad_flags(capsys, run, tmp_path):
    expect_error(capsys, base_args(run, tmp_path, "--fit", "spline"), tmp_path,
                 "expected linear or polyN")
    expect_error(capsys, base_args(run, tmp_path, "--max-memory", "lots"), tmp_path,
                 "expected a size")
    expect_error(capsys, base_args(run, tmp_path, "--rank", "9"), tmp_path,
                 "--rank 9 needs at least 9")


def test_interrupt_leaves_nothing(run, tmp_path, monkeypatch):
    """A crash mid-write (here: Ctrl-C from the first tensor write) leaves no output at all."""
    import relex
    from relex.output import model as writer

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer.ModelWriter, "write_at", boom)
    r, b = run
    with pytest.raises(KeyboardInterrupt):
        relex.extrapolate(r, base=b, targets=[30], output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_success_prints_summary(capsys, run, tmp_path):
    r, b = run
    code = main([str(x) for x in ["extrapolate", r, "--base", b, "--target", "30", "--target",
                                  "40", "-o", tmp_path / "out"]])
    out = capsys.readouterr().out
    assert code == 0
    assert "step 30" in out and "step 40" in out and "explained var. (rank 1)" in out
