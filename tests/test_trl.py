"""RelexCallback inside the real trl.GRPOTrainer, on the demo's model and task, on CPU.

The tokenizer is built locally (character level over the 13-token vocabulary of arithmetic.py).
Measurements (not part of the suite): `python tests/test_trl.py SEED JUMP STEPS`.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
from transformers import LlamaForCausalLM, TrainerCallback

from relex import RelexError
from relex.demo import arithmetic as A
from relex.demo.run import BASE
from relex.integrations.trl import RelexCallback


def char_tokenizer():
    """Digits, '+', '=' and '<s>' with the ids of arithmetic.py; '<s>' is prepended."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(A.DIGITS + "+=")}
    vocab["<s>"] = A.BOS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="="))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", A.BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="=",
                                   pad_token="=")


def dataset(n: int, seed: int):
    from datasets import Dataset
    p = A.Problems.sample(n, torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"prompt": [f"{a:03d}+{b:03d}=" for a, b in zip(p.a.tolist(),
                                                                              p.b.tolist())],
                              "answer": [f"{a + b:04d}" for a, b in zip(p.a.tolist(),
                                                                         p.b.tolist())]})


def exact_match(completions, answer, **kwargs):
    return [float(c.strip()[:4] == a and len(c.strip()) >= 4) for c, a in zip(completions, answer)]


def trainer(out: Path, steps: int, callbacks, prompts=8, group=8, seed=0, reward=exact_match,
            **kw):
    kw = dict(dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=prompts * group,
        num_generations=group, max_completion_length=A.ANSWER_LEN, learning_rate=1e-5,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=0.0,
        temperature=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0), **kw)
    args = trl.GRPOConfig(**kw)
    return trl.GRPOTrainer(model=LlamaForCausalLM.from_pretrained(BASE),
                           reward_funcs=reward, args=args,
                           train_dataset=dataset(steps * prompts, seed),
                           processing_class=char_tokenizer(), callbacks=callbacks)


class Recorder(TrainerCallback):
    """Weights and Adam state at every step end (before relex's on_log), and after on_log."""

    def __init__(self):
        self.before, self.after, self.state_ids, self.reported = {}, {}, {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.before[state.global_step] = {n: p.detach().double().clone()
                                          for n, p in model.named_parameters()}
        self.state_ids[state.global_step] = {n: (id(optimizer.state[p]["exp_avg"]),
                                                 int(optimizer.state[p]["step"]))
                                             for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())

    def on_log(self, args, state, control, model=None, logs=None, **kw):
        self.after[state.global_step] = {n: p.detach().double().clone()
                                         for n, p in model.named_parameters()}
        self.reported[state.global_step] = {k for k in logs or {} if k.startswith("relex/")}


def svd_lstsq(base, snaps, steps, target):
    """Textbook rank-1 RELEX in float64: SVD of the deltas, lstsq line of the coefficient."""
    d = np.stack([(s - base).ravel() for s in snaps])
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    a = np.stack([np.asarray(steps, float), np.ones(len(steps))], axis=1)
    coef, *_ = np.linalg.lstsq(a, d @ vt[0], rcond=None)
    return (base.ravel() + (coef[0] * target + coef[1]) * vt[0]).reshape(base.shape)


def test_grpo_trainer_jumps_in_place(tmp_path):
    relex_cb, rec = RelexCallback(mode="accelerate", cycle=6, jump=12, every=2, guard_steps=2,
                                  guard_margin=1.0), Recorder()
    t = trainer(tmp_path / "run", 14, [relex_cb, rec], prompts=2)
    start = {n: p.detach().double().clone() for n, p in t.model.named_parameters()}
    t.train()
    acc = relex_cb.accelerator
    assert [j.real_step for j in acc.jumps] == [6, 12] and t.state.global_step == 14
    assert not any(j.rolled_back for j in acc.jumps)
    # the weights written at step 6 are relex's extrapolation of steps 2, 4, 6 to step 18
    for name, p in rec.params.items():
        ref = svd_lstsq(start[name].numpy(), [rec.before[s][name].numpy() for s in (2, 4, 6)],
                        [2, 4, 6], 18)
        got = rec.after[6][name].numpy()
        assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max()), name
        assert not np.allclose(got, rec.before[6][name].numpy()), name
        assert rec.params[name] is dict(t.model.named_parameters())[name]
    # the second cycle starts from the jumped weights
    name = "model.layers.0.mlp.down_proj.weight"
    ref = svd_lstsq(rec.after[6][name].numpy(), [rec.before[s][name].numpy()
                                                 for s in (8, 10, 12)], [2, 4, 6], 18)
    assert np.allclose(rec.after[12][name].numpy(), ref, rtol=0, atol=1e-6)
    # Adam state survives the jumps: the same moment tensors, step counts keep counting
    for name in rec.params:
        assert rec.state_ids[7][name][0] == rec.state_ids[5][name][0]
        assert rec.state_ids[14][name][1] == 14
    logged = [e for e in t.state.log_history if "relex/jump" in e]
    assert [(e["step"], e["relex/jump"], e["relex/virtual_step"]) for e in logged] == \
        [(6, 12, 18), (12, 12, 36)]
    assert all("reward" in e for e in logged), "merged into the step's own log entry"
    # a reporting callback after relex's (as W&B is with add_to) sees the values in `logs`
    assert "relex/jump" in rec.reported[6] and not rec.reported[5]


def test_the_trainers_evaluation_judges_the_jumps(tmp_path):
    """eval_fn="trainer": relex asks TRL's own evaluation (reward functions on the eval
    dataset) before and right after each jump; the scores are the eval_reward TRL logs."""
    relex_cb = RelexCallback(mode="accelerate", cycle=6, jump=12, every=2, guard_steps=2,
                             guard_margin=1.0, eval_fn="trainer")
    t = trainer(tmp_path / "run", 8, [], prompts=2, per_device_eval_batch_size=16,
                eval_strategy="no")
    t.eval_dataset = dataset(16, 99)
    relex_cb.add_to(t)
    t.train()
    j = relex_cb.accelerator.jumps[0]
    evals = [e["eval_reward"] for e in t.state.log_history if "eval_reward" in e]
    assert len(evals) == 2 and [j.score_before, j.score_after] == evals
    assert t.state.global_step == 8 and relex_cb.accelerator.eval_fn is not None
    logged = next(e for e in t.state.log_history if "relex/jump" in e)
    assert logged["relex/score_after"] == j.score_after
    assert "reward" in logged and "eval_reward" not in logged  # the step's training entry
    with pytest.raises(RelexError, match="eval_dataset"):
        cb = RelexCallback(mode="accelerate", cycle=6, jump=12, every=2, eval_fn="trainer")
        cb.add_to(trainer(tmp_path / "run2", 2, [], prompts=2)).on_train_begin(
            t.args, t.state, t.control, model=t.model)


def test_stop_when_converged_ends_training(tmp_path):
    """jump="auto" on a run whose reward does not move (every completion scores 0.5; the
    weights still move, by AdamW's weight decay): the jumps halve to nothing, relex says the
    run converged, and with stop_when_converged=True the Trainer stops there instead of at
    max_steps."""
    cb = RelexCallback(mode="accelerate", cycle=6, every=2, jump="auto", guard_steps=2,
                       stop_when_converged=True)
    t = trainer(tmp_path / "run", 90, [cb], prompts=2, weight_decay=0.1, learning_rate=1e-3,
                reward=lambda completions, **kw: [0.5] * len(completions))
    t.train()
    acc = cb.accelerator
    assert acc.converged and t.state.global_step < 90
    assert acc.decisions[-1][1].size == 0 and "flat" in acc.decisions[-1][1].reason
    assert t.state.global_step == acc.decisions[-1][0]  # stopped at that cycle end
    assert any(e.get("relex/converged") == 1 for e in t.state.log_history)


def test_refusals_and_errors_do_not_crash(tmp_path, caplog):
    with pytest.raises(RelexError, match="observe_until=50 is beyond max_steps=4"):
        trainer(tmp_path / "a", 4, [RelexCallback("stop", observe_until=50, targets=[80])]).train()
    cb = RelexCallback("accelerate", cycle=4, jump=4)
    t = trainer(tmp_path / "b", 2, [cb], prompts=2)
    t.args.fsdp, t.args.fsdp_config = ["full_shard"], {"version": 1}  # an FSDP1 launch
    with pytest.raises(RelexError, match="FSDP1 is not supported"):
        t.train()
    # two optimizer steps per generation (num_iterations=2): a 3-step cycle would jump mid-buffer
    t = trainer(tmp_path / "g", 4, [RelexCallback("accelerate", cycle=3, jump=4, every=1)],
                prompts=2, num_iterations=2)
    with pytest.raises(RelexError, match=r"multiples of the generation interval \(2"):
        t.train()
    # an error inside relex at jump time is logged, and training goes on to max_steps
    cb = RelexCallback("accelerate", cycle=2, jump=4, every=1)
    t = trainer(tmp_path / "c", 5, [cb], prompts=2)
    with caplog.at_level(logging.ERROR, logger="relex.loop.accelerator"):
        cb.on_train_begin(t.args, t.state, t.control, model=t.model)
        cb.accelerator.store.base["lm_head.weight"] = torch.zeros(3, 3)  # a wrong shape
        cb.on_train_begin = lambda *a, **k: None
        t.train()
    assert "no jump at real step 2: RuntimeError" in caplog.text and t.state.global_step == 5
    assert [s for s, _ in cb.accelerator.skipped] == [2] and cb.accelerator.jumps[0].real_step == 4


def test_forecast_and_stop_modes(tmp_path):
    fc = RelexCallback("forecast")
    t = trainer(tmp_path / "f", 6, [fc], prompts=2, save_strategy="steps", save_steps=2)
    t.train()
    assert [f["step"] for f in fc.forecasts] == [4, 6]  # from two checkpoints on
    f = fc.forecasts[-1]
    assert 0 < f["relex/explained_variance"] <= 1 and f["relex/verified_horizon"] >= 1
    assert any("relex/verified_up_to_step" in e for e in t.state.log_history)
    assert (tmp_path / "f" / "relex-forecast" / "report.html").is_file()

    st = RelexCallback("stop", observe_until=4, targets=[12])
    t = trainer(tmp_path / "s", 20, [st], prompts=2, save_strategy="steps", save_steps=2)
    t.train()
    assert t.state.global_step == 4, "stopped right after the observed window"
    out = tmp_path / "s" / "relex-extrapolated" / "step-12"
    model = LlamaForCausalLM.from_pretrained(out)
    assert A.accuracy(model, A.heldout(50)) >= 0  # loads and runs
    assert json.loads((out / "relex.json").read_text())


def test_stop_mode_failure_keeps_training_and_resume_keeps_base(tmp_path, caplog):
    st = RelexCallback("stop", observe_until=2, targets=[8], base=tmp_path / "no-such-base")
    t = trainer(tmp_path / "s", 4, [st], prompts=2, save_strategy="steps", save_steps=2)
    with caplog.at_level("ERROR", logger="relex.integrations.trl"):
        t.train()
    assert t.state.global_step == 4, "relex failed, so the run went on to max_steps"
    assert "wrote nothing" in caplog.text and st.written is None
    # resuming: the saved pre-RL base is reused, never overwritten by the resumed weights
    fc = RelexCallback("forecast")
    t = trainer(tmp_path / "r", 2, [fc], prompts=2, save_strategy="steps", save_steps=2)
    t.train()
    base = tmp_path / "r" / "relex-base" / "model.safetensors"
    before = base.read_bytes()
    t = trainer(tmp_path / "r", 4, [RelexCallback("forecast")], prompts=2,
                save_strategy="steps", save_steps=2)
    t.train(resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-2"))
    assert base.read_bytes() == before
    shutil.rmtree(tmp_path / "r" / "relex-base")
    t = trainer(tmp_path / "r", 6, [RelexCallback("forecast")], prompts=2,
                save_strategy="steps", save_steps=2)
    with pytest.raises(RelexError, match="resumed at step 4 .* pass base="):
        t.train(resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-4"))


def test_add_to_registers_ahead_of_reporting_callbacks(tmp_path):
    reporter = Recorder()  # stands in for W&B / TensorBoard, registered before relex
    t = trainer(tmp_path / "run", 2, [reporter], prompts=2)
    cb = RelexCallback(mode="accelerate", cycle=2, jump=2).add_to(t)
    order = t.callback_handler.callbacks
    assert order[0] is cb and order.index(cb) < order.index(reporter)


def measure(seed: int, jump: int | str, steps: int) -> dict:
    """Held-out accuracy after `steps` real steps, 32 prompts x 8 (jump < 0: plain TRL;
    a jump: cycle 20; "auto": jump="auto" at its default cycle), and every 10 steps
    (`curve`).

        python tests/test_trl.py SEED JUMP STEPS     # one JSON line"""
    torch.set_num_threads(1)
    cbs = [RelexCallback("accelerate", jump="auto")] if jump == "auto" else \
        [RelexCallback("accelerate", cycle=20, jump=jump)] if jump >= 0 else []
    curve = {}

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % 10 == 0:
                curve[state.global_step] = A.accuracy(model, A.heldout())
                model.train()
    cbs.append(Curve())
    t = trainer(Path(f"/tmp/relex-trl-{seed}-{jump}"), steps, cbs, prompts=32, seed=seed)
    t.train()
    out = {"seed": seed, "jump": jump, "steps": steps,
           "accuracy": A.accuracy(t.model, A.heldout()), "curve": curve}
    if len(cbs) > 1:
        out["jumps"] = [j.as_dict() for j in cbs[0].accelerator.jumps]
    return out


if __name__ == "__main__":
    jump = sys.argv[2] if sys.argv[2] == "auto" else int(sys.argv[2])
    print(json.dumps(measure(int(sys.argv[1]), jump, int(sys.argv[3]))))
