"""Megatron-core `torch_dist` checkpoints, read in place under Hugging Face names and shapes.

slime (`iter_0000100/`), NeMo-RL's Megatron policy (`step_N/policy/weights/iter_0000000/`),
verl's Megatron backend without mbridge (`global_step_N/actor/dist_ckpt/`) and ROLL save
Megatron's distributed checkpoints: torch DCP underneath (`.metadata`, `__*_*.distcp`, parsed by
dcp.DCPReader, whatever the TP/PP/EP layout was), plus `metadata.json` naming the backend and
`common.pt` holding the non-tensor state (Megatron-LM's `args`), unpickled into inert records.

What relex fits is per layer and per HF weight (the granularity of the paper): a rank-1 fit of
a stacked or fused Megatron tensor is a different, worse model (docs/formats.md has the
figures). The stored tensors are laid out differently from HF's:
- layers stacked on a leading axis: `decoder.layers.<rest>` of shape [num_layers, ...]
  (per-layer keys `decoder.layers.<i>.<rest>` are read too);
- `self_attention.linear_qkv.weight` (and `.bias`) fused per query group: for each of the
  num_key_value_heads groups, the q rows of its heads, then its k rows, then its v rows;
- SwiGLU `mlp.linear_fc1.weight` = [gate; up];
- the layer norms folded into the linears (`linear_qkv.layer_norm_weight`,
  `linear_fc1.layer_norm_weight`), Qwen3's `q_layernorm` / `k_layernorm`;
- embedding and output layer padded to a larger vocabulary.
Every HF tensor is therefore a concatenation of whole-row ranges of one stored tensor (a
`StoredRows`, its `Segment`s): `layout` builds that map once from the stored shapes and the HF
config, and `read` serves an element range of an HF tensor from the stored rows it covers
(a zero-copy view when the range lies in one segment). Nothing is converted or copied whole.
Native output writes HF tensors back through the same map (`places`), into the model's tensors
and the optimizer's fp32 master copies (model space, or the distributed optimizer's buckets:
megatron_optimizer.py).

The HF config (sizes, vocabulary without padding, tied embeddings) comes from `hf_config`, a
config.json in or beside the checkpoint (verl's `actor/huggingface/`), the run's base model,
or the directories above the checkpoint, in that order; Megatron-LM's args in common.pt must
agree with it. Dense Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3 models are mapped; MoE experts,
hybrid (Mamba) layers and any other stored tensor are refused in one line naming the key.
The fit does not read optimizer state (`optimizer.` keys) or `_extra_state`.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.formats import dcp
from relex.formats.base import DTYPES, TensorMeta, numel
from relex.formats.chunked import Chunk, ChunkedTensor, Place
from relex.formats.megatron_optimizer import bucket_masters, is_bucket
from relex.formats.torchzip import load
from relex.formats.unpickler import InertGlobals, Record, StoredTensor, records_of, short

NAME = "megatron"
#: open_reader passes --hf-config and the base model (its config.json is the HF config when
#: none is given or beside)
NEEDS_HF_CONFIG = True
METADATA_JSON = "metadata.json"
COMMON = "common.pt"
TRACKER = "latest_checkpointed_iteration.txt"
ITERATION = re.compile(r"iter_(\d+)")
#: HF model_type values whose layout `layout` maps (dense decoder, RMSNorm, SwiGLU, RoPE)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
HINT = ("python tools/convert_torch_dist_to_hf.py --input-dir {path} --output-dir {path}_hf "
        "--origin-hf-dir BASE_HF_DIR  (in the slime repo)")

#: stored per-layer tensors that are one HF tensor each: Megatron name after `decoder.layers.`
#: -> HF name after `model.layers.<i>.`
PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV, QKV_BIAS, FC1 = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                      "mlp.linear_fc1.weight")
#: the order of a layer's tensors in HF checkpoints (modules, without .weight / .bias)
HF_ORDER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EMBEDDING, FINAL_NORM, OUTPUT = ("embedding.word_embeddings.weight",
                                 "decoder.final_layernorm.weight", "output_layer.weight")
LAYERS = "decoder.layers."
OPTIMIZER = "optimizer."
#: where Megatron's optimizers keep fp32 master copies of the weights per stored key
MASTERS = ("optimizer.state.fp32_param.", "optimizer.state.param.")


@dataclass(frozen=True)
class Segment:
    """Elements [start, stop) of the flattened stored tensor `key`: whole rows of it."""

    key: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StoredRows:
    """Where an HF tensor lies in the stored tensors: its elements are its segments' elements,
    end to end, in order."""

    shape: tuple[int, ...]
    segments: tuple[Segment, ...]
    starts: tuple[int, ...] = field(init=False)  # each segment's first element in the HF tensor

    def __post_init__(self):
        starts, n = [], 0
        for s in self.segments:
            starts.append(n)
            n += s.size
        object.__setattr__(self, "starts", tuple(starts))

    def pieces(self, a: int, b: int):
        """(key, start, stop) of the stored elements HF elements [a, b) come from, in order."""
        i = bisect.bisect_right(self.starts, a) - 1
        while a < b:
            seg, first = self.segments[i], self.starts[i]
            n = min(b, first + seg.size) - a
            yield seg.key, seg.start + a - first, seg.start + a - first + n
            a, i = a + n, i + 1


@dataclass(frozen=True)
class ModelShape:
    """The sizes of the HF model a checkpoint must be, from its config.json."""

    file: Path
    model_type: str
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, file: Path) -> ModelShape:
        try:
            cfg = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RelexError(f"{file}: unreadable HF config ({type(e).__name__}); re-copy "
                             f"it") from None
        cfg = cfg if isinstance(cfg, dict) else {}
        if isinstance(cfg.get("text_config"), dict):  # a multimodal config: the LM's sizes
            cfg = {**cfg["text_config"], **cfg}
        kind = cfg.get("model_type")
        if kind not in FAMILIES:
            raise RelexError(f"{file}: model_type {kind!r}: relex maps Megatron checkpoints of "
                             f"{', '.join(FAMILIES)} models to HF names; convert this one with "
                             f"mbridge or Megatron-Bridge")
        size = {key: _positive(file, key, cfg.get(key)) for key in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
            "vocab_size")}
        heads = size["num_attention_heads"]
        groups = _positive(file, "num_key_value_heads", cfg.get("num_key_value_heads") or heads)
        head_dim = _positive(file, "head_dim", cfg.get("head_dim") or size["hidden_size"] // heads)
        if heads % groups:
            raise RelexError(f"{file}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {groups}; pass the run's HF model config")
        return cls(file, kind, size["num_hidden_layers"], size["hidden_size"], heads, groups,
                   head_dim, size["intermediate_size"], size["vocab_size"],
                   bool(cfg.get("tie_word_embeddings", False)))

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Per-layer stored shapes (name after decoder.layers.) this config implies."""
        h, d, qkv = self.hidden, self.head_dim, (self.heads + 2 * self.groups) * self.head_dim
        out = {QKV: (qkv, h), QKV_BIAS: (qkv,), FC1: (2 * self.ffn, h)}
        by_hf = {"self_attn.o_proj.weight": (h, self.heads * d),
                 "mlp.down_proj.weight": (h, self.ffn),
                 "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
        for rest, hf in PER_LAYER.items():
            out[rest] = by_hf.get(hf, (h,))  # the layer norms
        return out

    def describe(self) -> str:
        return (f"num_hidden_layers={self.layers}, hidden_size={self.hidden}, "
                f"num_attention_heads={self.heads}, num_key_value_heads={self.groups}, "
                f"head_dim={self.head_dim}, intermediate_size={self.ffn}")


def _positive(file: Path, key: str, value) -> int:
    if type(value) is not int or value <= 0:
        raise RelexError(f"{file}: {key} is {short(value)}, not a positive integer; pass the "
                         f"run's HF model config")
    return value


#: Megatron-LM argument -> the HF config value it must equal (ModelShape field, config key)
ARGS = (("num_layers", "layers", "num_hidden_layers"), ("hidden_size", "hidden", "hidden_size"),
        ("num_attention_heads", "heads", "num_attention_heads"),
        ("num_query_groups", "groups", "num_key_value_heads"),
        ("ffn_hidden_size", "ffn", "intermediate_size"), ("kv_channels", "head_dim", "head_dim"))


def common_args(path: Path) -> dict | None:
    """Megatron-LM's arguments saved in common.pt (`args`, an argparse.Namespace), as a dict;
    None when there is no common.pt or it holds none (megatron-core alone, Megatron-Bridge)."""
    file = path / COMMON
    if not file.exists() and not file.is_symlink():
        return None
    state = load(file, extra=InertGlobals())
    args = state.get("args") if isinstance(state, dict) else None
    if isinstance(args, Record):  # an argparse.Namespace: its __dict__ is the pickled state
        state = args.state
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[1] or {}), **(state[0] or {})}
        args = state
    return args if isinstance(args, dict) else None


def check_args(args: dict, shape: ModelShape, where: Path) -> None:
    """Refuse a checkpoint whose Megatron args say another model than the HF config."""
    for key in ("num_experts", "hybrid_override_pattern"):
        if args.get(key):
            raise RelexError(f"{where}: args.{key} = {short(args[key])}: MoE and hybrid Megatron "
                             f"models are not read by relex (dense models only); convert with "
                             f"mbridge or Megatron-Bridge")
    for arg, attr, hf_key in ARGS:
        value = args.get(arg)
        if arg == "num_query_groups" and not args.get("group_query_attention", True):
            value = args.get("num_attention_heads")
        if type(value) is int and value != getattr(shape, attr):
            raise RelexError(f"{where}: args.{arg} = {value} but {shape.file} has {hf_key} = "
                             f"{getattr(shape, attr)}: the checkpoint is another model than "
                             f"that config's; pass the run's HF model as --base")


class _Stored:
    """The stored tensors' shapes, looked up per layer; remembers which keys a layout used."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], layers: int, where: str):
        self.shapes, self.layers, self.where, self.used = shapes, layers, where, set()

    def get(self, rest: str, i: int) -> tuple[str, int, tuple[int, ...]] | None:
        """(key, first element, shape) of layer i's tensor `rest`, stacked or per layer."""
        stacked, single = LAYERS + rest, f"{LAYERS}{i}.{rest}"
        if stacked in self.shapes:
            shape = self.shapes[stacked]
            if not shape or shape[0] != self.layers:
                raise RelexError(f"{self.where}: '{stacked}' stacks {shape[0] if shape else 0} "
                                 f"layers but the "
                                 f"HF config has num_hidden_layers = {self.layers}; pass the "
                                 f"run's HF model config")
            self.used.add(stacked)
            return stacked, i * numel(shape[1:]), shape[1:]
        if single in self.shapes:
            self.used.add(single)
            return single, 0, self.shapes[single]
        return None


def _rows(src: tuple[str, int, tuple[int, ...]], r0: int, r1: int) -> Segment:
    key, first, shape = src
    inner = numel(shape[1:])
    return Segment(key, first + r0 * inner, first + r1 * inner)


def _qkv(src, shape: ModelShape) -> tuple[tuple[Segment, ...], ...]:
    """The q, k and v segments of a fused linear_qkv (weight or bias) of one layer: per query
    group, that group's heads' q rows, then its k rows, then its v rows."""
    d, per = shape.head_dim, shape.heads // shape.groups
    q, k, v = [], [], []
    for g in range(shape.groups):
        r = g * (per + 2) * d
        q.append(_rows(src, r, r + per * d))
        k.append(_rows(src, r + per * d, r + (per + 1) * d))
        v.append(_rows(src, r + (per + 1) * d, r + (per + 2) * d))
    return tuple(q), tuple(k), tuple(v)


def _layer(stored: _Stored, shape: ModelShape, i: int) -> dict[str, StoredRows]:
    """HF tensors of layer i."""
    out, prefix, expected = {}, f"model.layers.{i}.", shape.expected()

    def source(rest):
        src = stored.get(rest, i)
        if src is not None and tuple(src[2]) != expected[rest]:
            raise RelexError(f"{stored.where}: '{src[0]}' has shape {list(src[2])} per layer, "
                             f"but {shape.file} ({shape.describe()}) implies "
                             f"{list(expected[rest])}; pass the run's HF model config")
        return src

    for rest, hf in PER_LAYER.items():
        src = source(rest)
        if src is not None:
            if prefix + hf in out:
                raise RelexError(f"{stored.where}: two stored tensors of layer {i} are its "
                                 f"'{hf}' ('{src[0]}' and another); re-save the checkpoint")
            out[prefix + hf] = StoredRows(tuple(src[2]), (_rows(src, 0, src[2][0]),))
    for rest, suffix in ((QKV, "weight"), (QKV_BIAS, "bias")):
        src = source(rest)
        if src is not None:
            for proj, segs in zip("qkv", _qkv(src, shape)):
                rows = sum(s.size for s in segs) // numel(src[2][1:])
                out[f"{prefix}self_attn.{proj}_proj.{suffix}"] = StoredRows(
                    (rows, *src[2][1:]), segs)
    src = source(FC1)
    if src is not None:
        f = shape.ffn
        out[prefix + "mlp.gate_proj.weight"] = StoredRows((f, shape.hidden), (_rows(src, 0, f),))
        out[prefix + "mlp.up_proj.weight"] = StoredRows((f, shape.hidden), (_rows(src, f, 2 * f),))
    return dict(sorted(out.items(), key=lambda kv: HF_ORDER.index(kv[0][len(prefix):]
                                                                    .rsplit(".", 1)[0])))


def layout(shapes: dict[str, tuple[int, ...]], shape: ModelShape,
           where: str) -> dict[str, StoredRows]:
    """{HF name: StoredRows} for every weight of a dense model stored as `shapes` (Megatron key ->
    global shape), in HF order; refuses any stored tensor it leaves unused, naming it."""
    stored = _Stored(shapes, shape.layers, where)
    out: dict[str, StoredRows] = {}
    vocab = [(EMBEDDING, "model.embed_tokens.weight"), (OUTPUT, "lm_head.weight")]
    if shape.tied == (OUTPUT in shapes):
        what = "stores a separate" if shape.tied else "has no"
        raise RelexError(f"{where}: {shape.file} has tie_word_embeddings = "
                         f"{str(shape.tied).lower()}, but the checkpoint {what} '{OUTPUT}'; "
                         f"pass the run's HF model config")
    for key, hf in vocab[:1]:
        out[hf] = _vocab(stored, key, shape)
    layers = [_layer(stored, shape, i) for i in range(shape.layers)]
    names = set(layers[0])
    for i, got in enumerate(layers):
        if {n.split(".", 3)[3] for n in got} != {n.split(".", 3)[3] for n in names}:
            raise RelexError(f"{where}: layer {i} stores other tensors than layer 0 (a "
                             f"heterogeneous model); relex reads dense Megatron models only")
        out.update(got)
    for key, hf in ((FINAL_NORM, "model.norm.weight"),):
        if shapes.get(key) != (shape.hidden,):
            raise RelexError(f"{where}: '{key}' is {shapes.get(key)}, expected "
                             f"[{shape.hidden}]; the checkpoint is incomplete or another model")
        stored.used.add(key)
        out[hf] = StoredRows((shape.hidden,), (Segment(key, 0, shape.hidden),))
    if not shape.tied:
        out[vocab[1][1]] = _vocab(stored, vocab[1][0], shape)
    left = sorted(set(shapes) - stored.used)
    if left:
        raise RelexError(f"{where}: stored tensor '{left[0]}' ({len(left)} unmapped in all) "
                         f"{_unmapped(left[0])}")
    if not any(".self_attn.q_proj.weight" in n for n in out):
        raise RelexError(f"{where}: no '{LAYERS}{QKV}'; not a GPT checkpoint relex maps")
    return out


def _vocab(stored: _Stored, key: str, shape: ModelShape) -> StoredRows:
    """The first vocab_size rows of a vocabulary-padded embedding or output layer."""
    have = stored.shapes.get(key)
    if have is None or len(have) != 2 or have[1] != shape.hidden or have[0] < shape.vocab:
        raise RelexError(f"{stored.where}: '{key}' is {list(have) if have else 'missing'}; the "
                         f"HF config {shape.file} needs [>= {shape.vocab}, {shape.hidden}] "
                         f"(vocab_size, hidden_size); pass the run's HF model config")
    stored.used.add(key)
    return StoredRows((shape.vocab, shape.hidden), (Segment(key, 0, shape.vocab * shape.hidden),))


def _unmapped(key: str) -> str:
    """Why a stored tensor has no HF counterpart here, and what to do."""
    if re.search(r"\.(experts|router|shared_experts?)\.", key):
        return ("belongs to MoE experts, which relex does not map to HF names (dense models "
                "only); convert with mbridge or Megatron-Bridge")
    if re.search(r"\.(mixer|mamba)\b", key):
        return ("belongs to a hybrid (Mamba) layer, which relex does not map (dense models "
                "only); convert with mbridge or Megatron-Bridge")
    return ("has no Hugging Face counterpart relex knows (a dense Llama / Qwen2 / Qwen3 "
            "layout: rotary, RMSNorm, SwiGLU, no biases but q/k/v); convert with mbridge or "
            "Megatron-Bridge")


def _config_file(path: Path, base: Path | None, hf_config: Path | None) -> Path:
    """The HF config.json of the model a checkpoint at `path` stores (see the module doc)."""
    if hf_config is not None:
        file = Path(hf_config)
        file = file / "config.json" if file.is_dir() else file
        if not file.is_file():
            raise RelexError(f"{hf_config}: no HF config.json there")
        return file
    near = [path, path.parent / "huggingface", path.parent]
    far = [path.parents[i] for i in range(1, min(4, len(path.parents)))]
    far += [d / "huggingface" for d in far]
    for d in near + ([base] if base is not None else []) + far:
        file = d / "config.json"
        if file.is_file() and _is_hf_config(file):
            return file
    if base is not None and detect(base):
        return _config_file(resolve(base), None, None)
    raise RelexError(f"{path}: no HF config.json for this Megatron checkpoint (looked beside "
                     f"it, in its parents and in the base model); pass --hf-config "
                     f"HF_MODEL_DIR/config.json (or the HF model directory as --base)")


def _is_hf_config(file: Path) -> bool:
    try:
        return "model_type" in json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


class MegatronReader(dcp.DCPReader):
    """A Megatron torch_dist checkpoint read as the HF model it stores.

    >>> r = MegatronReader("runs/slime/iter_0000100", base="Qwen2.5-Math-1.5B")
    >>> r.read("model.layers.3.self_attn.k_proj.weight", 0, 4096)   # rows of linear_qkv
    """

    format = NAME
    hint = HINT

    def __init__(self, path, base: str | Path | None = None,
                 hf_config: str | Path | None = None):
        path = Path(path)
        _check_backend(path)
        super().__init__(path)
        where = str(self.path / dcp.METADATA)
        self.model = ModelShape.from_config(_config_file(self.path, base and Path(base),
                                                         hf_config))
        self.meta_dir = self.model.file.parent
        args = common_args(self.path)
        if args is not None:
            with records_of(str(self.path / COMMON)):
                check_args(args, self.model, self.path / COMMON)
        self._buckets: dict[str, Place] | None = None  # see _bucket_masters
        #: {HF name: StoredRows}: where each HF tensor's elements lie in the stored tensors
        self.layout = layout({k: t.shape for k, t in self._chunked.items()
                              if not k.startswith(OPTIMIZER)}, self.model, where)
        for name, place in self.layout.items():
            dtypes = {self._chunked[s.key].dtype for s in place.segments}
            self.tensors[name] = TensorMeta(name, dtypes.pop(), place.shape)

    def _names(self, fqns, planner_data) -> dict[str, str]:
        # extra state and the optimizer's moments hold no weights; its fp32 master copies of
        # the weights are kept for native output (places); stored tensors keep their keys
        return {f: f for f in fqns if "_extra_state" not in f and (
            not f.startswith(OPTIMIZER) or f.startswith(MASTERS) or is_bucket(f))}

    def _add(self, tensor: ChunkedTensor) -> None:
        self._keep(tensor)  # listed under HF names by the layout, not under its own key

    def keeps_optimizer(self) -> bool:
        return any(k.startswith(OPTIMIZER) for k in self.stored_keys)

    def reopen(self, path: Path) -> MegatronReader:
        return MegatronReader(path, hf_config=self.model.file)

    def places(self, name: str) -> list[Place]:
        """The HF tensor `name` in the model's stored tensor and in the optimizer's fp32
        master copy of it, each as boxes in the HF tensor's shape: per segment, the rows of
        each stored chunk it covers. Masters are found where Megatron's optimizers keep them:
        per stored key (Float16Optimizer: optimizer.state.fp32_param.<key>; the distributed
        optimizer saved fully reshardable: optimizer.state.param.<key>) or in the distributed
        optimizer's gradient buckets (its default dp_reshardable layout,
        megatron_optimizer.py). Masters kept any other way are refused: a resumed run would
        copy the old weights back from them."""
        pickled = next((k for k in self.stored_keys if k.startswith(OPTIMIZER + "distributed.")
                        and k.endswith(".param_state")), None)
        if pickled is not None:
            raise RelexError(f"{self.path}: '{pickled}': the distributed optimizer keeps its "
                             f"fp32 master weights pickled here (dp_zero_gather_scatter), where "
                             f"relex cannot write them, and a resumed run would restore the old "
                             f"weights from them; save with the default dp_reshardable layout "
                             f"or --dist-ckpt-optim-fully-reshardable, or use --output-format hf")
        rows = self.layout[name]
        keys = {s.key for s in rows.segments}
        out = [_place(rows, self._chunked, lambda key: key)]
        for prefix in MASTERS:
            if any(prefix + k in self._chunked for k in keys):
                for k in keys:
                    master = self._chunked.get(prefix + k)
                    if master is None or master.shape != self._chunked[k].shape:
                        raise RelexError(
                            f"{self.path}: '{prefix + k}' is "
                            f"{list(master.shape) if master else 'missing'}, not the shape "
                            f"{list(self._chunked[k].shape)} of '{k}' (fp32 master weights "
                            f"saved flattened?); relex cannot write them: save with "
                            f"--dist-ckpt-optim-fully-reshardable, or use --output-format hf")
                out.append(_place(rows, self._chunked, lambda key, p=prefix: p + key))
        buckets = self._bucket_masters()
        if buckets:
            out.append(_place(rows, buckets, lambda key: key))
        return out

    def _bucket_masters(self) -> dict[str, Place]:
        """The distributed optimizer's masters per stored key (found once; {} without)."""
        if self._buckets is None:
            self._buckets = {}
            if any(is_bucket(k) for k in self._chunked):
                self._buckets = bucket_masters(self._chunked, self.model.layers, self._maps,
                                               str(self.path))
        return self._buckets

    def read(self, name, start, stop):
        pieces = list(self.layout[name].pieces(start, stop))
        if len(pieces) == 1:
            key, a, b = pieces[0]
            return self._chunked[key].read(a, b)
        out = torch.empty(stop - start, dtype=DTYPES[self.tensors[name].dtype])
        at = 0
        for key, a, b in pieces:
            out[at: at + b - a] = self._chunked[key].read(a, b)
            at += b - a
        return out

    def release(self, name, start, stop):
        for key, a, b in self.layout[name].pieces(start, stop):
            self._chunked[key].release(a, b)

    def prefetch(self, name, start, stop):
        for key, a, b in self.layout[name].pieces(start, stop):
            self._chunked[key].prefetch(a, b)

    def files(self) -> list[Path]:
        common = self.path / COMMON
        return sorted({*super().files(), *([common] if common.is_file() else [])})


def _place(rows: StoredRows, stored: dict[str, ChunkedTensor | Place], key_of) -> Place:
    """An HF tensor's elements in the stored tensors `key_of(segment key)`, as boxes in the HF
    tensor's shape: each segment is rows of one layer of a stored tensor whose trailing dims
    are the HF tensor's, so the rows of each stored chunk it covers are a box of the HF
    tensor (a view into the chunk's bytes)."""
    trail, chunks, dtype = rows.shape[1:], [], None
    inner = numel(trail)
    for seg, hf_start in zip(rows.segments, rows.starts):
        tensor = stored[key_of(seg.key)]
        dtype, lead = tensor.dtype, len(tensor.shape) - len(trail)  # lead 2: stacked layers
        assert lead in (1, 2) and tuple(tensor.shape[lead:]) == tuple(trail), (seg, tensor.shape)
        per = tensor.shape[lead - 1]
        layer, first = divmod(seg.start // inner, per)
        count = seg.size // inner
        for c in tensor.chunks:
            t, o = c.tensor, c.offsets
            if lead == 2 and not o[0] <= layer < o[0] + t.shape[0]:
                continue
            lo, hi = max(first, o[lead - 1]), min(first + count, o[lead - 1] + t.shape[lead - 1])
            if lo >= hi:
                continue
            at = t.offset + (lo - o[lead - 1]) * t.stride[lead - 1]
            if lead == 2:
                at += (layer - o[0]) * t.stride[0]
            view = StoredTensor(t.storage, at, (hi - lo, *t.shape[lead:]), t.stride[lead - 1:])
            chunks.append(Chunk((hf_start // inner + lo - first, *o[lead:]), view))
    return Place(rows.shape, dtype, tuple(chunks))


def _check_backend(path: Path) -> None:
    """metadata.json must say torch_dist (Megatron's other backend, zarr, is not DCP)."""
    file = path / METADATA_JSON
    try:
        backend = json.loads(file.read_bytes()[: 1 << 20]).get("sharded_backend")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise RelexError(f"{file}: unreadable Megatron metadata ({type(e).__name__}); re-copy "
                         f"the checkpoint") from None
    if backend != "torch_dist":
        raise RelexError(f"{file}: sharded_backend {short(backend)}: relex reads Megatron's "
                         f"torch_dist checkpoints; re-save with --ckpt-format torch_dist")


def resolve(path: Path) -> Path | None:
    """The Megatron checkpoint directory at `path`: `path` itself, the iteration its
    latest_checkpointed_iteration.txt names (a save directory: slime's --save, NeMo-RL's
    policy/weights/), or its only iter_NNNNNNN/ subdirectory; None if none."""
    if (path / METADATA_JSON).is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_bytes()[:64].decode("ascii", "replace").strip()
        sub = path / ("release" if text == "release" else
                      f"iter_{int(text):07d}" if text.isdigit() else "?")
        return sub if (sub / METADATA_JSON).is_file() else None
    subs = [p for p in path.glob("iter_*") if ITERATION.fullmatch(p.name)
            and (p / METADATA_JSON).is_file()] if path.is_dir() else []
    return subs[0] if len(subs) == 1 else None


def detect(path: Path) -> bool:
    return resolve(path) is not None


def reader(path: Path, base: Path | None = None,
           hf_config: Path | None = None) -> MegatronReader:
    return MegatronReader(resolve(path) or path, base=base, hf_config=hf_config)
