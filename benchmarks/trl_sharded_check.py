"""RelexCallback(mode="accelerate") in trl.GRPOTrainer under FSDP2 or DeepSpeed, on GPUs.

    accelerate launch --num_processes N --use_fsdp --fsdp_version 2 \\
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP benchmarks/trl_sharded_check.py OUT
    accelerate launch --num_processes N --use_deepspeed --zero_stage 3 --mixed_precision bf16 \\
        benchmarks/trl_sharded_check.py OUT

accelerate enables neither FSDP nor DeepSpeed on a CPU, so this path runs only here
(benchmarks/gpu_check.sh loop); the CPU suite covers the same sharded jumps with plain torch
FSDP2 and deepspeed.initialize (tests/test_accelerate_sharded.py). The demo's model and task
(tests/test_trl.py's tokenizer, data and reward), 24 steps, cycle 6 / every 2 / jump 12. Passes
when the callback found the sharded layout, jumped at step 6 (virtual step 18), and was never
disabled. It has not run on the machines this project is built on (no GPU).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_trl import trainer  # noqa: E402  (the demo's tokenizer, data and reward for TRL)

from relex.integrations.trl import RelexCallback  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-check/trl")
cb = RelexCallback(mode="accelerate", cycle=6, every=2, jump=12, guard_steps=2)
import torch  # noqa: E402

gpu = torch.cuda.is_available()
t = trainer(out, 24, [], use_cpu=not gpu, bf16=gpu)
cb.add_to(t)
t.train()
acc = cb.accelerator
result = {"layout": acc.layout.kind if acc else None, "disabled": acc.disabled if acc else None,
          "jumps": [j.as_dict() for j in acc.jumps] if acc else [],
          "skipped": acc.skipped if acc else []}
if t.accelerator.is_main_process:
    print(json.dumps(result, default=str))
ok = (acc is not None and acc.disabled is None and acc.layout.kind != "replicated"
      and acc.jumps and acc.jumps[0].real_step == 6 and acc.jumps[0].virtual_step == 18)
if t.accelerator.is_main_process:
    print("trl sharded check:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
