"""Where this rank's trainable weights are, and how to write them in place.

The in-loop Accelerator fits and writes each rank's own part of the weights the optimizer
trains, never a gathered copy. Three layouts, found from the model (and optimizer) the user
already has:

- replicated (one process, DDP): every rank holds whole parameters; a rank's Gram matrix is the
  whole Gram matrix.
- FSDP2 (`torch.distributed.fsdp.fully_shard`): DTensor parameters sharded on dim 0 (HSDP:
  replicated on an outer mesh dimension). A rank's part is `to_local()`, which excludes FSDP2's
  padding; uneven and empty shards are ordinary local tensors. After a forward without backward
  the modules built with `reshard_after_forward=False` (accelerate's root and tail) hold
  unsharded copies that the next forward would reuse, so `prepare()` reshards every FSDP module
  before the shards are read or written; the next forward then all-gathers the new values.
- DeepSpeed ZeRO-1/2/3: the optimizer keeps fp32 master partitions; the module holds 16-bit
  copies that the next step overwrites from the masters. A rank's part is its master fragment
  (ZeRO-1/2: `param._hp_mapping.hp_fragment`; ZeRO-3: `safe_get_local_fp32_param`, padding past
  `ds_numel` masked). `refresh()` then remakes the 16-bit weights the forward and a rollout
  engine read: ZeRO-1/2 `update_lp_params()`, ZeRO-3 all parameters partitioned, the 16-bit
  partitions remade from the fp32 ones and the persistent parameters re-gathered (the order of
  DeepSpeed's own `step`).

Summing the local Gram matrices over the ranks gives the whole Gram matrix, divided by the
number of ranks holding each element (`Part.replicas`, HSDP). FSDP1 and tensor / pipeline
parallel layouts are refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from relex.errors import RelexError


@dataclass
class Part:
    """One trainable parameter's elements on this rank.

    tensor: a 1-D view of them, written in place (fp32 masters under FSDP2 / DeepSpeed; it may
    live on a GPU); flush: pushes `tensor` into its owner where `tensor` is a copy (ZeRO-3 with
    an offloaded optimizer), else None; replicas: ranks holding the same elements."""

    name: str
    shape: tuple[int, ...]
    tensor: torch.Tensor
    flush: Callable[[], None] | None = None
    replicas: int = 1


class Replicated:
    """Whole parameters on every rank: one process or DDP."""

    kind = "replicated"
    sharded = False

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def parts(self) -> list[Part]:
        out = []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                if not p.is_contiguous():
                    raise RelexError(f"parameter {name} is not contiguous; relex writes "
                                     f"parameters in place (call .contiguous() before "
                                     f"creating the optimizer)")
                out.append(Part(name, tuple(p.shape), p.detach().view(-1)))
        return out

    def prepare(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def clear_optimizer_state(self, optimizer) -> None:
        if optimizer is not None:
            optimizer.state.clear()


class FSDP2(Replicated):
    """`fully_shard` DTensor parameters; see the module docstring."""

    kind = "fsdp2"
    sharded = True

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        from torch.distributed.fsdp import FSDPModule
        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.prepare()
        self.parts()  # refuses layouts relex cannot write

    def prepare(self) -> None:
        for m in self.modules:
            m.reshard()

    def parts(self) -> list[Part]:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Replicate, Shard
        world = dist.get_world_size() if dist.is_initialized() else 1
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise RelexError(f"parameter {name} is not sharded by fully_shard (a plain "
                                 f"tensor in an FSDP2 model); shard every trainable module or "
                                 f"freeze it")
            shards = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            if (len(shards) != 1 or p.placements[shards[0]].dim != 0 or type(
                    p.placements[shards[0]]) is not Shard or not all(
                    isinstance(pl, (Shard, Replicate)) for pl in p.placements)):
                raise RelexError(f"parameter {name} has placements {_short(p.placements)}: "
                                 f"relex jumps FSDP2's dim-0 shards (HSDP included); tensor "
                                 f"parallel layouts are not supported")
            if p.device_mesh.size() != world:
                raise RelexError(f"parameter {name} lives on a device mesh of "
                                 f"{p.device_mesh.size()} of {world} ranks (pipeline or "
                                 f"context parallel?); relex needs the FSDP mesh to span "
                                 f"every rank")
            local = p.to_local()
            if not local.is_contiguous():
                raise RelexError(f"parameter {name}: its local shard is not contiguous")
            replicas = p.device_mesh.size() // p.device_mesh.size(shards[0])
            out.append(Part(name, tuple(p.shape), local.detach().view(-1), replicas=replicas))
        return out


class DeepSpeed(Replicated):
    """DeepSpeed ZeRO-1/2/3 fp32 master partitions; see the module docstring."""

    sharded = True

    def __init__(self, module: torch.nn.Module, optimizer=None):
        super().__init__(module)
        self.stage3 = any(hasattr(p, "ds_id") for p in module.parameters())
        self.kind = "deepspeed-zero3" if self.stage3 else "deepspeed-zero1/2"
        self.optimizer = optimizer
        if self.stage3 and optimizer is None:
            self.optimizer = next((getattr(p, "_z3_optimizer") for p in module.parameters()
                                   if hasattr(p, "_z3_optimizer")), None)
        if self.stage3 and self.optimizer is None:
            raise RelexError("DeepSpeed ZeRO-3 model without its optimizer: give the "
                             "Accelerator the DeepSpeed engine (deepspeed.initialize's first "
                             "result) after deepspeed.initialize")

    def use(self, optimizer) -> None:
        """The DeepSpeed optimizer, found inside whatever the training loop passed."""
        found = zero_optimizer(optimizer)
        if found is not None:
            self.optimizer = found

    def parts(self) -> list[Part]:
        if self.stage3:
            return self._stage3_parts()
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if not hasattr(p, "_hp_mapping"):
                raise RelexError(f"parameter {name} has no DeepSpeed fp32 master (created "
                                 f"after deepspeed.initialize?); create the Accelerator after "
                                 f"deepspeed.initialize")
            mapping = p._hp_mapping
            tensor = (mapping.hp_fragment.detach().view(-1) if mapping is not None
                      else torch.empty(0, dtype=torch.float32))
            out.append(Part(name, tuple(p.shape), tensor))
        return out

    def _stage3_parts(self) -> list[Part]:
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
        rank = dist.get_rank(group=self.optimizer.dp_process_group)
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            full, flush = self._stage3_fp32(p)
            if full is None:
                full = safe_get_local_fp32_param(p)
                flush = (lambda p=p, full=full: safe_set_local_fp32_param(p, full))
            valid = max(0, min(full.numel(), p.ds_numel - rank * full.numel()))  # padding
            out.append(Part(name, tuple(p.ds_shape), full.detach().view(-1)[:valid], flush))
        return out

    def _stage3_fp32(self, p):
        """p's fp32 partition as a view into the optimizer's flat group, where it lives (the
        CPU under optimizer offload): written in place, no flush. safe_get_local_fp32_param
        returns a copy on the accelerator instead, which under offload would put another copy
        of the whole shard in GPU memory. (None, None) where the view is not available (NVMe
        swapped groups, other DeepSpeed versions): then that copy it is."""
        opt = self.optimizer
        try:
            group, offset, n = opt.grad_position[opt.get_param_id(p)]
            swapped = getattr(opt, "_swappable_optimizer_subgroup", None)
            if swapped is not None and swapped(group):
                return None, None
            return opt.fp32_partitioned_groups_flat[group].narrow(0, offset, n), None
        except (AttributeError, KeyError, IndexError, TypeError):
            return None, None

    def refresh(self) -> None:
        opt = self.optimizer
        if opt is None:
            raise RelexError("DeepSpeed ZeRO-1/2: relex needs the DeepSpeed optimizer to "
                             "refresh the 16-bit weights; pass optimizer= to acc.step or give "
                             "the Accelerator the DeepSpeed engine")
        if not self.stage3:
            opt.update_lp_params()
            return
        opt._partition_all_parameters()  # as DeepSpeed's step: persistent ones released first
        for i in range(len(opt.fp16_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
        if hasattr(opt, "invalidate_secondary_tensor"):
            opt.invalidate_secondary_tensor()

    def clear_optimizer_state(self, optimizer) -> None:
        raise RelexError("reset_optimizer=True is not supported under DeepSpeed (its optimizer "
                         "state is partitioned with the masters)")


def zero_optimizer(obj):
    """The DeepSpeed ZeRO / BF16 optimizer inside an engine or its wrappers (accelerate's
    AcceleratedOptimizer, DeepSpeedOptimizerWrapper), or None."""
    for _ in range(4):
        if obj is None:
            return None
        if hasattr(obj, "update_lp_params") or hasattr(obj, "fp32_partitioned_groups_flat"):
            return obj
        obj = getattr(obj, "optimizer", None)
    return None


def refuse_fp16_masters(optimizer) -> None:
    """DeepSpeed without ZeRO keeps the fp32 masters of fp16/bf16 training inside its
    FP16_(Unfused)Optimizer, where relex cannot reach them: a jump written into the module's
    weights would be undone by the next step, so refuse."""
    obj = optimizer
    for _ in range(4):
        if obj is None:
            return
        if type(obj).__name__ in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):
            raise RelexError("DeepSpeed without ZeRO (stage 0) in fp16/bf16 keeps its fp32 "
                             "master weights inside its FP16 optimizer, out of relex's reach; "
                             "use ZeRO stage 1, 2 or 3")
        obj = getattr(obj, "optimizer", None)


def layout(model, optimizer=None):
    """The layout of `model`'s trainable weights: a plain module (one process / DDP), a
    `fully_shard`ed model, a DeepSpeed engine or its `.module`."""
    refuse_fp16_masters(optimizer)
    if type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module"):
        refuse_fp16_masters(model.optimizer)
        return DeepSpeed(model.module, zero_optimizer(model.optimizer))
    module = getattr(model, "module", model) if type(model).__name__ in (
        "DistributedDataParallel", "DataParallel") else model
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params):
        return DeepSpeed(module, zero_optimizer(optimizer))
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch without distributed
        return Replicated(module)
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise RelexError("FSDP1 (FullyShardedDataParallel) is not supported: its flat "
                         "parameters hide the tensors relex fits; use FSDP2 (fully_shard; "
                         "accelerate fsdp_version: 2)")
    from torch.distributed.tensor import DTensor
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return FSDP2(module)
    if any(isinstance(p, DTensor) for p in params):
        raise RelexError("the model has DTensor parameters but no fully_shard module (tensor "
                         "parallel?); relex jumps single-process, DDP, FSDP2 and DeepSpeed "
                         "training only")
    return Replicated(module)


def _short(obj, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."
