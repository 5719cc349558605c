"""hf://ORG/REPO runs, offline: the real huggingface_hub cache layout (refs/<branch> ->
snapshots/<commit>/ -> blobs/) is built in a temporary HF_HOME, checked with huggingface_hub itself
(snapshot_download(local_files_only=True), scan_cache_dir), then relex reads the branches."""

import hashlib
import os
import shutil

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir, snapshot_download

import relex
from conftest import load_dir
from relex.cli import main
from relex.errors import RelexError
from relex.checkpoints.inputs import resolve_inputs

STEPS = (2, 4, 6, 8, 10)


def cache_put(cache, repo, branch, src):
    """Store directory `src` as branch `branch` of model repo `repo`, the way a download does:
    content-addressed blobs, a snapshot of relative symlinks, a ref file holding the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = folder / "refs" / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return folder / "snapshots" / commit


@pytest.fixture
def hub_run(run_factory, tmp_path, monkeypatch):
    """A local run and the same run as branches step_N of org/run (+ org/base) in the cache."""
    run, base = run_factory()
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for s in STEPS:
        cache_put(cache, "org/run", f"step_{s}", run / f"checkpoint-{s}")
    cache_put(cache, "org/base", "main", base)
    return run, base, cache


def test_cache_layout_is_what_huggingface_hub_resolves(hub_run):
    run, _, cache = hub_run
    snap = snapshot_download("org/run", revision="step_6", local_files_only=True,
                             cache_dir=cache)
    assert load_dir(snap).keys() == load_dir(run / "checkpoint-6").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_dir(snap).values(),
                                                 load_dir(run / "checkpoint-6").values()))
    refs = {r.repo_id: {ref for rev in r.revisions for ref in rev.refs}
            for r in scan_cache_dir(cache).repos}
    assert refs == {"org/run": {f"step_{s}" for s in STEPS}, "org/base": {"main"}}


def test_extrapolate_hub_run_equals_local_run(hub_run, tmp_path):
    run, base, _ = hub_run
    rep = relex.extrapolate("hf://org/run", base="org/base", targets=[30], observe_until=8,
                            output=tmp_path / "hub", progress=False)
    relex.extrapolate(run, base=base, targets=[30], observe_until=8, output=tmp_path / "local",
                      progress=False)
    assert rep.observed_steps == [2, 4, 6, 8]
    a, b = load_dir(tmp_path / "hub/step-30"), load_dir(tmp_path / "local/step-30")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "hub/step-30/config.json").is_file()


def test_only_needed_revisions_are_touched(hub_run, tmp_path):
    """step_10's snapshot is gone (only its ref is left): extrapolate observing until 6 never
    asks for it; analyze, which scores the later steps, does and says how to get it."""
    _, _, cache = hub_run
    snaps = cache / "models--org--run" / "snapshots"
    commit = (cache / "models--org--run" / "refs" / "step_10").read_text()
    shutil.rmtree(snaps / commit)
    inputs = resolve_inputs("hf://org/run", base="org/base", observe_until=6)
    assert list(inputs.observed) == list(inputs.available) == [2, 4, 6]
    with pytest.raises(RelexError, match=r"org/run@step_10: cannot get this revision.*"
                                         r"hf download org/run --revision step_10"):
        resolve_inputs("hf://org/run", base="org/base", observe_until=6, later=True)
    inputs = resolve_inputs("hf://org/run", base="org/base", steps="2,6")
    assert list(inputs.observed) == list(inputs.available) == [2, 6]


def test_revision_pattern_and_cli(hub_run, tmp_path):
    run, base, cache = hub_run
    for s in STEPS:
        cache_put(cache, "org/other", f"ckpt-{s}-final", run / f"checkpoint-{s}")
    out = tmp_path / "o"
    assert main(["extrapolate", "hf://org/other", "--base", "org/base", "--revision-pattern",
                 "ckpt-{N}-final", "--target", "20", "-o", str(out), "-q"]) == 0
    relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "l", progress=False)
    a, b = load_dir(out / "step-20"), load_dir(tmp_path / "l/step-20")
    assert all(torch.equal(a[k], b[k]) for k in b)
    # the default pattern finds nothing there: one line, exit 2, nothing written
    assert main(["extrapolate", "hf://org/other", "--base", "org/base", "--target", "20",
                 "-o", str(tmp_path / "x"), "-q"]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(RelexError, match=r"no branch named like 'step_\{N\}' in the local cache"):
        resolve_inputs("hf://org/other", base="org/base")
    with pytest.raises(RelexError, match="must contain"):
        resolve_inputs("hf://org/other", base="org/base", revision_pattern="ckpt")
    with pytest.raises(RelexError, match="expected hf://ORG/REPO"):
        resolve_inputs("hf://nothing", base="org/base")


def test_unreachable_hub_falls_back_to_cache(hub_run, tmp_path, monkeypatch):
    """Not offline, but the endpoint refuses connections: the cached branches are used."""
    run, _, _ = hub_run
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.warns(UserWarning, match="hub unreachable"):
        inputs = resolve_inputs("hf://org/run", base="org/base", observe_until=4)
    assert list(inputs.observed) == [2, 4]
    assert inputs.observed[4].parent.name == "snapshots"
    assert load_dir(inputs.observed[4]).keys() == load_dir(run / "checkpoint-4").keys()
