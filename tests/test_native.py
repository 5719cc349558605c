"""Native output: the target written into a copy of the run's own last checkpoint, resumed by
the trainer itself (transformers Trainer here; FSDP2 rank files and DCP in test_native_fsdp.py,
DeepSpeed in test_native_deepspeed.py).

Checked against the trainer's own loading code: the model a resumed Trainer starts from is the
extrapolation (equal to relex's HF output, within 1 ulp of a float64 reference), its Adam
moments are the last real checkpoint's, and its step counter continues from there.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import relex
from relex.errors import RelexError

from conftest import TINY, assert_within_ulp, load_dir, reference

STEPS = (2, 4, 6, 8)


def _trainer(output_dir: Path, max_steps: int, model=None, callbacks=()):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    if model is None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **TINY))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY["vocab_size"], (64, 12), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=0, save_steps=2,
        save_strategy="steps", logging_steps=100, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A real Trainer run: base saved at step 0, checkpoint-2..8 with optimizer state."""
    root = tmp_path_factory.mktemp("trainer")
    trainer = _trainer(root / "run", max_steps=STEPS[-1])
    trainer.model.save_pretrained(root / "base")
    trainer.train()
    return root


class _Capture:
    """What a resumed Trainer starts from: weights and Adam state at on_train_begin (after
    Trainer has loaded the checkpoint and the optimizer), and the step it ends at."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Capture(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                self.start_step = state.global_step
                self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                self.moments = {i: {k: v.clone() for k, v in s.items()}
                                for i, s in optimizer.state_dict()["state"].items()}

            def on_train_end(self, args, state, control, **kw):
                self.end_step = state.global_step
        return Capture()


def test_trainer_resumes_from_native_output(trainer_run, tmp_path):
    run, base = trainer_run / "run", trainer_run / "base"
    report = relex.extrapolate(run, base=base, targets=[16], output=tmp_path / "native",
                               output_format="native", progress=False)
    relex.extrapolate(run, base=base, targets=[16], output=tmp_path / "hf", progress=False)
    assert report.output_format == "native"
    ckpt = tmp_path / "native" / "step-16" / "checkpoint-8"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        p.name for p in (run / "checkpoint-8").iterdir())
    prov = json.loads((tmp_path / "native" / "step-16" / "relex.json").read_text())
    assert prov["output_format"] == "native" and prov["native"]["resume_step"] == 8
    assert "trainer.train(resume_from_checkpoint=" in prov["native"]["resume"]
    assert any(n.startswith("resume step 16: transformers Trainer") for n in report.notes)

    # the written weights: relex's HF output bit for bit, within 1 ulp of float64
    got, hf = load_dir(ckpt), load_dir(tmp_path / "hf" / "step-16")
    assert got.keys() == hf.keys() and all(torch.equal(got[k], hf[k]) for k in got)
    b = load_dir(base)
    ckpts = [load_dir(run / f"checkpoint-{s}") for s in STEPS]
    ref = reference(b, ckpts, STEPS, [16])[0]
    for k in got:
        assert_within_ulp(got[k], ref[k], k, b[k].double().numpy())
    # every other file is the last real checkpoint's, byte for byte
    for f in (run / "checkpoint-8").iterdir():
        if not f.name.endswith(".safetensors"):
            assert (ckpt / f.name).read_bytes() == f.read_bytes(), f.name

    capture = _Capture()
    resumed = _trainer(tmp_path / "resumed", max_steps=10, callbacks=[capture])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert capture.start_step == 8 and capture.end_step == 10
    for k, v in capture.weights.items():
        assert torch.equal(v, hf[k]), k
    real = torch.load(run / "checkpoint-8" / "optimizer.pt", weights_only=True)["state"]
    assert capture.moments.keys() == real.keys()
    for i, s in real.items():
        for k, v in s.items():
            assert torch.equal(capture.moments[i][k], v), (i, k)


def test_native_output_leaves_the_run_unchanged(trainer_run, tmp_path):
    run = trainer_run / "run"
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    relex.extrapolate(run, base=trainer_run / "base", targets=[12], output=tmp_path / "o",
                      output_format="native", progress=False)
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before


def test_native_refusals(trainer_run, tmp_path):
    run, base = trainer_run / "run", trainer_run / "base"
    bare = tmp_path / "bare"
    for s in STEPS:  # the weights only: no optimizer state
        (bare / f"checkpoint-{s}").mkdir(parents=True)
        for f in ("model.safetensors", "config.json"):
            (bare / f"checkpoint-{s}" / f).write_bytes((run / f"checkpoint-{s}" / f).read_bytes())
    with pytest.raises(RelexError, match=r"checkpoint-8: keeps no optimizer state .* "
                                         r"--allow-fresh-optimizer"):
        relex.extrapolate(bare, base=base, targets=[12], output=tmp_path / "o",
                          output_format="native", progress=False)
    relex.extrapolate(bare, base=base, targets=[12], output=tmp_path / "o",
                      output_format="native", allow_fresh_optimizer=True, progress=False)
    assert (tmp_path / "o" / "step-12" / "checkpoint-8" / "model.safetensors").is_file()
    with pytest.raises(RelexError, match="native output keeps each tensor in the dtype"):
        relex.extrapolate(run, base=base, targets=[12], output=tmp_path / "p", dtype="bf16",
                          output_format="native", progress=False)
    with pytest.raises(RelexError, match="overlaps the input"):
        relex.extrapolate(run, base=base, targets=[12], output=run / "checkpoint-8" / "x",
                          output_format="native", progress=False)


def test_crc_of_rewritten_zip_members(tmp_path):
    """NativeWriter.seal rewrites the CRC-32 of a changed torch.save member where zip keeps it."""
    from relex.formats.torchzip import load
    from relex.output.native import _rewrite_crc
    f = tmp_path / "x.pt"
    torch.save({"a": torch.arange(1000.0), "b": torch.ones(3)}, f)
    st = load(f)["a"].storage
    assert len(st.crc_at) == 2
    raw = bytearray(f.read_bytes())
    raw[st.offset: st.offset + 4000] = np.full(1000, 7.0, np.float32).tobytes()
    f.write_bytes(bytes(raw))
    assert zipfile.ZipFile(f).testzip() is not None  # now damaged
    _rewrite_crc(st)
    assert zipfile.ZipFile(f).testzip() is None
    assert torch.equal(torch.load(f, weights_only=True)["a"], torch.full((1000,), 7.0))


def test_writes_into_boxes_at_any_byte(tmp_path):
    """Tensor-parallel boxes (split along dim 1, at odd byte offsets as in Megatron's files)
    and whole-row boxes take any element range, partial rows included; read back through the
    reading path they hold it, and no byte outside them changes."""
    from relex.formats.base import MappedFiles
    from relex.formats.chunked import Chunk, _fill
    from relex.formats.unpickler import Storage, StoredTensor
    from relex.output.native import _write_box
    shape, cut, at = (5, 7), 3, 3  # data starting at byte 3: no float32 view of a map there
    f = tmp_path / "boxes.bin"
    f.write_bytes(b"\xff" * (4 * 35 + 2 * at + 16 * 4 + at))
    left = StoredTensor(Storage("l", torch.float32, 15, f, at), 0, (5, cut), (cut, 1))
    right = StoredTensor(Storage("r", torch.float32, 20, f, at + 60 + at), 0, (5, 4), (4, 1))
    chunks = [Chunk((0, 0), left), Chunk((0, cut), right)]
    rows = [Chunk((0,), StoredTensor(Storage("w", torch.float32, 16, f, 2 * at + 140), 0,
                                     (16,), (1,)))]
    want = torch.arange(35, dtype=torch.float32)
    fds = {}

    def fd(file):
        return fds.setdefault(file, os.open(file, os.O_WRONLY))
    for a, b in [(0, 2), (2, 11), (11, 12), (12, 30), (30, 35)]:
        for c in chunks:
            _write_box(c, shape, a, b, want[a:b], fd)
        for c in rows:
            _write_box(c, (16,), min(a, 16), min(b, 16), want[min(a, 16):min(b, 16)], fd)
    for d in fds.values():
        os.close(d)
    maps = MappedFiles()
    got = torch.empty(35)
    _fill(got, shape, 0, 35, [(c.offsets, c) for c in chunks], maps)
    maps.close()
    assert torch.equal(got, want)
    raw = f.read_bytes()
    assert raw[:at] == raw[at + 60: 2 * at + 60] == raw[-at:] == b"\xff" * at
    left_values = np.frombuffer(raw[at: at + 60], np.float32)
    assert np.array_equal(left_values.reshape(5, 3), want.view(5, 7)[:, :3].numpy())
    assert np.array_equal(np.frombuffer(raw[2 * at + 140: 2 * at + 204], np.float32),
                          want[:16].numpy())


def test_jump_restart_loop(trainer_run, tmp_path):
    """relex jump twice around a real Trainer resume: the second cycle is fitted from the
    jumped weights on the checkpoints saved after the resume, at steps counted from it."""
    import shutil
    run, base = tmp_path / "run", trainer_run / "base"
    shutil.copytree(trainer_run / "run", run)
    jumps = tmp_path / "jumps"
    relex.jump(run, base=base, ahead=8, output=jumps, progress=False)
    first = json.loads((jumps / "jump-1" / "jump.json").read_text())
    assert first["resume_step"] == 8 and first["cycle_steps"] == list(STEPS)
    ckpt = jumps / "jump-1" / "step-16" / "checkpoint-8"
    assert Path(first["model"]) == ckpt.resolve()
    with pytest.raises(RelexError, match=r"0 checkpoint\(s\) after step 8 .* jump-1"):
        relex.jump(run, base=base, ahead=8, output=jumps, progress=False)

    resumed = _trainer(run, max_steps=12)  # the trainer resumes into its own run directory
    resumed.train(resume_from_checkpoint=str(ckpt))
    report = relex.jump(run, base=base, ahead=6, output=jumps, progress=False)
    second = json.loads((jumps / "jump-2" / "jump.json").read_text())
    assert second["resume_step"] == 12 and second["cycle_steps"] == [10, 12]
    assert second["steps_ahead_in_total"] == 14
    assert any("resume_from_checkpoint" in n for n in report.notes)
    b = load_dir(ckpt)
    ckpts = [load_dir(run / f"checkpoint-{s}") for s in (10, 12)]
    ref = reference(b, ckpts, [2, 4], [10])[0]
    got = load_dir(jumps / "jump-2" / "step-10" / "checkpoint-12")
    for k in got:
        assert_within_ulp(got[k], ref[k], k, b[k].double().numpy())
