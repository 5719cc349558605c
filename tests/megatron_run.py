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
  embeddings, bf16), and its logits;
- OUT/adam/iter_NNNNNNN/: the Qwen2-like model in bf16 with TP=2 on two gloo processes, trained
  by Adam on fp32 master weights, saved at ADAM_STEPS as Megatron-LM saves a Float16Optimizer
  (megatron-core's own make_sharded_optimizer_tensor / optim_state_to_sharding_state: masters
  under optimizer.state.fp32_param.<key>, moments under optimizer.state.exp_avg*.<key>).

- OUT/distopt_tp2/, OUT/distopt_dp2/: the Qwen2-like model in bf16 (Megatron-LM's
  Float16Module) under megatron-core's own DistributedDataParallel and distributed optimizer
  (get_megatron_optimizer, Adam), TP=2 / DP=2 on two gloo processes, saved at ADAM_STEPS in
  Megatron-LM's default dp_reshardable layout (fp32 masters and moments in gradient buckets).
  The distributed optimizer needs more CPU stand-ins (`_distopt_cpu`).

    python tests/megatron_run.py --load CKPT OUT.pt
    python tests/megatron_run.py --load-distopt TP DP CKPT OUT.pt

loads CKPT (a checkpoint of the adam run) into that model and optimizer with TP=2 the way
Megatron-LM resumes (dist_checkpointing.load, then the optimizer's load_state_dict) and saves
each rank's loaded weights, masters, moments and Megatron's logits to OUT.pt; --load-distopt
does the same for a distributed-optimizer checkpoint (each rank: every parameter it owns a
part of, with its global position, weight, master and moments).
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
ADAM_STEPS = (0, 2, 4, 6, 8)
VOCAB, PADDED = 100, 128
FAMILIES = {
    "qwen2": dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  kv_channels=8, ffn_hidden_size=48, add_qkv_bias=True, qk_layernorm=False,
                  tied=False, dtype=torch.float32),
    "adam": dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                 kv_channels=8, ffn_hidden_size=48, add_qkv_bias=True, qk_layernorm=False,
                 tied=False, dtype=torch.bfloat16),
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


def _adam(model, rank: int):
    """fp32 masters of the bf16 model's parameters and an Adam over them (what Megatron's
    Float16OptimizerWithFloat16Params keeps; its class needs CUDA, its checkpoint layout is
    built below with megatron-core's own functions)."""
    params = list(model.parameters())
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    return params, masters, torch.optim.Adam(masters, lr=1e-2)


def _adam_state(model, params, masters, adam, step: int, rank: int) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )
    state = _state(model, "adam", step, rank)
    ids = get_param_id_to_sharded_param_map(state["model"], params)
    optim = adam.state_dict()
    steps = {float(s["step"]) for s in optim["state"].values()}
    optim_state_to_sharding_state(optim, ids, exclude_keys=("step",))
    if steps:  # one step for all parameters, saved once (MegatronOptimizer's common_step)
        optim["state"]["common_step"] = torch.tensor(steps.pop())
    state["optimizer"] = {"optimizer": optim, "fp32_from_fp16_params": [[
        make_sharded_optimizer_tensor(ids[i], m, prefix="optimizer.state.fp32_param")
        for i, m in enumerate(masters)]]}
    return state


def _adam_run(model, root: Path, rank: int) -> None:
    """Adam pulls each master towards its own random target (a real optimizer trajectory:
    Adam's moments and steps); the bf16 weights are the masters rounded, as after each
    Megatron step."""
    from megatron.core import dist_checkpointing
    params, masters, adam = _adam(model, rank)
    gen = torch.Generator().manual_seed(2)
    goals = [m.detach() + 0.3 * torch.randn(m.shape, generator=gen) for m in masters]
    for step in range(ADAM_STEPS[-1] + 1):
        if step:
            adam.zero_grad()
            sum(((m - g) ** 2).sum() for m, g in zip(masters, goals)).backward()
            adam.step()
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
        if step in ADAM_STEPS:
            d = root / f"iter_{step:07d}"
            d.mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(_adam_state(model, params, masters, adam, step, rank),
                                    str(d), async_sharded_save=False)
            if rank == 0:
                (root / "latest_checkpointed_iteration.txt").write_text(str(step))


def _adam_load(model, ckpt: Path, out: Path, rank: int) -> None:
    """Resume as Megatron-LM does: the sharded state of model and optimizer (the optimizer's
    state initialised first), dist_checkpointing.load, load_state_dict of both."""
    from megatron.core import dist_checkpointing
    params, masters, adam = _adam(model, rank)
    for m in masters:  # Adam's state exists before loading (Megatron's init_state_fn)
        m.grad = torch.zeros_like(m)
    adam.step()
    loaded = dist_checkpointing.load(_adam_state(model, params, masters, adam, 0, rank),
                                     str(ckpt))
    model.load_state_dict(loaded["model"])
    fp32 = loaded["optimizer"]["fp32_from_fp16_params"][0]
    optim = loaded["optimizer"]["optimizer"]
    step = optim["state"].pop("common_step")
    for state in optim["state"].values():
        state["step"] = step.clone()
    adam.load_state_dict(optim)
    with torch.no_grad():
        for m, saved in zip(masters, fp32):
            m.copy_(saved)
    names = [n for n, _ in model.named_parameters()]
    moments = {k: [adam.state[m][k] for m in masters] for k in ("exp_avg", "exp_avg_sq")}
    torch.save({"names": names, "weights": [p.detach().clone() for p in params],
                "masters": [m.detach().clone() for m in masters], **moments,
                "step": float(step), "logits": _logits(model)}, f"{out}.rank{rank}")


def _distopt_cpu() -> None:
    """What megatron-core's distributed optimizer needs on CPU besides _cpu_only: its
    dtype checks read `param.type()` ('torch.cuda.BFloat16Tensor'), and it makes a few
    tensors with device='cuda' (found_inf, the loss scale)."""
    plain_type = torch.Tensor.type

    def cuda_type(self, *a, **k):
        name = plain_type(self, *a, **k)
        if a or k or not isinstance(name, str) or ".cuda." in name:
            return name
        return name.replace("torch.", "torch.cuda.", 1)
    torch.Tensor.type = cuda_type
    for name in ("tensor", "zeros", "ones", "empty", "full"):
        make = getattr(torch, name)

        def on_cpu(*a, make=make, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return make(*a, **k)
        setattr(torch, name, on_cpu)
    torch.Tensor.cuda = lambda self, *a, **k: self


def _distopt(tp: int):
    """The adam model as Megatron-LM trains it with --use-distributed-optimizer --bf16:
    Float16Module, DDP with fp32 gradient reduction, get_megatron_optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    gpt = _model("adam")
    cfg = gpt.config
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), Float16Module(cfg, gpt))
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, bf16=True, params_dtype=torch.bfloat16,
        use_distributed_optimizer=True), [ddp])
    return gpt, ddp, opt


def _distopt_state(gpt, opt, step: int, rank: int, loading: bool = False) -> dict:
    state = _state(gpt, "adam", step, rank)
    meta = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}
    state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=loading,
                                                metadata=meta)
    return state


def _distopt_run(root: Path, rank: int, tp: int) -> None:
    """Adam steps on gradients written into the DDP buffers (a fixed direction plus noise,
    the same on every rank, as after an all-reduce), saved at ADAM_STEPS."""
    from megatron.core import dist_checkpointing
    gpt, ddp, opt = _distopt(tp)
    gen = torch.Generator().manual_seed(3)
    params = list(ddp.module.parameters())
    direction = [torch.randn(p.shape, generator=gen) for p in params]
    for step in range(ADAM_STEPS[-1] + 1):
        if step:
            ddp.zero_grad_buffer()
            opt.zero_grad()
            for p, d in zip(params, direction):
                p.main_grad.copy_(d + 0.3 * torch.randn(p.shape, generator=gen))
            opt.step()
            ddp.start_param_sync(force_sync=True)
        if step in ADAM_STEPS:
            d = root / f"iter_{step:07d}"
            d.mkdir(parents=True, exist_ok=True)
            state = _distopt_state(gpt, opt, step, rank) if step else {  # no state yet
                "model": gpt.sharded_state_dict()}
            dist_checkpointing.save(state, str(d), async_sharded_save=False)
            if rank == 0:
                (root / "latest_checkpointed_iteration.txt").write_text(str(step))


def _distopt_load(ckpt: Path, out: Path, rank: int, tp: int) -> None:
    """Resume as Megatron-LM does; per owned parameter: where it sits in the global stored
    tensor (its sharded state's key and offsets), the weight, and the loaded master/moments."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    gpt, ddp, opt = _distopt(tp)
    inner = opt.chained_optimizers[0]
    inner._init_optimizer_states_with_dummy_values()  # torch Adam: no state before a step
    loaded = dist_checkpointing.load(_distopt_state(gpt, opt, 0, rank, loading=True), str(ckpt))
    gpt.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    where = {}
    for v in gpt.sharded_state_dict().values():
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)):
            offsets = getattr(v, "global_offset", None)
            where[id(v.data)] = (v.key, offsets, isinstance(v, ShardedTensorFactory))
    owned = {}
    for name, p in gpt.named_parameters():
        try:
            span = inner._get_model_param_range_map(p)["param"]
        except KeyError:  # no part of it on this data-parallel rank
            continue
        state = inner._get_main_param_and_optimizer_states(p)
        owned[name] = {"where": where[id(p)], "shape": tuple(p.shape),
                       "range": (span.start, span.end), "weight": p.detach().clone(),
                       **{k: state[k].detach().clone() for k in ("param", "exp_avg",
                                                                   "exp_avg_sq")}}
    from megatron.core import parallel_state
    torch.save({"owned": owned, "logits": _logits(gpt),
                "tp_rank": parallel_state.get_tensor_model_parallel_rank()}, f"{out}.rank{rank}")


def _worker(rank: int, world: int, out: str, job: str) -> None:
    import torch.distributed as dist
    _cpu_only()
    torch.set_num_threads(1)
    out = Path(out)
    init = f"file://{out}/pg-{job}" if out.is_dir() else f"file://{out}.pg"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    tp = world
    if job.startswith("distopt") or job.startswith("load-distopt"):
        _distopt_cpu()
        tp = int(job.split(":")[1]) if ":" in job else 1 if job.endswith("dp2") else world
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        if job == "qwen2":
            _trajectory(_model("qwen2"), out / "qwen2")
        elif job == "adam":
            _adam_run(_model("adam"), out / "adam", rank)
        elif job.startswith("load:"):
            _adam_load(_model("adam"), Path(job[5:]), out, rank)
        elif job.startswith("distopt"):
            _distopt_run(out / job, rank, tp)
        elif job.startswith("load-distopt:"):
            _distopt_load(Path(job.split(":", 2)[2]), out, rank, tp)
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
    if sys.argv[1] == "--load":
        out, jobs = Path(sys.argv[3]), ((f"load:{Path(sys.argv[2]).resolve()}", 2),)
    elif sys.argv[1] == "--load-distopt":
        tp, dp, ckpt = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]).resolve()
        out, jobs = Path(sys.argv[5]), ((f"load-distopt:{tp}:{ckpt}", tp * dp),)
    else:
        out, jobs = Path(sys.argv[1]), (("qwen2", 1), ("qwen2_tp2", 2), ("qwen3", 1), ("adam", 2),
                                        ("distopt_tp2", 2), ("distopt_dp2", 2))
        out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _cpu_only()
    import megatron.core.models.gpt.gpt_model  # noqa: F401 - imported once, before the forks
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    # the writer's result queue lives in a spawned manager process: start it once, here
    filesystem_async._get_write_results_queue()
    for job, world in jobs:
        torch.multiprocessing.start_processes(_worker, args=(world, str(out), job),
                                              nprocs=world, join=True, start_method="fork")


if __name__ == "__main__":
    main()
