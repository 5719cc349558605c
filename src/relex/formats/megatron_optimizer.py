"""Where Megatron's distributed optimizer keeps its fp32 master weights: gradient buckets.

With `--use-distributed-optimizer` Megatron-LM (and slime) saves the optimizer in the
`dp_reshardable` layout (megatron-core >= 0.14's default): per TP rank (`dp_group_idx_<r>`),
per gradient buffer and bucket, one flat fp32 tensor each for the masters and Adam's moments,
`optimizer.distributed.dp_group_idx_<r>.gbuf_idx_<g>.dtype_<...>.bucket_idx_<b>.param`, of the
bucket's unpadded length, split across the data-parallel ranks' files. Inside a bucket the
rank's local parameters lie end to end, in reverse registration order, each starting at a
multiple of 64 elements (megatron-core 0.16.1: distributed/param_and_grad_buffer.py
`_ParamAndGradBuffer.__init__`, distrib_optimizer.py `sharded_param_state_dp_reshardable`).

The checkpoint does not say which parameter is where, and the registration order depends on
the layer implementation (the local spec and Transformer Engine's fused layer-norm linears
differ), so `bucket_masters` finds each parameter by its values: the stored bf16 weight is the
master rounded (the optimizer copies masters to the model after every step), so at each
64-aligned position of a bucket exactly the parameter that lies there matches, element for
element. The expected order (reverse registration order of megatron-core's GPT model) is tried
first and breaks ties between parameters with equal values; a match off that order must be the
only one (two equal-valued weights in an unknown order refuse). Nothing that does not match is
written: an unplaced parameter or bucket position refuses native output in one line.

A TP rank's local parameter is its pieces of the stored global tensor: one chunk per layer
along the split dim (rows for q/k/v and the vocabulary, columns for linear_proj and
linear_fc2), two for SwiGLU's linear_fc1 (its gate part and its up part), the whole tensor
for replicated norms; flattened row-major and concatenated, as the rank holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from relex.errors import RelexError
from relex.formats.base import numel
from relex.formats.chunked import Chunk, ChunkedTensor, Place
from relex.formats.unpickler import StoredTensor

BUCKET = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(.*)"
                    r"\.bucket_idx_(\d+)\.param")
#: a parameter's first element lies at a multiple of this many elements in its bucket
ALIGN = 64
#: elements compared at a candidate position: the head of the parameter, and its tail
HEAD, TAIL = 1024, 64
#: the stored keys of a GPT layer in the order megatron-core registers their parameters
LAYER_ORDER = ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight",
               "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
               "self_attention.linear_qkv.bias", "self_attention.q_layernorm.weight",
               "self_attention.k_layernorm.weight", "pre_mlp_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
               "mlp.linear_fc2.weight")


@dataclass
class Local:
    """One TP rank's parameter: its stored key, layer (None: not stacked), the stored chunks
    it is made of (in local order) and its element count."""

    key: str
    layer: int | None
    pieces: list[Chunk]
    numel: int


def is_bucket(key: str) -> bool:
    return BUCKET.fullmatch(key) is not None


def registration_order(keys: set[str], layers: int, prefix: str = "decoder.layers.") -> list:
    """(stored key, layer) of a GPT model's parameters in megatron-core's registration order."""
    order = [("embedding.word_embeddings.weight", None)]
    for i in range(layers):
        for rest in LAYER_ORDER:
            if prefix + rest in keys:
                order.append((prefix + rest, i))
            elif f"{prefix}{i}.{rest}" in keys:
                order.append((f"{prefix}{i}.{rest}", None))
    order += [(k, None) for k in ("decoder.final_layernorm.weight", "output_layer.weight")]
    return [(k, i) for k, i in order if k in keys]


def bucket_masters(stored: dict[str, ChunkedTensor], layers: int, maps,
                   where: str) -> dict[str, Place]:
    """{model key: a Place of its masters, boxes of the model key's shape viewing the bucket
    tensors; not an exact cover: every TP rank keeps its own copy of a replicated weight (the
    norms), each a box here}: what native output writes for them."""
    groups: dict[int, list[tuple[tuple[int, int], ChunkedTensor]]] = {}
    for key, tensor in stored.items():
        m = BUCKET.fullmatch(key)
        if m:
            groups.setdefault(int(m[1]), []).append(((int(m[2]), int(m[4])), tensor))
    model = {k: t for k, t in stored.items() if not k.startswith("optimizer.")}
    tp = len(groups)
    order = registration_order(set(model), layers)
    locals_ = {r: [_local(model[k], k, i, tp, r, where) for k, i in reversed(order)]
               for r in range(tp)}
    found: dict[str, list[Chunk]] = {k: [] for k in model}
    dtypes: dict[str, set[str]] = {}  # the masters' dtype per key (its bucket's)
    for r, buckets in sorted(groups.items()):
        left = list(locals_[r])
        for _, bucket in sorted(buckets, key=lambda b: b[0]):
            pos = 0
            while pos < bucket.shape[0]:
                fits = [p for p in left if pos + p.numel <= bucket.shape[0]]
                hit = next((p for p in fits if _matches(p, bucket, pos, maps)), None)
                if hit is None:
                    raise RelexError(f"{where}: no weight of TP rank {r} matches the "
                                     f"distributed optimizer's masters at element {pos} of "
                                     f"'{bucket.name}' (a layout relex does not know); relex "
                                     f"cannot write them: use --output-format hf")
                if hit is not left[0]:  # off the expected order: it must be the only match
                    other = next((p for p in fits if p is not hit and p.numel == hit.numel
                                  and _matches(p, bucket, pos, maps)), None)
                    if other is not None:
                        raise RelexError(
                            f"{where}: '{hit.key}' and '{other.key}' of TP rank {r} both match "
                            f"the distributed optimizer's masters at element {pos} of "
                            f"'{bucket.name}' (equal values) in an order relex does not know, "
                            f"so it cannot tell whose masters these are: use --output-format hf")
                left.remove(hit)
                _place_local(hit, bucket, pos, found[hit.key])
                dtypes.setdefault(hit.key, set()).add(bucket.dtype)
                pos += -(-hit.numel // ALIGN) * ALIGN
        if left:
            layer = "" if left[0].layer is None else f" (layer {left[0].layer})"
            raise RelexError(f"{where}: '{left[0].key}'{layer} of TP rank {r} is in none of "
                             f"the distributed optimizer's buckets (a frozen weight, or "
                             f"pipeline parallel, which relex does not place); relex cannot "
                             f"write its masters: use --output-format hf")
    mixed = next((k for k, d in dtypes.items() if len(d) > 1), None)
    if mixed is not None:
        raise RelexError(f"{where}: the masters of '{mixed}' are kept in buckets of different "
                         f"dtypes ({', '.join(sorted(dtypes[mixed]))}); relex cannot write "
                         f"them: use --output-format hf")
    return {k: Place(model[k].shape, dtypes[k].pop(), tuple(chunks))
            for k, chunks in found.items() if chunks}


def _local(tensor: ChunkedTensor, key: str, layer: int | None, tp: int, rank: int,
           where: str) -> Local:
    """TP rank `rank`'s parameter (key, layer): its chunks of the stored tensor."""
    chunks = tensor.chunks if layer is None else [
        _layer_of(c, layer) for c in tensor.chunks
        if c.offsets[0] <= layer < c.offsets[0] + c.tensor.shape[0]]
    lead = 0 if layer is None else 1
    dims = [d for d in range(lead, len(tensor.shape))
            if len({c.offsets[d] for c in chunks}) > 1]
    if not dims:
        pieces = chunks
    else:
        split = sorted(chunks, key=lambda c: c.offsets[dims[0]])
        if len(dims) > 1 or len(split) not in (tp, 2 * tp):
            raise RelexError(f"{where}: '{key}' is split in {len(split)} pieces along "
                             f"{len(dims)} dims, not the {tp} tensor-parallel ranks the "
                             f"distributed optimizer has; relex cannot place its masters: use "
                             f"--output-format hf")
        pieces = [split[rank]] if len(split) == tp else [split[rank], split[tp + rank]]
    return Local(key, layer, pieces, sum(c.tensor.numel for c in pieces))


def _layer_of(c: Chunk, layer: int) -> Chunk:
    """Layer `layer` of a chunk of a stacked tensor (Megatron saves one per layer; a chunk
    may hold several)."""
    t = c.tensor
    if t.shape[0] == 1:
        return c
    view = StoredTensor(t.storage, t.offset + (layer - c.offsets[0]) * t.stride[0],
                        (1, *t.shape[1:]), t.stride)
    return Chunk((layer, *c.offsets[1:]), view)


def _values(p: Local, a: int, b: int, maps) -> torch.Tensor:
    """Elements [a, b) of the local parameter, as stored (its weight dtype)."""
    pieces, at = [], 0
    for c in p.pieces:
        pieces.append((at, c))
        at += c.tensor.numel
    return _runs(pieces, a, b, maps)


def _runs(pieces, a: int, b: int, maps) -> torch.Tensor:
    """Elements [a, b) of contiguous stored pieces laid end to end (a bucket's DP chunks:
    Chunks at 1-D offsets; a parameter's pieces: (first element, Chunk)), read straight from
    the mapped files: a few elements, so no CRC check of whole bucket members is triggered
    (a damaged byte fails the match instead)."""
    out = []
    for piece in pieces:
        at, c = (piece.offsets[0], piece) if isinstance(piece, Chunk) else piece
        t = c.tensor
        lo, hi = max(a, at), min(b, at + t.numel)
        if lo < hi:
            run = StoredTensor(t.storage, t.offset + lo - at, (hi - lo,), (1,))
            out.append(run.view(maps))
    return torch.cat(out)


def _matches(p: Local, bucket: ChunkedTensor, pos: int, maps) -> bool:
    """Whether the masters at `pos` round to the parameter's stored values (its head and
    tail)."""
    for a, b in ((0, min(HEAD, p.numel)), (max(0, p.numel - TAIL), p.numel)):
        weight = _values(p, a, b, maps)
        master = _runs(bucket.chunks, pos + a, pos + b, maps).to(weight.dtype)
        if not torch.equal(master, weight):
            return False
    return True


def _place_local(p: Local, bucket: ChunkedTensor, pos: int, out: list[Chunk]) -> None:
    """Chunks of the masters' virtual tensor for parameter `p` at element `pos` of `bucket`:
    each piece of the weight, cut where the bucket's data-parallel pieces end, as boxes in the
    stored tensor's coordinates viewing the bucket's bytes."""
    at = pos
    for c in p.pieces:
        shape, base = c.tensor.shape, c.offsets
        lead = 0 if p.layer is None else 1
        rows, inner = shape[lead:], numel(shape[lead + 1:])
        for d in bucket.chunks:  # the data-parallel pieces of the bucket (1-D)
            lo = max(at, d.offsets[0])
            hi = min(at + c.tensor.numel, d.offsets[0] + d.tensor.numel)
            if lo >= hi:
                continue
            for first, count, col, width in _row_boxes(lo - at, hi - at, inner):
                size = (count, *rows[1:]) if width is None else (1, width)
                offs = (base[lead] + first, *base[lead + 1:]) if width is None else \
                    (base[lead] + first, base[lead + 1] + col)
                start = at + first * inner + (col or 0) - d.offsets[0]  # in the DP piece
                view = StoredTensor(d.tensor.storage, d.tensor.offset + start,
                                    (1,) * lead + size, _strides((1,) * lead + size))
                out.append(Chunk((*base[:lead], *offs), view))
        at += c.tensor.numel


def _row_boxes(a: int, b: int, inner: int):
    """Elements [a, b) of a row-major (rows, inner) block as boxes: (first row, row count,
    None, None) for whole rows, (row, 1, first column, width) for a part of one row."""
    if inner == 1 or (a % inner == 0 and b % inner == 0):
        yield a // inner, (b - a) // inner, None, None
        return
    first, last = -(-a // inner), b // inner
    if a % inner:
        row = a // inner
        yield row, 1, a % inner, min(b, (row + 1) * inner) - a
        if b <= (row + 1) * inner:
            return
    if last > first:
        yield first, last - first, None, None
    if b % inner:
        yield last, 1, 0, b % inner


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, n = [], 1
    for s in reversed(shape):
        out.append(n)
        n *= s
    return tuple(reversed(out))
