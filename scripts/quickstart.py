"""Quickstart: a synthetic RLVR-like run, extrapolated by relex and checked against the truth.

    make demo          (or: python scripts/quickstart.py [--out out/quickstart])

Builds a small Qwen2 model locally from a transformers config (no download), writes 20 TRL-style
checkpoints (checkpoint-5 ... checkpoint-100) whose weights drift along a rank-1 direction
linearly in the step plus noise, then runs `relex extrapolate` on the first 30 steps only and
compares the predicted step-100 model with the real checkpoint-100. The trajectory is synthetic;
`relex demo` (a real GRPO run on a laptop CPU) replaces this script once it lands.
"""

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from relex.cli import main as relex_cli


def make_run(root: Path, steps: list[int]) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    base = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for step in steps:
        ckpt = {}
        for k, v in base.items():
            scale = v.float().std().clamp_min(1e-2)
            drift = 2e-4 * step * direction[k]
            noise = 3e-4 * math.sqrt(step) * torch.randn(v.shape, generator=g)
            ckpt[k] = (v.float() + scale * (drift + noise)).contiguous()  # fp32, like TRL
        out = root / "run" / f"checkpoint-{step}"
        out.mkdir(parents=True)
        save_file(ckpt, str(out / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(root / "base" / "config.json", out / "config.json")


def compare(pred_dir: Path, real_dir: Path, base_dir: Path) -> None:
    pred, real = load_file(str(pred_dir / "model.safetensors")), load_file(
        str(real_dir / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    dp = torch.cat([(pred[k].double() - base[k].double()).ravel() for k in base])
    dr = torch.cat([(real[k].double() - base[k].double()).ravel() for k in base])
    cos = torch.nn.functional.cosine_similarity(dp, dr, dim=0).item()
    rel = ((dp - dr).norm() / dr.norm()).item()
    print(f"\npredicted step-100 vs real checkpoint-100 (whole model, deltas from the base):")
    print(f"  cosine {cos:.4f}, relative error {rel:.3f} (the real checkpoint carries noise the "
          f"rank-1 projection removes)")
    model = AutoModelForCausalLM.from_pretrained(pred_dir)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    print(f"  loads in transformers: {type(model).__name__}, {model.dtype}, logits "
          f"{tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/quickstart"))
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    steps = list(range(5, 101, 5))
    make_run(args.out, steps)
    print(f"wrote base + {len(steps)} checkpoints to {args.out}/run; relex observes steps <= 30")
    cmd = ["extrapolate", str(args.out / "run"), "--base", str(args.out / "base"),
           "--observe-until", "30", "--target", "60", "--target", "100",
           "--output", str(args.out / "extrapolated")]
    print("$ relex " + " ".join(cmd))
    code = relex_cli(cmd)
    if code:
        return code
    compare(args.out / "extrapolated" / "step-100", args.out / "run" / "checkpoint-100",
            args.out / "base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
