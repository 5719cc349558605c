"""End to end: checkpoint directories in, model directories out, checked against a float64
reference computed independently (SVD of the stacked deltas + np.polyfit) in conftest.py."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

import relex
from conftest import assert_within_ulp, load_dir, reference

STEPS = (2, 4, 6, 8, 10)


def observed(run, steps, layout="checkpoint-{}"):
    return [load_dir(run / layout.format(s)) for s in steps]


def check_outputs(out, base_dir, run, steps, targets, out_dtype=None, layout="checkpoint-{}",
                  **ref_kw):
    base = load_dir(base_dir)
    refs = reference(base, observed(run, steps, layout), steps, targets, **ref_kw)
    for target, ref in zip(targets, refs):
        got = load_dir(out / f"step-{target}")
        assert set(got) == set(ref), "output has exactly the base's tensors"
        for name, tensor in got.items():
            assert tensor.dtype == (out_dtype or base[name].dtype), name
            if tensor.is_floating_point():
                assert_within_ulp(tensor, ref[name], name, base[name].double().numpy())
            else:
                assert torch.equal(tensor, base[name])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fp32_single_file(run_factory, tmp_path, rank):
    run, base = run_factory()
    rep = relex.extrapolate(run, base=base, targets=[30, 50], output=tmp_path / "out",
                            rank=rank, progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [30, 50], rank=rank)
    assert rep.moving == len(load_dir(base)) and rep.copied == 0


def test_bf16_sharded_tied_uneven_cadence(run_factory, tmp_path):
    steps = (1, 2, 5, 6, 13)
    run, base = run_factory(steps=steps, tied=True, base_dtype=torch.bfloat16, shards=3)
    relex.extrapolate(run, base=base, targets=[40], output=tmp_path / "out", progress=False)
    check_outputs(tmp_path / "out", base, run, steps, [40])
    out = tmp_path / "out" / "step-40"
    assert "lm_head.weight" not in load_dir(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"


def test_bf16_base_with_fp32_trainer_checkpoints(run_factory, tmp_path):
    run, base = run_factory(base_dtype=torch.bfloat16, ckpt_dtype=torch.float32)
    relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "out", progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [20])  # written in the base's bf16
    cfg = json.loads((tmp_path / "out/step-20/config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16", "config says the dtype actually written"


def test_dtype_override(run_factory, tmp_path):
    run, base = run_factory(base_dtype=torch.bfloat16)
    relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "out", dtype="fp32",
                      progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [20], out_dtype=torch.float32)


@pytest.mark.parametrize("kw", [dict(window=3), dict(fit="poly2"), dict(rank=2, window=4)])
def test_window_and_polynomial(run_factory, tmp_path, kw):
    run, base = run_factory(curve=0.5)
    relex.extrapolate(run, base=base, targets=[25], output=tmp_path / "out", progress=False,
                      **kw)
    ref_kw = {"rank": kw.get("rank", 1), "window": kw.get("window"),
              "degree": 2 if kw.get("fit") == "poly2" else 1}
    check_outputs(tmp_path / "out", base, run, STEPS, [25], **ref_kw)


def test_linear_weights_method(run_factory, tmp_path):
    run, base = run_factory()
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out",
                      method="linear-weights", progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [30], method="linear-weights")


def test_observe_until_and_steps_select_the_window(run_factory, tmp_path):
    run, base = run_factory(steps=(2, 4, 6, 8, 10, 12, 14))
    relex.extrapolate(run, base=base, observe_until=8, targets=[40], output=tmp_path / "a",
                      progress=False)
    check_outputs(tmp_path / "a", base, run, (2, 4, 6, 8), [40])
    relex.extrapolate(run, base=base, steps="4,8,14", targets=[40], output=tmp_path / "b",
                      progress=False)
    check_outputs(tmp_path / "b", base, run, (4, 8, 14), [40])
    prov = json.loads((tmp_path / "b/step-40/relex.json").read_text())
    assert prov["observed_steps"] == [4, 8, 14] and prov["step"] == 40


@pytest.mark.parametrize("budget", ["1MB", "40KB"])
def test_memory_budget_paths_give_identical_bytes(run_factory, tmp_path, budget):
    """Tensors over the budget are streamed twice across workers; the bytes must not change."""
    run, base = run_factory(base_dtype=torch.bfloat16)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "big", progress=False)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "small",
                      max_memory=budget, threads=2, progress=False)  # 40KB: 2 threads at most
    big, small = load_dir(tmp_path / "big/step-30"), load_dir(tmp_path / "small/step-30")
    for name in big:
        assert torch.equal(big[name], small[name]), name
    gb = safe_open(str(tmp_path / "big/relex-fit.safetensors"), "np")
    gs = safe_open(str(tmp_path / "small/relex-fit.safetensors"), "np")
    for name in gb.keys():
        np.testing.assert_allclose(gb.get_tensor(name), gs.get_tensor(name), rtol=1e-6)


def test_from_fit_reproduces_and_extends(run_factory, tmp_path):
    run, base = run_factory()
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
    relex.extrapolate(from_fit=tmp_path / "out", targets=[30, 60], output=tmp_path / "again",
                      progress=False)
    first, again = load_dir(tmp_path / "out/step-30"), load_dir(tmp_path / "again/step-30")
    for name in first:
        assert torch.equal(first[name], again[name]), name
    check_outputs(tmp_path / "again", base, run, STEPS, [60])
    # a different rank from the same Gram matrices, still one read pass
    relex.extrapolate(from_fit=tmp_path / "out/relex-fit.safetensors", targets=[60], rank=2,
                      output=tmp_path / "r2", progress=False)
    check_outputs(tmp_path / "r2", base, run, STEPS, [60], rank=2)


def check_reconstruction(out, base_dir, run, steps):
    """Each step-S output is theta_0 plus the rank-1 projection of its own delta (float64 SVD
    of the stacked deltas), within 1 ulp."""
    b = load_dir(base_dir)
    ck = observed(run, steps)
    for k, step in enumerate(steps):
        got = load_dir(out / f"step-{step}")
        for name in b:
            d = np.stack([c[name].double().numpy().ravel() - b[name].double().numpy().ravel()
                          for c in ck])
            _, _, vt = np.linalg.svd(d, full_matrices=False)
            ref = b[name].double().numpy().ravel() + (d[k] @ vt[0]) * vt[0]
            assert_within_ulp(got[name], ref.reshape(b[name].shape), name,
                              b[name].double().numpy())


def test_reconstruct(run_factory, tmp_path):
    run, base = run_factory(noise=0.5)
    relex.reconstruct(run, base=base, steps=[2, 6, 10], rank=1, output=tmp_path / "rec",
                      progress=False)
    check_reconstruction(tmp_path / "rec", base, run, (2, 6, 10))


def test_non_float_and_frozen_tensors(run_factory, tmp_path):
    """Integer buffers are copied; a tensor that never moves comes out bit-identical."""
    extra = {"model.position_ids": torch.arange(16, dtype=torch.int64).view(1, 16)}
    run, base = run_factory(extra=extra, noise=0.0)
    # freeze one float tensor in every checkpoint
    from safetensors.torch import load_file, save_file
    frozen = "model.norm.weight"
    base_val = load_dir(base)[frozen]
    for ck in run.iterdir():
        f = ck / "model.safetensors"
        tensors = load_file(str(f))
        tensors[frozen] = base_val.clone()
        save_file(tensors, str(f), metadata={"format": "pt"})
    rep = relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out",
                            progress=False)
    got = load_dir(tmp_path / "out/step-30")
    assert torch.equal(got["model.position_ids"], extra["model.position_ids"])
    assert torch.equal(got[frozen], base_val)
    assert rep.copied == 1
    prov = json.loads((tmp_path / "out/step-30/relex.json").read_text())
    assert prov["tensors"][frozen]["r2"] is None


def test_output_directory_layout(run_factory, tmp_path):
    run, base = run_factory(tokenizer=True, shards=2, base_dtype=torch.bfloat16)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out",
                      max_shard_size="30KB", progress=False)
    out = tmp_path / "out/step-30"
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.startswith("model-0000") for f in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_dir(out).values())
    for f in shards:
        with safe_open(str(out / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "relex.json"):
        assert name in files, name
    assert not any(f.startswith((".", "trainer_state")) for f in files)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["relex-fit.safetensors",
                                                                    "step-30"]
    prov = json.loads((out / "relex.json").read_text())
    assert prov["method"] == "relex" and prov["rank"] == 1 and prov["fit"] == "linear"
    assert prov["relex_version"] == relex.__version__
    ev = prov["summary"]["explained_variance_mean"]
    assert 0.5 < ev <= 1.0
    assert set(prov["tensors"]) == set(load_dir(out))


def test_single_target_file_is_model_safetensors(run_factory, tmp_path):
    run, base = run_factory()
    relex.extrapolate(run, base=base, targets=[12], output=tmp_path / "out", progress=False)
    names = sorted(p.name for p in (tmp_path / "out/step-12").glob("*.safetensors"))
    assert names == ["model.safetensors"]
    assert not (tmp_path / "out/step-12/model.safetensors.index.json").exists()


def test_interpolation_needs_flag(run_factory, tmp_path):
    run, base = run_factory()
    with pytest.raises(relex.RelexError, match="--allow-interpolation"):
        relex.extrapolate(run, base=base, targets=[10], output=tmp_path / "o", progress=False)
    relex.extrapolate(run, base=base, targets=[5], output=tmp_path / "o",
                      allow_interpolation=True, progress=False)
    check_outputs(tmp_path / "o", base, run, STEPS, [5])


def test_fp16_inputs(run_factory, tmp_path):
    run, base = run_factory(base_dtype=torch.float16)
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
    check_outputs(tmp_path / "out", base, run, STEPS, [30])


def test_cli_from_fit_and_reconstruct(run_factory, tmp_path, capsys):
    from relex.cli import main
    run, base = run_factory()
    assert main(["extrapolate", str(run), "--base", str(base), "--observe-until", "8",
                 "--target", "30", "-o", str(tmp_path / "a"), "-q"]) == 0
    assert main(["extrapolate", "--from-fit", str(tmp_path / "a"), "--target", "50",
                 "-o", str(tmp_path / "b"), "-q"]) == 0
    check_outputs(tmp_path / "b", base, run, (2, 4, 6, 8), [50])
    prov = json.loads((tmp_path / "b/step-50/relex.json").read_text())
    assert prov["from_fit"] and prov["observed_steps"] == [2, 4, 6, 8]
    assert main(["reconstruct", str(run), "--base", str(base), "--steps", "2,10", "--rank", "2",
                 "-o", str(tmp_path / "c"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "relex-fit.safetensors", "step-10", "step-2"]
    # with rank 2 and two checkpoints the projection is exact: step-10 is the real checkpoint
    got, real = load_dir(tmp_path / "c/step-10"), load_dir(run / "checkpoint-10")
    for name in got:
        assert_within_ulp(got[name], real[name].double().numpy(), name,
                          load_dir(base)[name].double().numpy())
    # RUN_DIR beside --from-fit: the fit's checkpoints are found there (here: where they were)
    assert main(["extrapolate", "--from-fit", str(tmp_path / "a"), str(run), "--target", "50",
                 "-o", str(tmp_path / "d"), "-q"]) == 0
    assert (tmp_path / "d/step-50/model.safetensors").read_bytes() == \
        (tmp_path / "b/step-50/model.safetensors").read_bytes()
    assert main(["analyze", "--from-fit", str(tmp_path / "a"), str(run), "-o",
                 str(tmp_path / "e"), "-q"]) == 2
    assert "do not also give" in capsys.readouterr().err


def test_from_fit_follows_a_moved_run(run_factory, tmp_path):
    """A fit stays usable when its run moves: the old paths are gone (one line saying to give
    RUN_DIR), the run's new directory finds the same checkpoints (compared by their files
    inside each checkpoint and sizes, not by absolute paths), and the output is the same bytes
    as before the move."""
    run, base = run_factory()
    relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(run, moved / "run")
    shutil.move(base, moved / "base")
    with pytest.raises(relex.RelexError, match=r"no longer exists \(moved\?\); give the run's "
                                         r"directory too"):
        relex.extrapolate(from_fit=tmp_path / "out", targets=[30], output=tmp_path / "x")
    relex.extrapolate(moved / "run", base=moved / "base", from_fit=tmp_path / "out",
                      targets=[30], output=tmp_path / "again", progress=False)
    assert (tmp_path / "out/step-30/model.safetensors").read_bytes() == \
        (tmp_path / "again/step-30/model.safetensors").read_bytes()
