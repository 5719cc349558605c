"""The demo pipeline end to end on a short real GRPO run (the long run is `relex demo`)."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from relex.demo import arithmetic as A
from relex.demo.grpo import GRPOConfig, advantages, train
from relex.demo.run import BASE, run_demo, targets_for


def test_task_and_reward():
    p = A.Problems(torch.tensor([123, 999, 5]), torch.tensor([456, 1, 7]))
    assert A.Problems(p.a, p.b).prompts()[0].tolist() == [A.BOS, 1, 2, 3, A.PLUS, 4, 5, 6,
                                                          A.EQUALS]
    assert p.answers().tolist() == [[0, 5, 7, 9], [1, 0, 0, 0], [0, 0, 1, 2]]
    assert p.carryless().tolist() == [[0, 5, 7, 9], [0, 9, 9, 0], [0, 0, 0, 2]]
    got = torch.tensor([[0, 5, 7, 9], [0, 9, 9, 0], [0, 0, 1, 2]])
    assert A.reward(got, p).tolist() == [1.0, 0.0, 1.0]


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = advantages(r, 4)
    assert adv[:4].sum().abs() < 1e-6 and adv[0] > 0 > adv[1]
    assert torch.equal(adv[4:], torch.zeros(4)), "a group with one outcome teaches nothing"


def test_shipped_base_is_the_documented_starting_point():
    model = LlamaForCausalLM.from_pretrained(BASE)
    test = A.heldout()
    acc = A.accuracy(model, test)
    carryless = (A.generate(model, test.prompts()) == test.carryless()).all(1).float().mean()
    assert 0.2 < acc < 0.5 and carryless > 0.5
    assert sum(p.numel() for p in model.parameters()) < 600_000


def test_targets_cover_the_run_and_beyond():
    assert targets_for(400, 60) == [100, 140, 180, 220, 260, 300, 340, 380, 400, 600, 800]
    t = targets_for(24, 8)
    assert t[-2:] == [36, 48] and 24 in t and min(t) > 8


def test_short_demo_end_to_end(tmp_path):
    r = run_demo(tmp_path / "demo", steps=24, observe_until=8, progress=False, cycle=4, jump=8)
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["observe_until"] == 8 and summary["steps"] == 24
    assert (out / "demo.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "extrapolated").iterdir()) == ["linear-weights", "relex"]
    # real GRPO improved the policy, and relex's prediction of step 24 from 8 steps did too
    assert r.real[24] > r.base_accuracy + 0.1
    assert r.predicted["relex"][24] > r.base_accuracy + 0.05
    assert abs(r.predicted["relex"][24] - r.real[24]) < 0.15
    assert r.verdict and all(isinstance(v, str) for v in r.verdict)
    assert {row["step"] for row in summary["targets"]} == set(targets_for(24, 8))
    for step in (2, 4, 6, 8, 10, 20, 24):
        assert (out / "run" / f"checkpoint-{step}" / "model.safetensors").is_file()
    with pytest.raises(Exception, match="exists"):
        run_demo(out, steps=24, observe_until=8, progress=False)
    # the accelerated run: jumps every 4 real steps, a curve against real steps, the table
    acc = summary["accelerated"]
    assert (acc["cycle"], acc["jump"], acc["steps"]) == (4, 8, 12)
    assert [j["real_step"] for j in acc["jumps"]] == [4, 8, 12]
    assert [c["real_step"] for c in acc["curve"]] == [10, 12]
    assert acc["curve"][-1]["accuracy"] > r.base_accuracy + 0.1
    reach = summary["real_steps_to_reach"]
    final = f"{r.real[24]:.3f}"
    assert reach["plain"][final] == min(s for s in r.real if r.real[s] >= r.real[24] - 5e-4)
    assert set(reach["accelerated"]) == set(reach["plain"]) >= {"0.900", "0.930", "0.945"}
    with pytest.raises(Exception, match="at least 2 snapshots"):
        run_demo(tmp_path / "bad", steps=24, observe_until=8, progress=False, cycle=2)
    assert not (tmp_path / "bad").exists()


def test_overwrite_refuses_foreign_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(Exception, match="not a relex demo directory"):
        run_demo(tmp_path / "mine", steps=12, observe_until=6, overwrite=True, progress=False)
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_demo_is_deterministic(tmp_path):
    a = run_demo(tmp_path / "a", steps=12, observe_until=6, progress=False)
    b = run_demo(tmp_path / "b", steps=12, observe_until=6, progress=False)
    assert a.real == b.real and a.predicted == b.predicted
    assert a.accelerated == b.accelerated and a.accelerated["curve"]
    c = run_demo(tmp_path / "c", steps=12, observe_until=6, seed=1, progress=False)
    assert c.real != a.real


def test_resume_from_a_saved_state_continues_the_same_run(tmp_path):
    """save_state keeps what a trainer resumes from; resuming at step 4 reproduces the
    uninterrupted run (weights, Adam, sampling), and resume_optimizer=False starts a new Adam."""
    cfg = GRPOConfig(steps=6, prompts=4, group=4, eval_every=100)
    whole = LlamaForCausalLM.from_pretrained(BASE)
    rows = train(whole, tmp_path / "a", cfg, save_state=True)
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth",
            "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"global_step": 4}
    resumed = LlamaForCausalLM.from_pretrained(BASE)
    rest = train(resumed, tmp_path / "b", cfg, resume_from=ckpt)
    assert [r["step"] for r in rest] == [5, 6]
    assert [r["reward"] for r in rest] == [r["reward"] for r in rows[4:]]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = LlamaForCausalLM.from_pretrained(BASE)
    train(fresh, tmp_path / "c", cfg, resume_from=ckpt, resume_optimizer=False)
    assert not torch.equal(fresh.lm_head.weight, whole.lm_head.weight)
