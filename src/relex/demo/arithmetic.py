"""The demo's verifiable task: 3-digit addition, answered with exactly 4 digits.

"123+456=" -> "0579". The reward is exact match of the 4 answer digits, so grading needs no
parser. The demo's base model is pre-trained on a mixture where most targets are the carry-less
("digit-wise mod 10") answer: RL then has to select the right mode the base already contains,
which is what RLVR mostly does to LLMs, and the regime where the trajectory is close to linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DIGITS = "0123456789"
PLUS, EQUALS, BOS = 10, 11, 12
VOCAB_SIZE = 13
PROMPT_LEN = 9  # bos d d d + d d d =
ANSWER_LEN = 4


@dataclass(frozen=True)
class Problems:
    """A batch of problems: a, b (int64 tensors of shape [n]) in [0, 999]."""

    a: torch.Tensor
    b: torch.Tensor

    def __len__(self) -> int:
        return len(self.a)

    @classmethod
    def sample(cls, n: int, generator: torch.Generator) -> Problems:
        return cls(torch.randint(0, 1000, (n,), generator=generator),
                   torch.randint(0, 1000, (n,), generator=generator))

    def prompts(self) -> torch.Tensor:
        """[n, 9] token ids: bos, the digits of a, '+', the digits of b, '='."""
        n = len(self)
        return torch.cat([torch.full((n, 1), BOS), digits(self.a, 3), torch.full((n, 1), PLUS),
                          digits(self.b, 3), torch.full((n, 1), EQUALS)], dim=1)

    def answers(self) -> torch.Tensor:
        """[n, 4] digit tokens of a + b, zero-padded."""
        return digits(self.a + self.b, ANSWER_LEN)

    def carryless(self) -> torch.Tensor:
        """[n, 4] digits of the digit-wise sum mod 10 (the base model's favourite mistake)."""
        return torch.cat([torch.zeros(len(self), 1, dtype=torch.long),
                          (digits(self.a, 3) + digits(self.b, 3)) % 10], dim=1)


def digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """[n] non-negative ints -> [n, width] most-significant-first digit tokens."""
    powers = 10 ** torch.arange(width - 1, -1, -1)
    return (x[:, None] // powers) % 10


def heldout(n: int = 500, seed: int = 1234) -> Problems:
    """The fixed evaluation set (same for every run and checkpoint)."""
    return Problems.sample(n, torch.Generator().manual_seed(seed))


def reward(completions: torch.Tensor, problems: Problems) -> torch.Tensor:
    """1.0 where the 4 generated tokens are exactly the answer, else 0.0 ([n] float)."""
    return (completions == problems.answers()).all(dim=1).float()


@torch.no_grad()
def generate(model, prompts: torch.Tensor, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, 4] completion tokens; greedy when temperature is 0. Uses the KV cache."""
    out = model(input_ids=prompts, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    tokens = []
    for i in range(ANSWER_LEN):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator)
        else:
            tok = logits.argmax(dim=-1, keepdim=True)
        tokens.append(tok)
        if i + 1 < ANSWER_LEN:
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(tokens, dim=1)


def accuracy(model, problems: Problems) -> float:
    """Greedy exact-match accuracy (pass@1) on a problem set."""
    model.eval()
    return reward(generate(model, problems.prompts()), problems).mean().item()


def config(**overrides):
    """The demo model: a 2-layer Llama, hidden 128, 4 heads, MLP 512, untied head (0.4M params)."""
    from transformers import LlamaConfig
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=512,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=PROMPT_LEN + ANSWER_LEN, tie_word_embeddings=False,
              bos_token_id=BOS, eos_token_id=EQUALS, pad_token_id=EQUALS)
    kw.update(overrides)
    return LlamaConfig(**kw)


# ---------------------------------------------------------------------- as an eval task
#: the task's held-out test set (as in `relex demo`) and a disjoint dev set: name -> seed
DATASETS = {"arithmetic": 1234, "arithmetic-dev": 4321}


def dataset_problems(name: str) -> list[tuple[str, str, dict]]:
    """The 500 problems of DATASETS[name] as (question, answer, row) records."""
    probs = heldout(500, seed=DATASETS[name])
    answers = ["".join(map(str, row)) for row in probs.answers().tolist()]
    return [(f"{a:03d}+{b:03d}=", ans, {"a": a, "b": b}) for a, b, ans in
            zip(probs.a.tolist(), probs.b.tolist(), answers)]


def grade(response: str, gold: str) -> tuple[str | None, bool]:
    """(the first 4 digits of the response, whether they are the answer): exact match."""
    digits = "".join(c for c in response if c.isdigit())[:4] or None
    return digits, digits == gold


class Generator:
    """The demo's 13-token models: token prompts, 4 generated digits, no tokenizer files."""

    def __init__(self, model_dir: Path, template: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.model.eval()

    def prompt(self, question: str) -> str:
        return question

    def generate(self, prompts, n, temperature, max_tokens, seed):
        a = torch.tensor([int(p[:3]) for p in prompts]).repeat_interleave(n)
        b = torch.tensor([int(p[4:7]) for p in prompts]).repeat_interleave(n)
        gen = torch.Generator().manual_seed(seed)
        tokens = generate(self.model, Problems(a, b).prompts(), temperature, gen)
        texts = ["".join(map(str, row)) for row in tokens.tolist()]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
