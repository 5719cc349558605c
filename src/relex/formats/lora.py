"""PEFT LoRA adapters (`checkpoint-N/adapter_model.safetensors` + `adapter_config.json`, also
verl's `actor/lora_adapter/`): exact deltas scaling * B @ A for the engine, and the merged model
base + scaling * B @ A for anyone who reads the checkpoint as a model. What the adapter changes
(config, scaling, transposes, what is refused) is decided in lora_config.py; this module reads.

What relex fits is the delta, so the engine never sees a merged weight: for a LoRA'd weight
`delta_kind` is "factors" and `factors` hands out (scaling * L, R) with delta = L @ R (the Gram
matrix comes from r x r products of them, stream/factors.py), for a lora_B bias or a full
tensor saved in the adapter file it is "delta" (`delta`: exact, in float32/float64), and for
every other tensor "zero". Merging first and rounding each checkpoint to a bf16 base's dtype, as peft's
`merge_and_unload` does, loses most of an RL-sized delta (docs/lora.md has the measurements).

A LoRA run saves only the adapters, and merging each checkpoint first (peft's
`merge_and_unload`) loads the whole model and writes another full copy per step. Here a
requested element range of a target weight is formed on the fly: only the rows of the weight the
range touches, B[rows] @ A (r multiply-adds per element), added to the base's bytes of that range.
Nothing bigger than one block is ever materialised, and tensors without an adapter are the base's
own mapped bytes (delta 0, so relex copies them).

`read` follows peft's merge (what a merged export of the checkpoint holds): delta = (B @ A) *
scaling in the adapter's dtype (float32 on the CPU for half-precision adapters, cast back), added
to the base weight in the base's dtype. It is not bit-identical to peft's result: BLAS sums B @ A
in an order that depends on the CPU and on the rows asked for, so, like peft's own merge, a
float32 read is within r + 1 ulp of the float64 merge at the magnitude of its terms
(max(|W|, scaling * |B| @ |A|)), a 16-bit one within one ulp (tests/test_format_lora.py
`merge_bound`). The engine never uses `read` for a LoRA'd weight (it takes the exact delta);
`lora_B.bias` is added to the base bias; full tensors in the file replace the base's. DoRA on
linear layers (`lora_magnitude_vector`) is read the same way row by row:
W' = m * (W + s B A) / ||W + s B A|| with the norm of each output row, so its delta is exact but
not low rank (delta_kind "delta"); the row norm adds up to n / 2 + 1 ulp to the read's bound
(n: the row's length).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import torch

from relex.errors import RelexError
from relex.formats.base import DTYPES, MappedFiles, Reader
from relex.formats.hf import TensorInfo

# check_same_adapters and read_config are re-exported: importers call them as lora.<name>
from relex.formats.lora_config import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    AdapterConfig,
    AdapterLayout,
    base_of,
    check_same_adapters,
    read_config,
)

NAME = "lora"
#: open_reader passes the base model to this format's reader
NEEDS_BASE = True


def detect(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


class _SharedBase:
    """One open reader per base directory, shared by every adapter checkpoint of a run (so the
    base is mapped once, not once per checkpoint)."""

    _open: ClassVar[dict[Path, list]] = {}
    _lock = threading.Lock()

    @classmethod
    def acquire(cls, path: Path) -> Reader:
        from relex.formats import open_reader
        key = Path(path).resolve()
        with cls._lock:
            if key not in cls._open:
                cls._open[key] = [open_reader(path), 0]
            cls._open[key][1] += 1
            return cls._open[key][0]

    @classmethod
    def release(cls, reader: Reader) -> None:
        with cls._lock:
            for key, entry in list(cls._open.items()):
                if entry[0] is reader:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del cls._open[key]
                        reader.close()
                    return


class LoraReader(Reader):
    """A PEFT LoRA checkpoint: exact deltas for the engine (delta_kind, factors, delta), and
    the merged model (base + scaling * B @ A, as peft merges it) range by range (read).

    >>> ckpt = LoraReader("out/checkpoint-50", base="Qwen2.5-Math-1.5B")
    >>> rows = ckpt.read("model.layers.0.self_attn.q_proj.weight", 0, 4096)  # merged, 1-D
    """

    format = "lora"

    def __init__(self, path: str | Path, base: str | Path | None = None):
        super().__init__(Path(path))
        config = AdapterConfig.read(self.path)
        self.dora = config.dora
        if base is None:
            base = base_of(self.path)
            if base is None:
                raise RelexError(f"{config.file}: base model '{config.base_name}' is not a "
                                 f"local directory; pass --base BASE_DIR (the model the adapter "
                                 f"was trained on)")
        self.base = _SharedBase.acquire(Path(base))
        self._maps = MappedFiles()
        self._file = self.path / ADAPTER_WEIGHTS
        try:
            layout = AdapterLayout(self._file, config, self.base)
        except BaseException:
            self.close()
            raise
        self.tensors = layout.tensors
        self._replaced: dict[str, TensorInfo] = layout.replaced
        #: tensor name -> its key in the adapter file, for the full tensors saved there
        self.full_keys: dict[str, str] = layout.full_keys
        self.adapters: dict[str, Adapter] = layout.adapters
        config_dir = self.path if (self.path / "config.json").is_file() else None
        self.meta_dir = config_dir or self.base.meta_dir

    # ------------------------------------------------------------------ reading
    def _view(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        size = info.itemsize
        return self._maps.view(info.file, info.offset + start * size, (stop - start) * size,
                               DTYPES[info.dtype])

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Merged elements [start, stop): a fresh tensor for LoRA'd weights, else a view."""
        if name in self._replaced:  # a full tensor in the adapter file (maybe LoRA'd on top)
            base = self._view(self._replaced[name], start, stop)
        else:
            base = self.base.read(name, start, stop)
        ad = self.adapters.get(name)
        if ad is None:
            return base
        if ad.magnitude is not None:  # peft: in float32 (the adapter's dtype), rounded once
            wide = torch.promote_types(base.dtype, torch.float32)
            return self._dora(name, ad, start, stop, wide, exact=False).to(base.dtype)
        if ad.bias:
            delta = self._view(ad.b, start, stop) * ad.scaling
        else:
            delta = self._delta(ad, self.tensors[name].shape[1], start, stop)
        return (base + delta).to(base.dtype)  # peft's in-place add: promote, round to base

    # ------------------------------------------------------------------ exact deltas
    def places(self, name: str) -> list:
        raise RelexError(f"{self.path}: a LoRA checkpoint cannot take an extrapolated model in "
                         f"place: its adapter would be re-factorised and the optimizer's "
                         f"moments belong to the old factors; use --output-format lora (an "
                         f"adapter to start a new run from) or hf")

    def delta_kind(self, name: str) -> str:
        """"factors" for a LoRA'd weight, "delta" for a lora_B bias or a full tensor saved in
        the adapter file, "zero" for every other tensor (see Reader.delta_kind)."""
        ad = self.adapters.get(name)
        if name in self._replaced or (ad is not None and (ad.bias or ad.magnitude is not None)):
            return "delta"
        return "zero" if ad is None else "factors"

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(L, R, scaling) of a LoRA'd weight as stored (views of the mapped file): the delta
        is scaling * L @ R, L (m, r), R (r, n) for the weight's (m, n): B and A, or A^T and B^T
        for embeddings and Conv1D layers."""
        ad = self.adapters[name]
        a = self._view(ad.a, 0, ad.a.numel).view(ad.a.shape)
        b = self._view(ad.b, 0, ad.b.numel).view(ad.b.shape)
        return (a.T, b.T, ad.scaling) if ad.transposed else (b, a, ad.scaling)

    def factor_nbytes(self, name: str) -> int:
        """Bytes of the factors `factors` reads for a LoRA'd weight."""
        ad = self.adapters[name]
        return ad.a.nbytes + ad.b.nbytes

    def delta(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Elements [start, stop) of this checkpoint minus the base, in `dtype` (float32 or
        float64), never rounded to the base's dtype: a saved full tensor minus the base, plus
        scaling * (B @ A) (or a lora_B bias) computed in `dtype`."""
        if name in self._replaced:
            full = self._view(self._replaced[name], start, stop).to(dtype)
            out = full - self.base.read(name, start, stop).to(dtype)
        else:
            out = torch.zeros(stop - start, dtype=dtype)
        ad = self.adapters.get(name)
        if ad is None:
            return out
        if ad.bias:
            return out.add_(self._view(ad.b, start, stop).to(dtype), alpha=ad.scaling)
        if ad.magnitude is not None:
            return out.add_(self._dora(name, ad, start, stop, dtype, exact=True))
        return out.add_(self._delta(ad, self.tensors[name].shape[1], start, stop, dtype))

    def _dora(self, name: str, ad: Adapter, start: int, stop: int, dtype: torch.dtype,
              exact: bool) -> torch.Tensor:
        """DoRA, for the rows the range touches: m * V / ||V|| (per row), V = W + s B A, in
        `dtype`; minus W if exact (the delta), else the merged weight. Cut to [start, stop)."""
        cols = self.tensors[name].shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        src = (self._view(self._replaced[name], r0 * cols, r1 * cols) if name in self._replaced
               else self.base.read(name, r0 * cols, r1 * cols))
        w = src.to(dtype).view(r1 - r0, cols)
        v = w + self._delta(ad, cols, r0 * cols, r1 * cols, dtype).view(r1 - r0, cols)
        mag = self._view(ad.magnitude, r0, r1).to(dtype)
        new = v * (mag / torch.linalg.vector_norm(v, dim=1))[:, None]
        out = new - w if exact else new
        return out.reshape(-1)[start - r0 * cols: stop - r0 * cols]

    def _delta(self, ad: Adapter, cols: int, start: int, stop: int,
               exact: torch.dtype | None = None) -> torch.Tensor:
        """scaling * (B @ A) (or its transpose) for the rows the range touches, flattened and
        cut to [start, stop): in `exact` if given, else in the dtypes peft's merge uses."""
        r0, r1 = start // cols, -(-stop // cols)
        a_full, b_full = self._view(ad.a, 0, ad.a.numel), self._view(ad.b, 0, ad.b.numel)
        a, b = a_full.view(ad.a.shape), b_full.view(ad.b.shape)
        if ad.transposed:  # weight = (B @ A)^T: its rows are columns of A
            a = a[:, r0:r1]
        else:
            b = b[r0:r1]
        dtype = a.dtype
        half = dtype in (torch.float16, torch.bfloat16) and exact is None
        if exact is not None:
            a, b = a.to(exact), b.to(exact)
        elif half:
            a, b = a.float(), b.float()
        prod = b @ a
        if ad.transposed:
            prod = prod.T
        delta = prod * ad.scaling
        if half:
            delta = delta.to(dtype)
        return delta.reshape(-1)[start - r0 * cols: stop - r0 * cols]

    def release(self, name: str, start: int, stop: int) -> None:
        if name in self._replaced:
            info = self._replaced[name]
            self._maps.release(info.file, info.offset + start * info.itemsize,
                               (stop - start) * info.itemsize)
        else:
            self.base.release(name, start, stop)
        ad = self.adapters.get(name)
        if ad is not None:
            infos = [ad.a, ad.b] + ([ad.magnitude] if ad.magnitude is not None else [])
            for info in {i.name: i for i in infos}.values():
                self._maps.release(info.file, info.offset, info.nbytes)

    def files(self) -> list[Path]:
        return [self._file, self.path / ADAPTER_CONFIG]

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "base": str(self.base.path.resolve())}

    def close(self) -> None:
        self._maps.close()
        if self.base is not None:
            _SharedBase.release(self.base)
            self.base = None



def reader(path: Path, base: str | Path | None = None) -> LoraReader:
    return LoraReader(path, base)
