"""relex's verl trainer mode end to end, on a GPU machine with verl 0.9 and vLLM installed.

    python benchmarks/verl_check.py [--out out/gpu-check/verl] [--steps 14]

Needs no network: it builds a tiny Qwen2-shaped model with a character tokenizer and an
addition task (parquet in verl's RL format, an exact-match reward function) under --out, then
runs `python -m verl.trainer.main_ppo` with GRPO, an FSDP2 actor, vLLM rollout on 1 GPU and
`trainer.v1.trainer_mode=relex` (cycle 6, every 2, jump 12). It passes when verl's console log
shows relex's jump at step 6 (relex/jumped 1, relex/virtual_step 18), relex never disabled, and
the run finished every step. It has not run on the machines this project is built on (no GPU);
benchmarks/gpu_check.sh verl calls it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

CHARS = list("0123456789+= ")
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """1 when the answer's first number is the sum, else 0."""
    import re
    got = re.findall(r"\\d+", solution_str)
    return float(bool(got) and got[0] == ground_truth)
'''


def build(out: Path) -> tuple[Path, Path, Path]:
    import pandas as pd
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    model_dir = out / "model"
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}={% endif %}")
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    rng = random.Random(0)
    for split, n in (("train", 512), ("val", 64)):
        rows = []
        for i in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            rows.append({"data_source": "relex_addition", "ability": "math",
                         "prompt": [{"role": "user", "content": f"{a}+{b}"}],
                         "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                         "extra_info": {"split": split, "index": i}})
        pd.DataFrame(rows).to_parquet(out / f"{split}.parquet")
    (out / "reward.py").write_text(REWARD)
    return model_dir, out / "train.parquet", out / "reward.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/gpu-check/verl")
    ap.add_argument("--steps", type=int, default=14)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, train, reward = build(out)
    overrides = [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={train}", f"data.val_files={out / 'val.parquet'}",
        "data.train_batch_size=32", "data.max_prompt_length=16", "data.max_response_length=8",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=32",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
        f"reward.custom_reward_function.path={reward}", "reward.num_workers=1",
        "trainer.use_v1=True", "trainer.v1.trainer_mode=relex",
        "+relex.cycle=6", "+relex.every=2", "+relex.jump=12",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1",
        f"trainer.total_training_steps={args.steps}", "trainer.total_epochs=100",
        "trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.val_before_train=False",
        "trainer.logger=[console]", "trainer.project_name=relex",
        "trainer.experiment_name=gpu-check",
    ]
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides]
    print(" ".join(cmd), flush=True)
    log = out / "verl.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    text = log.read_text(errors="replace")

    def metric(name: str) -> list[tuple[int, float]]:
        got = []
        for line in text.splitlines():
            step = re.search(r"step:(\d+)", line)
            value = re.search(re.escape(name) + r":([-\d.eE+]+)", line)
            if step and value:
                got.append((int(step.group(1)), float(value.group(1))))
        return got

    jumped = [s for s, v in metric("relex/jumped") if v == 1]
    virtual = dict(metric("relex/virtual_step"))
    disabled = [s for s, v in metric("relex/disabled") if v]
    scores = metric("critic/score/mean")
    result = {"returncode": rc, "jumped_at": jumped, "virtual_step_last": virtual.get(args.steps),
              "disabled_at": disabled, "score_first_last": [scores[0], scores[-1]] if scores
              else None, "log": str(log)}
    print(json.dumps(result))
    ok = rc == 0 and jumped[:1] == [6] and virtual.get(6) == 18 and not disabled
    print("verl check:", "PASS" if ok else "FAIL (see the log)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
