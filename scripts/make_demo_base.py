"""Regenerate the demo's base model (src/relex/data/demo-base) deterministically.

    python scripts/make_demo_base.py [--steps 1500] [--out src/relex/data/demo-base]

Supervised next-token training of a 2-layer Llama on 3-digit addition where 60% of the targets
are the carry-less answer and 40% the correct one (batch 128, AdamW lr 1e-3, single thread so the
result is the same on every machine). At the loss plateau the greedy answer is mostly
carry-less, with ~0.3 exact-match accuracy: a "pretrained" policy that RL can improve by
selecting the right mode. Takes ~2 minutes on one CPU core.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from relex.demo import arithmetic as A

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--carryless", type=float, default=0.6, help="share of carry-less targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE.parent / "src/relex/demo/data/demo-base")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = LlamaForCausalLM(A.config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    test = A.heldout()
    start = time.time()
    for step in range(1, args.steps + 1):
        probs = A.Problems.sample(128, gen)
        wrong = torch.rand(128, generator=gen) < args.carryless
        target = torch.where(wrong[:, None], probs.carryless(), probs.answers())
        ids = torch.cat([probs.prompts(), target], dim=1)
        logits = model(input_ids=ids[:, :-1]).logits[:, A.PROMPT_LEN - 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, A.VOCAB_SIZE),
                                                 target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps:
            model.eval()
            acc = A.accuracy(model, test)
            carry = (A.generate(model, test.prompts()) == test.carryless()).all(1).float().mean()
            model.train()
            print(f"step {step}: loss {loss.item():.4f}, held-out accuracy {acc:.3f}, "
                  f"carry-less answers {carry:.3f} ({time.time() - start:.0f} s)", flush=True)
    model.save_pretrained(args.out)
    recipe = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
