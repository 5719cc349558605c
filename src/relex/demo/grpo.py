"""A small, readable GRPO loop for the demo's arithmetic task (CPU, one thread, deterministic).

Each step samples `group` completions for each of `prompts` problems at temperature 1, scores
them with the exact-match reward, normalises rewards within each group (the GRPO advantage),
and takes one on-policy policy-gradient step (so PPO's ratio is 1 and clipping never acts; no
KL term). Checkpoints are written with save_pretrained every `save_every` steps as
out/checkpoint-N, the layout TRL writes, which is what relex reads; with save_state they also
keep what a trainer resumes from (optimizer.pt, rng_state.pth, trainer_state.json), and
resume_from continues a run from such a checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from relex.demo import arithmetic as A


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 300
    prompts: int = 32
    group: int = 8
    lr: float = 1e-5
    temperature: float = 1.0
    save_every: int = 2
    eval_every: int = 10
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + 1e-4); 0 where a group is all equal."""
    r = rewards.view(-1, group)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.view(-1)


def train(model, out: Path, cfg: GRPOConfig, on_step: Callable[[dict], None] | None = None,
          keep: set[int] | None = None,
          after_optimizer_step: Callable[[int, float, torch.optim.Optimizer], object] | None = None,
          save_state: bool = False, resume_from: Path | None = None,
          resume_optimizer: bool = True) -> list[dict]:
    """Run GRPO on `model` in place; returns one log row per step (reward, held-out accuracy
    every eval_every steps, seconds). Checkpoints: the steps in `keep`, else every save_every.

    after_optimizer_step(step, mean_reward, optimizer) runs right after each optimizer step,
    before checkpointing and evaluation: the hook where relex.loop.accelerator.Accelerator.step
    jumps the weights in place (its return value, e.g. a Jump, goes into the row as "jump").

    save_state: each checkpoint also holds what a trainer resumes from, as transformers'
    Trainer keeps it: optimizer.pt (Adam's state dict), rng_state.pth (the sampling generator's
    and torch's RNG states) and trainer_state.json (global_step). resume_from: such a
    checkpoint directory: its model.safetensors is loaded into `model`, Adam's state from its
    optimizer.pt (a new Adam with resume_optimizer=False), the RNG states, and training goes on
    from global_step + 1 to cfg.steps. The learning rate is constant (no schedule)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    first = 1
    if resume_from is not None:
        from safetensors.torch import load_file
        resume_from = Path(resume_from)
        model.load_state_dict(load_file(resume_from / "model.safetensors"))
        if resume_optimizer:
            opt.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=True))
        rng = torch.load(resume_from / "rng_state.pth", weights_only=True)
        gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        first = json.loads((resume_from / "trainer_state.json").read_text())["global_step"] + 1
    test = A.heldout()
    log = []
    for step in range(first, cfg.steps + 1):
        start = time.perf_counter()
        problems = A.Problems.sample(cfg.prompts, gen)
        repeated = A.Problems(problems.a.repeat_interleave(cfg.group),
                              problems.b.repeat_interleave(cfg.group))
        prompts = repeated.prompts()
        model.eval()
        completions = A.generate(model, prompts, cfg.temperature, gen)
        rewards = A.reward(completions, repeated)
        adv = advantages(rewards, cfg.group)
        model.train()
        ids = torch.cat([prompts, completions], dim=1)
        logits = model(input_ids=ids[:, :-1]).logits[:, A.PROMPT_LEN - 1:].float()
        logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
        token_logp = logp.gather(-1, completions[..., None]).squeeze(-1)  # [n, 4]
        loss = -(adv[:, None] * token_logp).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"step": step, "reward": rewards.mean().item(), "loss": loss.item()}
        if after_optimizer_step is not None:
            event = after_optimizer_step(step, row["reward"], opt)
            if event is not None:
                row["jump"] = event
        row["seconds"] = time.perf_counter() - start
        if (step in keep) if keep is not None else step % cfg.save_every == 0:
            model.save_pretrained(out / f"checkpoint-{step}")
            if save_state:
                d = out / f"checkpoint-{step}"
                torch.save(opt.state_dict(), d / "optimizer.pt")
                torch.save({"generator": gen.get_state(), "torch": torch.get_rng_state()},
                           d / "rng_state.pth")
                (d / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["accuracy"] = A.accuracy(model, test)
        log.append(row)
        if on_step:
            on_step(row)
    return log
