"""What a PEFT LoRA adapter changes in its base model, from metadata only: adapter_config.json
(r, lora_alpha, rank_pattern / alpha_pattern, use_rslora, fan_in_fan_out, use_dora) and the
entries of adapter_model.safetensors, checked against the base's tensors. formats/lora.py reads
the numbers; this module decides what they mean, so that both the reader and the adapter output
(output/adapter.py) follow one description.

scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with per-module `rank_pattern` /
`alpha_pattern`; embeddings (`lora_embedding_A/B`) and layers whose base weight is stored
(in, out) (transformers Conv1D, where peft sets `fan_in_fan_out`) use the transpose, decided per
layer from the shapes as peft decides per layer from the module type; full tensors in the file
(`modules_to_save`, saved embedding layers, trained biases) replace the base's. DoRA on
embeddings or Conv1D layers, other PEFT methods, LoraConfig options that change what merging
means and adapters whose initialisation rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA, MiCA) are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexError
from relex.formats.base import Reader, TensorMeta
from relex.formats.hf import TensorInfo, read_header

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
class AdapterConfig:
    """The settings of adapter_config.json that decide what merging an adapter means, checked:
    a non-LoRA method, an option relex does not merge, a base-rewriting initialisation or a
    missing r are refused here, before any weight is read."""

    file: Path
    r: int
    alpha: float
    rank_pattern: dict
    alpha_pattern: dict
    rslora: bool
    fan_in_fan_out: bool
    dora: bool
    #: base_model_name_or_path as written (for messages)
    base_name: object = None

    @classmethod
    def read(cls, path: Path) -> AdapterConfig:
        """The checked config of the adapter directory `path`; RelexError on what relex does
        not read."""
        cfg = read_config(path)
        cfg_file = path / ADAPTER_CONFIG
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
        return cls(cfg_file, r0, alpha0, rank_pattern, alpha_pattern,
                   bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out")),
                   bool(cfg.get("use_dora")), cfg.get("base_model_name_or_path"))

    def rank(self, module: str) -> int:
        """r of `module` (rank_pattern, else r)."""
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scaling(self, module: str, r: int) -> float:
        """lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), alpha_pattern applied."""
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(r) if self.rslora else alpha / r


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


class AdapterLayout:
    """Every entry of an adapter file mapped to the base tensor it changes, shapes checked.

    tensors: the merged model's tensors (the base's, with the full tensors saved in the file);
    adapters: weight or bias name -> Adapter; replaced: name -> the file's full tensor;
    full_keys: name -> its key in the adapter file, for those full tensors."""

    def __init__(self, file: Path, config: AdapterConfig, base: Reader):
        self.file, self.config, self.base = file, config, base
        entries, _ = read_header(file)
        self.tensors: dict[str, TensorMeta] = dict(base.tensors)
        self.replaced: dict[str, TensorInfo] = {}
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
                raise RelexError(f"{self.file}: entry '{key}' is not a LoRA weight relex "
                                 f"knows; merge with peft and point relex at the merged model")
            target = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name)
            target = target.replace(".base_layer.", ".")
            self._replace(target, info)
            self.full_keys[target] = key
        if len(adapter_names) > 1:
            raise RelexError(f"{self.file}: holds several adapters "
                             f"({sorted(map(str, adapter_names))}); save one per checkpoint")
        for module, parts in pairs.items():
            self._add(module, parts)

    def _replace(self, name: str, info: TensorInfo) -> None:
        """A full tensor saved in the adapter file (modules_to_save, saved embeddings, bias)."""
        b = self.base.tensors.get(name)
        if b is None:
            raise RelexError(f"{self.file}: tensor '{name}' is not in the base model "
                             f"{self.base.path}; is --base the model this adapter was trained on?")
        if info.shape != b.shape:
            raise RelexError(f"{self.file}: tensor '{name}' has shape {list(info.shape)} but "
                             f"{list(b.shape)} in the base {self.base.path}; wrong --base?")
        self.replaced[name] = info
        self.tensors[name] = TensorMeta(name, info.dtype, info.shape)

    def _add(self, module: str, parts: dict) -> None:
        """The Adapter of one module (and of its lora_B bias), checked against the base."""
        where = f"{self.file}: adapter for '{module}'"
        dora = self.config.dora
        if ("M" in parts) != dora:
            raise RelexError(f"{where}: use_dora is {str(dora).lower()} in "
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
        transposed = self._transposed(where, a, b, b_meta, parts["embedding"])
        if not (a.is_float and b.is_float) or not b_meta.is_float:
            raise RelexError(f"{where}: LoRA weights and their base weight must be float")
        r = a.shape[0]
        r_cfg = self.config.rank(module)
        if r_cfg != r:
            raise RelexError(f"{where}: rank {r} in the file but {r_cfg} in "
                             f"{ADAPTER_CONFIG} (r / rank_pattern); re-save the adapter")
        scaling = self.config.scaling(module, r)
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

    def _transposed(self, where: str, a: TensorInfo, b: TensorInfo, b_meta: TensorMeta,
                    embedding: bool) -> bool:
        """Whether the weight is (B @ A)^T: told from the shapes, as peft tells it from the
        module type; a square weight under fan_in_fan_out cannot be told and is refused."""
        r = a.shape[0]
        plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
        if b.shape[1] != r or b_meta.shape not in (plain, flipped) or (
                embedding and b_meta.shape != flipped):
            raise RelexError(f"{where}: A {list(a.shape)} and B {list(b.shape)} do not form the "
                             f"base weight's shape {list(b_meta.shape)}; wrong --base?")
        if embedding:  # peft's Embedding: weight = (B @ A)^T, always
            return True
        if plain != flipped:  # (out, in): nn.Linear; (in, out): Conv1D (fan_in_fan_out)
            return b_meta.shape == flipped
        if self.config.fan_in_fan_out:
            raise RelexError(f"{where}: its base weight is square, so whether it is a "
                             f"transformers Conv1D (fan_in_fan_out) or an nn.Linear cannot be "
                             f"told from shapes, and fan_in_fan_out is true in "
                             f"{ADAPTER_CONFIG}; merge with peft (merge_and_unload + "
                             f"save_pretrained) and point relex at the merged model")
        return False


def check_same_adapters(checkpoints: list[Reader], steps: list[int]) -> None:
    """Every LoRA checkpoint of a run must adapt the same weights with the same r: a delta
    whose rank or support changes mid-run is not one trajectory (and is usually a mix-up of
    runs). Raises RelexError naming the first step and module that differ. Checkpoints of
    other formats (format != "lora") are skipped."""
    first = None
    for step, ckpt in zip(steps, checkpoints):
        if ckpt.format != "lora":
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
