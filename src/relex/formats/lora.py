"""PEFT LoRA adapters (`checkpoint-N/adapter_model.safetensors` + `adapter_config.json`, also
verl's `actor/lora_adapter/`): exact deltas scaling * B @ A for the engine, and the merged model
base + scaling * B @ A for anyone who reads the checkpoint as a model.

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
scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with per-module `rank_pattern` /
`alpha_pattern`; embeddings (`lora_embedding_A/B`) and layers whose base weight is stored
(in, out) (transformers Conv1D, where peft sets `fan_in_fan_out`) use the transpose, decided per
layer from the shapes as peft decides per layer from the module type; `lora_B.bias` is added to
the base bias; full tensors in the file (`modules_to_save`, saved embedding layers, trained
biases) replace the base's. DoRA on linear layers (`lora_magnitude_vector`) is read the same way
row by row: W' = m * (W + s B A) / ||W + s B A|| with the norm of each output row, so its delta
is exact but not low rank (delta_kind "delta"); the row norm adds up to n / 2 + 1 ulp to the read's
bound (n: the row's length). DoRA on embeddings or Conv1D layers, other PEFT
methods and adapters whose initialisation rewrote
the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA) are refused.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from relex.errors import RelexError
from relex.formats.base import DTYPES, MappedFiles, Reader, TensorMeta
from relex.formats.hf import TensorInfo, read_header

NAME = "lora"
#: open_reader passes the base model to this format's reader
NEEDS_BASE = True
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_LORA = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\."
                   r"(?P<param>weight|bias)")
_DORA = re.compile(r"(?P<module>.+)\.(?P<kind>lora_magnitude_vector)(?:\.(?P<adapter>[^.]+))?"
                   r"(?:\.weight)?")
_EMBED = re.compile(r"(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)"
                    r"(?:\.(?P<adapter>[^.]+))?")
#: LoraConfig options that change what merging means; relex refuses adapters that set them
_UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config")


#: init_lora_weights values whose adapters hold a delta to a rewritten base (peft subtracts the
#: initial adapter from the base weights when creating or loading them): prefixes and exact values
_REWRITES_BASE = (("pissa", "corda"), ("olora", "loftq", "lora_ga", "mica"))


def rewrites_base(init) -> bool:
    """Whether an adapter with this `init_lora_weights` is a delta to a modified base."""
    return isinstance(init, str) and (init.startswith(_REWRITES_BASE[0])
                                      or init in _REWRITES_BASE[1])


def detect(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def read_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RelexError(f"{file}: not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise RelexError(f"{file}: not a PEFT adapter config (not a JSON object); re-save it")
    return cfg


def base_of(path: Path) -> Path | None:
    """The base model directory adapter_config.json names, when it is a local directory."""
    name = read_config(Path(path)).get("base_model_name_or_path")
    if isinstance(name, str) and name and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    return None


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule for rank_pattern / alpha_pattern: the first key that matches the end of the
    module name at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class Adapter:
    """One LoRA'd weight: weight[rows] += scaling * (L[rows] @ R), stored as A and B entries.

    transposed: embeddings and fan_in_fan_out layers, whose weight is (B @ A)^T."""

    a: TensorInfo
    b: TensorInfo
    scaling: float
    transposed: bool = False
    bias: bool = False  # a lora_B bias: bias += scaling * b (a is unused)
    #: the adapter file's key of the module ("base_model.model.<module>")
    prefix: str = ""
    embedding: bool = False  # lora_embedding_A/B (keys without ".weight")
    #: DoRA's magnitude vector (one per output row), None for plain LoRA
    magnitude: TensorInfo | None = None

    @property
    def rank(self) -> int:
        return 0 if self.bias else self.a.shape[0]


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
        cfg = read_config(self.path)
        cfg_file = self.path / ADAPTER_CONFIG
        if cfg.get("peft_type", "LORA") != "LORA":
            raise RelexError(f"{cfg_file}: a {cfg.get('peft_type')} adapter; relex reads LoRA "
                             f"only: merge it with peft (merge_and_unload + save_pretrained)")
        for key in _UNSUPPORTED:
            if cfg.get(key) not in (None, False, {}, []):
                raise RelexError(f"{cfg_file}: {key} is set, which relex does not merge; merge "
                                 f"the adapters with peft (merge_and_unload + save_pretrained) "
                                 f"and point relex at the merged directories")
        init = cfg.get("init_lora_weights")
        if rewrites_base(init):
            raise RelexError(f"{cfg_file}: init_lora_weights is '{init}', whose adapters are "
                             f"deltas to a base peft rewrites on loading, not to the base "
                             f"model; re-save them as plain LoRA with peft's "
                             f"save_pretrained(..., path_initial_model_for_weight_conversion="
                             f"<the initial adapter's dir>) (LoftQ: merge with peft instead)")
        try:
            r0, alpha0 = int(cfg["r"]), float(cfg.get("lora_alpha", 8))  # peft's default
            rank_pattern = dict(cfg.get("rank_pattern") or {})
            alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise RelexError(f"{cfg_file}: missing or invalid r / lora_alpha ({e!r}); re-save "
                             f"the adapter") from None
        rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
        self.dora = bool(cfg.get("use_dora"))
        if base is None:
            base = base_of(self.path)
            if base is None:
                raise RelexError(f"{cfg_file}: base model "
                                 f"'{cfg.get('base_model_name_or_path')}' is not a local "
                                 f"directory; pass --base BASE_DIR (the model the adapter was "
                                 f"trained on)")
        self.base = _SharedBase.acquire(Path(base))
        self._maps = MappedFiles()
        try:
            self._load(r0, alpha0, rank_pattern, alpha_pattern, rslora, fan_in_fan_out)
        except BaseException:
            self.close()
            raise
        config_dir = self.path if (self.path / "config.json").is_file() else None
        self.meta_dir = config_dir or self.base.meta_dir

    def _load(self, r0, alpha0, rank_pattern, alpha_pattern, rslora, fan_in_fan_out) -> None:
        """Map every adapter-file entry to the base tensor it changes, checking shapes."""
        self._file = self.path / ADAPTER_WEIGHTS
        entries, _ = read_header(self._file)
        self.tensors = dict(self.base.tensors)
        self._replaced: dict[str, TensorInfo] = {}
        #: tensor name -> its key in the adapter file, for the full tensors saved there
        self.full_keys: dict[str, str] = {}
        self.adapters: dict[str, Adapter] = {}
        pairs: dict[str, dict[str, TensorInfo]] = {}
        adapter_names = set()
        for key, info in entries.items():
            name = key.removeprefix("base_model.model.")
            m = _DORA.fullmatch(name)
            if m:
                adapter_names.add(m.group("adapter"))
                pairs.setdefault(m.group("module"), {})["M"] = info
                continue
            m = _LORA.fullmatch(name) or _EMBED.fullmatch(name)
            if m:
                adapter_names.add(m.group("adapter"))
                param = m.groupdict().get("param") or "weight"
                kind = m.group("kind")[-1] + ("_bias" if param == "bias" else "")
                pairs.setdefault(m.group("module"), {})[kind] = info
                pairs[m.group("module")]["embedding"] = "embedding" in m.group("kind")
                pairs[m.group("module")]["prefix"] = key[: len(key) - len(name)] + \
                    m.group("module")
                continue
            if "lora_" in name or "trainable_tokens" in name:
                raise RelexError(f"{self._file}: entry '{key}' is not a LoRA weight relex "
                                 f"knows; merge with peft and point relex at the merged model")
            target = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name)
            target = target.replace(".base_layer.", ".")
            self._replace(target, info)
            self.full_keys[target] = key
        if len(adapter_names) > 1:
            raise RelexError(f"{self._file}: holds several adapters "
                             f"({sorted(map(str, adapter_names))}); save one per checkpoint")
        for module, parts in pairs.items():
            self._add(module, parts, r0, alpha0, rank_pattern, alpha_pattern, rslora,
                      fan_in_fan_out)

    def _replace(self, name: str, info: TensorInfo) -> None:
        """A full tensor saved in the adapter file (modules_to_save, saved embeddings, bias)."""
        b = self.base.tensors.get(name)
        if b is None:
            raise RelexError(f"{self._file}: tensor '{name}' is not in the base model "
                             f"{self.base.path}; is --base the model this adapter was trained on?")
        if info.shape != b.shape:
            raise RelexError(f"{self._file}: tensor '{name}' has shape {list(info.shape)} but "
                             f"{list(b.shape)} in the base {self.base.path}; wrong --base?")
        self._replaced[name] = info
        self.tensors[name] = TensorMeta(name, info.dtype, info.shape)

    def _add(self, module, parts, r0, alpha0, rank_pattern, alpha_pattern, rslora, fifo) -> None:
        where = f"{self._file}: adapter for '{module}'"
        if ("M" in parts) != self.dora:
            raise RelexError(f"{where}: use_dora is {str(self.dora).lower()} in "
                             f"{ADAPTER_CONFIG} but the file "
                             f"{'has' if 'M' in parts else 'lacks'} its lora_magnitude_vector; "
                             f"re-save the adapter")
        if "A" not in parts or "B" not in parts:
            raise RelexError(f"{where} lacks its lora_{'A' if 'A' not in parts else 'B'} "
                             f"weight; the file is incomplete, re-save the adapter")
        weight = f"{module}.weight"
        b_meta = self.tensors.get(weight)
        if b_meta is None:
            raise RelexError(f"{where}: the base model {self.base.path} has no tensor "
                             f"'{weight}'; is --base the model this adapter was trained on?")
        a, b = parts["A"], parts["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or len(b_meta.shape) != 2:
            raise RelexError(f"{where}: only 2-D (linear / embedding) LoRA weights are "
                             f"supported; merge with peft first")
        r = a.shape[0]
        plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
        if b.shape[1] != r or b_meta.shape not in (plain, flipped) or (
                parts["embedding"] and b_meta.shape != flipped):
            raise RelexError(f"{where}: A {list(a.shape)} and B {list(b.shape)} do not form the "
                             f"base weight's shape {list(b_meta.shape)}; wrong --base?")
        if parts["embedding"]:  # peft's Embedding: weight = (B @ A)^T, always
            transposed = True
        elif plain != flipped:  # (out, in): nn.Linear; (in, out): Conv1D (fan_in_fan_out)
            transposed = b_meta.shape == flipped
        elif fifo:
            raise RelexError(f"{where}: its base weight is square, so whether it is a "
                             f"transformers Conv1D (fan_in_fan_out) or an nn.Linear cannot be "
                             f"told from shapes, and fan_in_fan_out is true in "
                             f"{ADAPTER_CONFIG}; merge with peft (merge_and_unload + "
                             f"save_pretrained) and point relex at the merged model")
        else:
            transposed = False
        if not (a.is_float and b.is_float) or not b_meta.is_float:
            raise RelexError(f"{where}: LoRA weights and their base weight must be float")
        r_cfg = int(_pattern_value(rank_pattern, module, r0))
        if r_cfg != r:
            raise RelexError(f"{where}: rank {r} in the file but {r_cfg} in "
                             f"{ADAPTER_CONFIG} (r / rank_pattern); re-save the adapter")
        alpha = float(_pattern_value(alpha_pattern, module, alpha0))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        magnitude = parts.get("M")
        if magnitude is not None and (transposed or magnitude.shape != (b_meta.shape[0],)
                                      or not magnitude.is_float):
            raise RelexError(f"{where}: DoRA on an embedding or Conv1D layer, or a magnitude "
                             f"vector of shape {list(magnitude.shape)} for the weight's "
                             f"{list(b_meta.shape)}: relex reads DoRA on linear layers only; "
                             f"merge with peft (merge_and_unload + save_pretrained)")
        self.adapters[weight] = Adapter(a, b, scaling, transposed, prefix=parts["prefix"],
                                        embedding=parts["embedding"], magnitude=magnitude)
        if "B_bias" in parts:
            bias, b_bias = f"{module}.bias", parts["B_bias"]
            if bias not in self.tensors:
                raise RelexError(f"{where}: has a lora_B bias but the base has no '{bias}'; "
                                 f"peft cannot merge it either")
            if b_bias.shape != self.tensors[bias].shape:
                raise RelexError(f"{where}: lora_B bias shape {list(b_bias.shape)} differs from "
                                 f"the base's {list(self.tensors[bias].shape)}")
            self.adapters[bias] = Adapter(b_bias, b_bias, scaling, bias=True,
                                          prefix=parts["prefix"])

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


def check_same_adapters(checkpoints: list[Reader], steps: list[int]) -> None:
    """Every LoRA checkpoint of a run must adapt the same weights with the same r: a delta
    whose rank or support changes mid-run is not one trajectory (and is usually a mix-up of
    runs). Raises RelexError naming the first step and module that differ."""
    first = None
    for step, ckpt in zip(steps, checkpoints):
        if not isinstance(ckpt, LoraReader):
            continue
        ranks = {n: ad.rank if ad.magnitude is None else f"{ad.rank} (DoRA)"
                 for n, ad in ckpt.adapters.items()}
        if first is None:
            first = (step, ranks)
            continue
        step0, ranks0 = first
        for name in sorted(set(ranks) | set(ranks0)):
            module = name.rsplit(".", 1)[0]
            where = f"{ckpt.path / ADAPTER_WEIGHTS}: at step {step}, module '{module}'"
            fix = ("the checkpoints of one run must share r and target_modules; pass only "
                   "one run's checkpoints (--steps)")
            if name not in ranks0 or name not in ranks:
                what = (f"has a LoRA {name.rsplit('.', 1)[1]}, which step {step0} lacks"
                        if name in ranks else f"has no LoRA {name.rsplit('.', 1)[1]} but "
                        f"step {step0} has one")
                raise RelexError(f"{where} {what} (target_modules changed); {fix}")
            if ranks[name] != ranks0[name]:
                raise RelexError(f"{where} has r={ranks[name]} but r={ranks0[name]} at step "
                                 f"{step0}; {fix}")


def reader(path: Path, base: str | Path | None = None) -> LoraReader:
    return LoraReader(path, base)
