"""`relex watch` on a simulated live run: a thread writes checkpoints file by file while
watch polls; only complete checkpoints are read, and the target is written once verified."""

import shutil
import threading
import time

import pytest
from conftest import make_run

from relex import RelexError
from relex.analysis.watch import VERL_TRACKER, Follower, watch
from relex.cli import main


def copy_slowly(src, dst, pause):
    """Copy a checkpoint directory the way a trainer writes it: config first, weights later."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir(), key=lambda p: p.suffix == ".safetensors"):
        time.sleep(pause)
        shutil.copy(f, dst / f.name)


def test_follower_reads_complete_checkpoints_only(tmp_path):
    staged, _ = make_run(tmp_path / "staged", steps=(2, 4, 6))
    live = tmp_path / "live"
    lines = []
    f = Follower(live, lines.append)
    assert f.poll() == {}  # no directory yet: wait, do not fail
    live.mkdir()
    assert f.poll() == {} and any("waiting" in line for line in lines)
    shutil.copytree(staged / "checkpoint-2", live / "checkpoint-2")
    (live / "checkpoint-4").mkdir()
    shutil.copy(staged / "checkpoint-4" / "config.json", live / "checkpoint-4")
    shutil.copytree(staged / "checkpoint-6", live / "tmp_step_6")  # NeMo-RL, being written
    assert f.poll() == {}, "a checkpoint counts once it is unchanged over two polls"
    assert list(f.poll()) == [2]
    shutil.copy(staged / "checkpoint-4" / "model.safetensors", live / "checkpoint-4")
    assert list(f.poll()) == [2], "checkpoint-4 just changed"
    assert list(f.poll()) == [2, 4]
    shutil.rmtree(live / "checkpoint-2")
    assert list(f.poll()) == [4] and "checkpoint 2" in lines[-1] and "disappeared" in lines[-1]


def test_verl_tracker_marks_complete_steps(tmp_path):
    staged, _ = make_run(tmp_path / "staged", steps=(2, 4), layout="verl")
    live = tmp_path / "live"
    shutil.copytree(staged, live)
    f = Follower(live, lambda line: None)
    (live / VERL_TRACKER).write_text("2\n")
    assert list(f.poll()) == [2], "verl: steps after the tracker are still being written"
    (live / VERL_TRACKER).write_text("4\n")
    assert list(f.poll()) == [2, 4]


def test_watch_a_live_run_and_write_when_verified(tmp_path):
    steps = tuple(range(2, 21, 2))
    staged, base = make_run(tmp_path / "staged", steps=steps, noise=0.01)
    live = tmp_path / "live"
    live.mkdir()

    def trainer():
        for s in steps:
            copy_slowly(staged / f"checkpoint-{s}", live / f"checkpoint-{s}", 0.02)
            time.sleep(0.15)
    thread = threading.Thread(target=trainer)
    thread.start()
    lines = []
    try:
        res = watch(live, base=base, target=24, write_when_verified=True,
                    output=tmp_path / "out", report=tmp_path / "report", interval=0.1,
                    timeout=60, echo=lines.append)
    finally:
        thread.join()
    assert res.written == tmp_path / "out" / "step-24"
    assert (res.written / "model.safetensors").is_file()
    h = res.history
    assert h and h[-1]["target_verified"] and h[-1]["verified_up_to_step"] >= 24
    assert all(not r["target_verified"] for r in h[:-1])
    assert [r["checkpoints"] for r in h] == sorted({r["checkpoints"] for r in h})
    assert h[-1]["step"] == 2 * h[-1]["checkpoints"], "only complete checkpoints were analysed"
    assert (tmp_path / "report" / "watch.json").is_file()
    assert any("inside the verified horizon" in line for line in lines)


def test_watch_once_analyses_a_finished_run(run_factory, tmp_path, capsys):
    run, base = run_factory(steps=(2, 4, 6, 8, 10), noise=0.01)
    report = tmp_path / "report"
    assert main(["watch", str(run), "--base", str(base), "--target", "12", "--once",
                 "--interval", "0.05", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "relex watch: step 10 (5 checkpoints)" in out and "verified horizon" in out
    assert (report / "summary.json").is_file() and (report / "watch.json").is_file()
    res = watch(run, base=base, target=10, write_when_verified=True, output=tmp_path / "out",
                once=True, interval=0.05, echo=lambda line: None)
    assert res.written == tmp_path / "out" / "step-10" and len(res.history) == 1


def test_watch_a_missing_run_dir_is_an_error(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    with pytest.raises(RelexError, match="does not exist"):
        watch(missing, base=tmp_path, target=10)
    assert main(["watch", str(missing), "--base", str(tmp_path), "--target", "10",
                 "--once"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relex: error: ") and str(missing) in err and err.count("\n") == 1


def test_watch_stops_and_refuses(tmp_path):
    lines = []
    (tmp_path / "empty").mkdir()
    res = watch(tmp_path / "empty", base=tmp_path, target=10, interval=0.01, max_polls=3,
                echo=lines.append)
    assert res.history == [] and res.written is None
    assert "nothing analysed" in lines[-1]
    with pytest.raises(RelexError, match="needs --output"):
        watch(tmp_path, base=tmp_path, target=10, write_when_verified=True)
    with pytest.raises(RelexError, match="exists"):
        watch(tmp_path, base=tmp_path, target=10, write_when_verified=True, output=tmp_path)
