"""Write an extrapolated step of a LoRA run as a PEFT adapter directory, not as a model.

The extrapolated delta of a LoRA'd weight, sum_t w_t s_t B_t A_t, has rank <= T r; the engine
compresses it to the adapter's rank k (stream.factors.compress_factors: QR of the stacked
factors and an SVD of a (T r) x (T r) core, never of an m x n matrix) and hands the factors
here. The directory holds adapter_config.json (the run's, with r = lora_alpha = k so that
scaling is 1) and adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base, dir)`
and vLLM's LoRA serving load: a few MB per candidate step instead of a whole model. lora_B biases are the
extrapolated bias deltas (float32); full tensors the run saved (modules_to_save, saved
embeddings) are written whole, as the adapter file had them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats import DTYPES, lora
from relex.formats.base import numel
from relex.formats.hf import SAFE_WEIGHTS
from relex.stream.trajectory import Trajectory
from relex.output.model import ModelWriter


def delta_outputs(traj: Trajectory) -> dict[str, str]:
    """Tensors an adapter output holds as their delta, not theta_0 + delta, with the dtype code
    they are written in: the lora_B biases (unless the adapter file saved the full tensor)."""
    last = traj.checkpoints[-1]
    out = {}
    for plan in traj.plans:
        ad = last.adapters.get(plan.name)
        full = any(plan.name in c.full_keys for c in traj.checkpoints)
        if ad is not None and ad.bias and plan.exact and not plan.factored and not full:
            out[plan.name] = "F32"
    return out


def adapter_rank(traj: Trajectory, lora_rank: int | None, notes: list[str]) -> int:
    """The r of an adapter output: lora_rank (default the run's r), clamped to T * r, the rank
    of any extrapolated delta (and said in `notes`). Refuses runs that are not all LoRA."""
    for step, ckpt in zip(traj.steps, traj.checkpoints):
        if ckpt.format != "lora":
            raise RelexError(f"--output-format lora: the checkpoint of step {step} ({ckpt.path})"
                             f" is a {ckpt.format} checkpoint, not a LoRA adapter; an adapter "
                             f"output needs a LoRA run (drop --output-format lora to write "
                             f"model directories)")
    last = traj.checkpoints[-1]
    if last.dora:
        raise RelexError(f"--output-format lora: {last.path} is a DoRA adapter, whose "
                         f"extrapolated delta (rows rescaled by the magnitude vector) is not a "
                         f"low-rank product; drop --output-format lora to write model "
                         f"directories")
    r_max = max((ad.rank for ad in last.adapters.values()), default=0)
    if r_max == 0:
        raise RelexError(f"--output-format lora: {last.path} adapts no weight (only full "
                         f"tensors); drop --output-format lora")
    k = int(lora.read_config(last.path)["r"]) if lora_rank is None else int(lora_rank)
    if k < 1:
        raise RelexError(f"--lora-rank {k}: give a positive rank")
    if k > traj.T * r_max:
        notes.append(f"--lora-rank {k} is more than T*r = {traj.T}*{r_max} = "
                     f"{traj.T * r_max}, the rank of the extrapolated delta: using "
                     f"{traj.T * r_max}")
        k = traj.T * r_max
    return k


class AdapterWriter:
    """One target step's adapter directory, written as the engine computes it.

    rank: the adapter's r (each module gets min(rank, T r_module): rank_pattern where that is
    less). The lora_B biases are written as their extrapolated delta, not theta_0 + delta
    (delta_outputs, which the pass plan carries to the engine).
    """

    def __init__(self, directory: Path, traj: Trajectory, rank: int,
                 create: bool = True, owned: set[str] | None = None):
        self.directory = Path(directory)
        self.rank = rank
        last = traj.checkpoints[-1]
        self._config = lora.read_config(last.path)
        self._keys: dict[str, str] = {}  # tensor -> adapter-file key (full tensors, biases)
        self._factor_keys: dict[str, tuple[str, str, bool]] = {}  # weight -> (A, B, transposed)
        self.ranks: dict[str, int] = {}
        specs = []
        for plan in traj.plans:
            name = plan.name
            full = next((c.full_keys[name] for c in reversed(traj.checkpoints)
                         if name in c.full_keys), None)
            ad = last.adapters.get(name)
            if plan.factored and ad is not None:
                k = min(rank, traj.T * ad.rank)
                m, n = plan.shape
                if ad.embedding:
                    a_key, b_key = f"{ad.prefix}.lora_embedding_A", f"{ad.prefix}.lora_embedding_B"
                else:
                    a_key, b_key = f"{ad.prefix}.lora_A.weight", f"{ad.prefix}.lora_B.weight"
                a_shape, b_shape = ((k, m), (n, k)) if ad.transposed else ((k, n), (m, k))
                specs += [(a_key, "F32", a_shape), (b_key, "F32", b_shape)]
                self._factor_keys[name] = (a_key, b_key, ad.transposed)
                self.ranks[name] = k
            elif plan.exact and full is not None:
                self._keys[name] = full
                specs.append((full, plan.out_dtype, plan.shape))
            elif plan.exact and ad is not None and ad.bias:
                self._keys[name] = f"{ad.prefix}.lora_B.bias"
                specs.append((self._keys[name], "F32", plan.shape))
        owned_keys = None
        if owned is not None:
            owned_keys = {self._keys[n] for n in owned if n in self._keys}
            owned_keys |= {k for n in owned if n in self._factor_keys
                           for k in self._factor_keys[n][:2]}
        #: bytes of the adapter file's tensors
        self.nbytes = sum(DTYPES[c].itemsize * numel(s) for _, c, s in specs)
        self.create = create
        self._writer = ModelWriter(self.directory, specs, max_shard_size=1 << 62,
                                   create=create, owned=owned_keys)

    def rank_of(self, name: str) -> int:
        """The rank a LoRA'd weight is compressed to."""
        return self.ranks[name]

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """A chunk of a full tensor or a lora_B bias delta; other tensors are not in an
        adapter (unchanged ones: the base's)."""
        key = self._keys.get(name)
        if key is not None:
            self._writer.write_at(key, start, chunk)

    def write_factors(self, name: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """The compressed delta lo @ hi ((m, k) @ (k, n)) of weight `name` as lora_A / lora_B
        (transposed for embeddings and Conv1D layers, whose weight is (B @ A)^T)."""
        a_key, b_key, transposed = self._factor_keys[name]
        a, b = (lo.T, hi.T) if transposed else (hi, lo)
        self._writer.write_at(a_key, 0, a.to(torch.float32).contiguous().reshape(-1))
        self._writer.write_at(b_key, 0, b.to(torch.float32).contiguous().reshape(-1))

    def close(self) -> None:
        """Check every tensor arrived, name the file as peft does, write adapter_config.json."""
        self._writer.close()
        if not self.create:
            return
        os.replace(self.directory / SAFE_WEIGHTS, self.directory / lora.ADAPTER_WEIGHTS)
        modules = {n.rsplit(".", 1)[0]: k for n, k in self.ranks.items() if k != self.rank}
        cfg = dict(self._config, r=self.rank, lora_alpha=self.rank, use_rslora=False,
                   rank_pattern=modules, alpha_pattern=dict(modules), inference_mode=True)
        (self.directory / lora.ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2,
                                                                     sort_keys=True) + "\n")

    def abort(self) -> None:
        self._writer.abort()

