"""Write real Megatron-core torch_dist checkpoints on CPU for tests/test_format_megatron.py.

    python tests/megatron_run.py OUT

Run as its own process, so that megatron-core's global state and the three CPU stand-ins it
needs (docs/formats.md, Megatron: `torch.cuda.synchronize` a no-op, `torch.cuda.current_device`
"cpu", the model-parallel RNG tracker's fork a no-op) stay out of the test process. Writes:
- OUT/qwen2/iter_NNNNNNN/: a tiny Qwen2-like GPT (GQA 4 heads / 2 groups, q/k/v biases,
  SwiGLU, RMSNorm, RoPE, untied output layer, vocabulary padded from 100 to 128, fp32) along a
  rank-1 line plus noise, saved with TP=1 at STEPS the way Megatron-LM saves (args,
  iteration and an optimizer-state tensor beside the model), with
  latest_checkpointed_iteration.txt; OUT/qwen2/logits.pt: Megatron's own logits per step;
- OUT/qwen2_tp2/: the same checkpoints loaded with dist_checkpointing.load into a TP=2 model
  on two gloo processes and saved again;
- OUT/qwen3/iter_0000001/: a tiny Qwen3-like GPT (q/k layernorm, head_dim 16 != 32 / 4, tied
  embeddings, bf16), and its logits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

STEPS = (0, 10, 20, 30, 40)
VOCAB, PADDED = 100, 128
FAMILIES = {
    "qwen2": dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  kv_channels=8, ffn_hidden_size=48, add_qkv_bias=True, qk_layernorm=False,
                  tied=False, dtype=torch.float32),
    "qwen3": dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  kv_channels=16, ffn_hidden_size=40, add_qkv_bias=False, qk_layernorm=True,
                  tied=True, dtype=torch.bfloat16),
}
TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])


def _cpu_only() -> None:
    warnings.filterwarnings("ignore")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def _model(family: str):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    f = FAMILIES[family]
    cfg = TransformerConfig(
        num_layers=f["num_layers"], hidden_size=f["hidden_size"],
        num_attention_heads=f["num_attention_heads"], num_query_groups=f["num_query_groups"],
        kv_channels=f["kv_channels"], ffn_hidden_size=f["ffn_hidden_size"],
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=f["add_qkv_bias"], qk_layernorm=f["qk_layernorm"],
        use_cpu_initialization=True, params_dtype=f["dtype"], bf16=f["dtype"] == torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=f["qk_layernorm"])
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=PADDED,
                     max_sequence_length=64, position_embedding_type="rope",
                     rotary_base=10000, share_embeddings_and_output_weights=f["tied"])
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    return model.eval()


def _logits(model) -> torch.Tensor:
    n = TOKENS.shape[1]
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        out = model(TOKENS, torch.arange(n).view(1, n), attention_mask=mask)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(out)[..., :VOCAB].float()


def _state(model, family: str, step: int, rank: int) -> dict:
    """What Megatron-LM's save_checkpoint passes to dist_checkpointing.save: the model's
    sharded state, its args and iteration (common.pt) and optimizer state."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.enums import ModelType
    f = FAMILIES[family]
    args = argparse.Namespace(
        num_layers=f["num_layers"], hidden_size=f["hidden_size"],
        num_attention_heads=f["num_attention_heads"], group_query_attention=True,
        num_query_groups=f["num_query_groups"], kv_channels=f["kv_channels"],
        ffn_hidden_size=f["ffn_hidden_size"], padded_vocab_size=PADDED, num_experts=None,
        params_dtype=f["dtype"], model_type=ModelType.encoder_or_decoder, swiglu=True,
        untie_embeddings_and_output_weights=not f["tied"], ckpt_format="torch_dist")
    exp_avg = torch.full((4, 8), float(step))
    return {"args": args, "checkpoint_version": 3.0, "iteration": step,
            "model": model.sharded_state_dict(),
            "optimizer": {"state": ShardedTensor.from_rank_offsets(
                "optimizer.state.exp_avg.decoder.final_layernorm.weight", exp_avg,
                replica_id=rank)}}


def _save(model, family: str, root: Path, step: int, rank: int) -> None:
    from megatron.core import dist_checkpointing
    d = root / f"iter_{step:07d}"
    d.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_state(model, family, step, rank), str(d),
                            async_sharded_save=False)
    if rank == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(step))


def _trajectory(model, root: Path) -> None:
    """theta_0 + (step / 40) * direction + noise, per parameter; logits at every step."""
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    base = {k: v.detach().clone() for k, v in params.items()}
    direction = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    logits = {}
    for step in STEPS:
        with torch.no_grad():
            for k, p in params.items():
                noise = 0.002 * torch.randn(p.shape, generator=gen) if step else 0
                p.copy_(base[k] + step / 40 * direction[k] + noise)
        _save(model, "qwen2", root, step, 0)
        logits[step] = _logits(model)
    torch.save(logits, root / "logits.pt")


def _worker(rank: int, world: int, out: str, job: str) -> None:
    import torch.distributed as dist
    _cpu_only()
    torch.set_num_threads(1)
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out}/pg-{job}", rank=rank,
                            world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        if job == "qwen2":
            _trajectory(_model("qwen2"), out / "qwen2")
        elif job == "qwen2_tp2":
            model = _model("qwen2")
            for step in STEPS:
                src = out / "qwen2" / f"iter_{step:07d}"
                loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                                 str(src))
                model.load_state_dict(loaded["model"])
                _save(model, "qwen2", out / job, step, rank)
        else:
            model = _model("qwen3")
            with torch.no_grad():  # norms away from 1, so that a wrong mapping shows
                for name, p in model.named_parameters():
                    if "layernorm" in name:
                        p.copy_(1 + 0.3 * torch.randn(p.shape))
            _save(model, "qwen3", out / "qwen3", 1, 0)
            torch.save({1: _logits(model)}, out / "qwen3" / "logits.pt")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _cpu_only()
    import megatron.core.models.gpt.gpt_model  # noqa: F401 - imported once, before the forks
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    # the writer's result queue lives in a spawned manager process: start it once, here
    filesystem_async._get_write_results_queue()
    for job, world in (("qwen2", 1), ("qwen2_tp2", 2), ("qwen3", 1)):
        torch.multiprocessing.start_processes(_worker, args=(world, str(out), job),
                                              nprocs=world, join=True, start_method="fork")


if __name__ == "__main__":
    main()
