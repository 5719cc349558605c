"""Checkpoint discovery across the layouts real trainers write."""

import pytest

import relex
from relex.checkpoints.discover import discover
from relex.errors import RelexError
from relex.checkpoints.inputs import resolve_inputs


@pytest.mark.parametrize("layout,rel", [
    ("trl", "checkpoint-{}"), ("verl", "global_step_{}/actor/huggingface"),
    ("openrlhf", "global_step{}_hf"), ("nemo", "step_{}/policy/weights/hf"),
    ("plain", "step-{}")])
def test_layouts(run_factory, layout, rel):
    run, _ = run_factory(layout=layout, steps=(3, 6, 9))
    found = discover(run)
    assert list(found) == [3, 6, 9]
    for step, path in found.items():
        assert path == run / rel.format(step)


def test_verl_fsdp_shards_are_found(tmp_path):
    """verl FSDP rank files are read in place (formats/verl_fsdp.py): discovery returns actor/."""
    actor = tmp_path / "run" / "global_step_50" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text("{}")
    (actor / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    assert discover(tmp_path / "run") == {50: actor}


def test_verl_megatron_only_names_the_converter(tmp_path):
    actor = tmp_path / "run" / "global_step_50" / "actor"
    (actor / "dist_ckpt").mkdir(parents=True)
    with pytest.raises(RelexError, match=r"python -m verl.model_merger merge --backend megatron "
                                         r"--local_dir .*global_step_50/actor"):
        discover(tmp_path / "run")


def test_legacy_megatron_checkpoint_names_torch_dist(tmp_path):
    """ROLL's default Megatron save (iter_N/mp_rank_TT/model_optim_rng.pt) is not read: the
    error says so instead of leaving the step out as one without weights."""
    rank = tmp_path / "run" / "iter_0000050" / "mp_rank_00"
    rank.mkdir(parents=True)
    (rank / "model_optim_rng.pt").write_bytes(b"x")
    with pytest.raises(RelexError, match=r"iter_0000050: .*--ckpt-format torch_dist"):
        discover(tmp_path / "run")
    (tmp_path / "run" / "iter_0000040_hf").mkdir()  # among readable steps too
    (tmp_path / "run" / "iter_0000040_hf" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(RelexError, match=r"iter_0000050: holds mp_rank_00/model_optim_rng.pt"):
        discover(tmp_path / "run")


def test_accelerate_dcp_is_found(tmp_path):
    dcp = tmp_path / "run" / "checkpoint-7" / "pytorch_model_fsdp_0"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"x")
    (dcp / "__0_0.distcp").write_bytes(b"x")
    assert discover(tmp_path / "run") == {7: dcp}


def test_openrlhf_deepspeed_is_found(tmp_path):
    for step in (5, 10):
        tag = tmp_path / "ckpt" / "_actor" / f"global_step{step}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert discover(tmp_path / "ckpt") == {5: tmp_path / "ckpt/_actor/global_step5",
                                           10: tmp_path / "ckpt/_actor/global_step10"}


def test_nemo_dcp_only_names_the_converter(tmp_path):
    (tmp_path / "run" / "step_10" / "policy" / "weights" / "model").mkdir(parents=True)
    with pytest.raises(RelexError, match="convert_dcp_to_hf.py"):
        discover(tmp_path / "run")


def test_nothing_found_lists_layouts(tmp_path):
    (tmp_path / "run" / "logs").mkdir(parents=True)
    with pytest.raises(RelexError, match=r"no checkpoints found; looked for .*checkpoint-N"):
        discover(tmp_path / "run")


def test_model_dir_given_as_run_dir(run_factory):
    run, base = run_factory()
    with pytest.raises(RelexError, match="single model directory"):
        discover(base)


def test_duplicate_step(run_factory):
    run, _ = run_factory(steps=(2, 4))
    (run / "checkpoint-4").rename(run / "step-2")
    (run / "checkpoint-2").rename(run / "checkpoint-2x")  # not a layout: ignored
    run2, _ = run_factory(steps=(2, 4))
    import shutil
    shutil.copytree(run2 / "checkpoint-2", run / "checkpoint-2")
    with pytest.raises(RelexError, match="step 2 is claimed by both"):
        discover(run)


def test_step_zero_in_run_is_the_base(run_factory, tmp_path):
    run, base = run_factory(steps=(5, 10, 15))
    import shutil
    shutil.copytree(base, run / "checkpoint-0")
    inputs = resolve_inputs(run)
    assert inputs.base == run / "checkpoint-0" and list(inputs.observed) == [5, 10, 15]
    rep = relex.extrapolate(run, targets=[30], output=tmp_path / "out", progress=False)
    assert rep.observed_steps == [5, 10, 15]


def test_explicit_checkpoints(run_factory):
    run, base = run_factory(steps=(2, 4, 6))
    inputs = resolve_inputs(base=base, checkpoints=[f"4={run}/checkpoint-4",
                                                    f"6={run}/checkpoint-6"])
    assert list(inputs.observed) == [4, 6]
    with pytest.raises(RelexError, match="expected STEP=PATH"):
        resolve_inputs(base=base, checkpoints=["four=x"])
    with pytest.raises(RelexError, match="also .* in the run directory"):
        resolve_inputs(run, base=base, checkpoints=[f"4={run}/checkpoint-6"])


def test_no_base(run_factory):
    run, _ = run_factory()
    with pytest.raises(RelexError, match="pass --base"):
        resolve_inputs(run)


def test_step_with_weights_relex_cannot_read_is_an_error(run_factory, capsys):
    """A step directory holding weight files but nothing relex reads (here a shard whose
    index is lost) is an error naming it, not a step left out; --skip-unreadable leaves it
    out with a warning naming it."""
    run, _ = run_factory(layout="trl", steps=(3, 6, 9))
    d = run / "checkpoint-6"
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    with pytest.raises(RelexError, match=r"checkpoint-6: holds model-00001-of-00002\.safetensors "
                                         r"but no TRL .* checkpoint relex reads; .*"
                                         r"--skip-unreadable"):
        discover(run)
    assert list(discover(run, skip_unreadable=True)) == [3, 9]
    err = capsys.readouterr().err
    assert err.startswith(f"relex: warning: skipping step 6: {run}/checkpoint-6: holds")
    assert list(discover(run, strict=False)) == [3, 9]


def test_step_without_weights_is_left_out_with_one_line(run_factory, capsys):
    """A step directory with a config but no weights (a save still running, or one that kept
    only the config) is left out, and says so in one line."""
    run, _ = run_factory(layout="trl", steps=(3, 6, 9))
    d = run / "checkpoint-6"
    for f in d.glob("*.safetensors"):
        f.unlink()
    assert list(discover(run)) == [3, 9]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leaving out step 6" in err and "config.json" in err
