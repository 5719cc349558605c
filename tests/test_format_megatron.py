"""Megatron-core torch_dist checkpoints, written by megatron-core itself on CPU.

tests/megatron_run.py (its own process) saves a tiny Qwen2-like GPT (GQA, q/k/v biases, SwiGLU,
RMSNorm, padded vocabulary) along a rank-1 trajectory plus noise with TP=1, the same checkpoints
re-saved with TP=2 on two gloo processes, and a Qwen3-like model (q/k layernorm, tied, bf16),
with Megatron's own logits. The references here are independent of relex's reader: the stored
tensors loaded by torch.distributed.checkpoint into plain tensors and split with numpy reshapes
(the per-group q/k/v layout read from Megatron's sources), Megatron's forward against
transformers' forward of what relex reads, and conftest's float64 SVD + line fit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import relex
from conftest import assert_within_ulp, load_dir, reference, write_tokenizer
from relex.checkpoints.discover import discover
from relex.cli import main
from relex.errors import RelexError
from relex.formats import detect, open_reader
from relex.formats.megatron import MegatronReader

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                reason="megatron-core is not installed")

STEPS = (10, 20, 30, 40)
VOCAB = 100
QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=3,
             hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, vocab_size=VOCAB, tie_word_embeddings=False,
             rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
             torch_dtype="float32")
QWEN3 = dict(QWEN2, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
             num_hidden_layers=2, head_dim=16, intermediate_size=40, tie_word_embeddings=True,
             torch_dtype="bfloat16")


def stored_tensors(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP directory as a plain tensor, loaded by torch itself; with
    a prefix, the optimizer's tensors under it (optimizer.state.fp32_param.), prefix cut."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = dcp.FileSystemReader(str(ckpt)).read_metadata()
    sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
          for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)
          and (prefix or not k.startswith("optimizer."))}
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}


def hf_reference(ckpt: Path, cfg: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The HF state dict of a Megatron checkpoint (or of the optimizer's copies of its
    weights under `prefix`), converted here with numpy reshapes."""
    stored = stored_tensors(ckpt, prefix)
    st = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in stored.items()}
    h, heads, groups = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, per, ffn = cfg.get("head_dim", h // heads), heads // groups, cfg["intermediate_size"]
    out, dtype = {}, {}

    def put(name, key, value):  # each HF tensor in its stored tensor's dtype
        out[name], dtype[name] = value, stored[key].dtype

    put("model.embed_tokens.weight", "embedding.word_embeddings.weight",
        st["embedding.word_embeddings.weight"][:VOCAB])
    put("model.norm.weight", "decoder.final_layernorm.weight", st["decoder.final_layernorm.weight"])
    if not cfg["tie_word_embeddings"]:
        put("lm_head.weight", "output_layer.weight", st["output_layer.weight"][:VOCAB])
    lay = "decoder.layers."
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for key, hf in (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm"),
                        ("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm"),
                        ("self_attention.linear_proj.weight", "self_attn.o_proj"),
                        ("mlp.linear_fc2.weight", "mlp.down_proj"),
                        ("self_attention.q_layernorm.weight", "self_attn.q_norm"),
                        ("self_attention.k_layernorm.weight", "self_attn.k_norm")):
            if lay + key in st:
                put(p + hf + ".weight", lay + key, st[lay + key][i])
        fc1 = lay + "mlp.linear_fc1.weight"
        gate, up = st[fc1][i].reshape(2, ffn, h)
        put(p + "mlp.gate_proj.weight", fc1, gate)
        put(p + "mlp.up_proj.weight", fc1, up)
        for part, tail in (("weight", (h,)), ("bias", ())):
            key = lay + "self_attention.linear_qkv." + part
            if key in st:
                qkv = st[key][i].reshape(groups, per + 2, d, *tail)
                put(p + f"self_attn.q_proj.{part}", key, qkv[:, :per].reshape(heads * d, *tail))
                put(p + f"self_attn.k_proj.{part}", key, qkv[:, per].reshape(groups * d, *tail))
                put(p + f"self_attn.v_proj.{part}", key, qkv[:, per + 1].reshape(groups * d, *tail))
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype[k]) for k, v in out.items()}


def write_hf(path: Path, state: dict[str, torch.Tensor], cfg: dict) -> Path:
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def mega(tmp_path_factory):
    """root/ with qwen2/ (TP=1 run), qwen2_tp2/, qwen3/ and base/ (iter 0 as HF, converted by
    hf_reference)."""
    root = tmp_path_factory.mktemp("megatron")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("megatron_run.py")),
                           str(root)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    write_hf(root / "base", hf_reference(root / "qwen2" / "iter_0000000", QWEN2), QWEN2)
    (root / "qwen3" / "config.json").write_text(json.dumps(QWEN3))
    return root


def _read_all(reader, name: str) -> torch.Tensor:
    return reader.read(name, 0, reader.tensors[name].numel).reshape(reader.tensors[name].shape)


def test_reader_matches_torch_dcp_and_numpy_split(mega):
    rng = random.Random(0)
    for step in (0, *STEPS):
        ckpt = mega / "qwen2" / f"iter_{step:07d}"
        ref = hf_reference(ckpt, QWEN2)
        with open_reader(ckpt, base=mega / "base") as r, \
                open_reader(mega / "qwen2_tp2" / ckpt.name, base=mega / "base") as r2:
            assert isinstance(r, MegatronReader) and set(r.tensors) == set(ref)
            for name, want in ref.items():
                assert r.tensors[name].shape == tuple(want.shape), name
                assert torch.equal(_read_all(r, name), want), name
                assert torch.equal(_read_all(r2, name), want), f"TP=2: {name}"
                n = want.numel()  # ranges across q/k/v group boundaries and chunk edges
                for _ in range(4):
                    a = rng.randrange(n)
                    b = rng.randrange(a, n + 1)
                    assert torch.equal(r.read(name, a, b), want.reshape(-1)[a:b]), (name, a, b)
                    r.release(name, a, b)
            r.verify()
            assert r.meta_dir == mega / "base"  # the HF config came from the base


def _hf_logits(cfg: dict, state: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(conf, torch_dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()},
                                                strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if cfg["tie_word_embeddings"]:
        model.tie_weights()
    from megatron_run import TOKENS
    with torch.no_grad():
        return model(TOKENS).logits.float()


def test_logits_equal_megatron_forward(mega):
    """transformers' forward of what relex reads = Megatron's forward of its weights: the q/k/v
    grouping, gate/up order, folded norms and vocabulary cut mean what relex says."""
    sys.path.insert(0, str(Path(__file__).parent))
    want = torch.load(mega / "qwen2" / "logits.pt")
    for step in (0, 40):
        with open_reader(mega / "qwen2" / f"iter_{step:07d}", base=mega / "base") as r:
            got = _hf_logits(QWEN2, {n: _read_all(r, n).clone() for n in r.tensors})
        assert torch.allclose(got, want[step], atol=1e-4, rtol=1e-4), (
            step, (got - want[step]).abs().max())
    with open_reader(mega / "qwen3" / "iter_0000001") as r:  # config.json beside, bf16, tied
        assert r.meta_dir == mega / "qwen3"
        assert r.tensors["model.layers.1.self_attn.q_proj.weight"].dtype == "BF16"
        assert "lm_head.weight" not in r.tensors
        state = {n: _read_all(r, n).clone() for n in r.tensors}
    got, want = _hf_logits(QWEN3, state), torch.load(mega / "qwen3" / "logits.pt")[1]
    # Megatron computes in bf16, transformers here in fp32: bf16 rounding, not a wrong mapping
    err = (got - want).abs().max() / want.abs().max()
    assert err < 0.03, err


def test_extrapolate_equals_float64_reference(mega, tmp_path):
    """relex extrapolate on the slime-style run dir writes an HF model per target that is the
    float64 rank-1 SVD + line fit of the per-layer, per-HF-weight trajectories."""
    targets = [80, 160]
    rep = relex.extrapolate(mega / "qwen2", base=mega / "base", targets=targets,
                            output=tmp_path / "out", progress=False)
    assert rep is not None
    base = {k: v for k, v in load_dir(mega / "base").items()}
    ckpts = [hf_reference(mega / "qwen2" / f"iter_{s:07d}", QWEN2) for s in STEPS]
    refs = reference(base, ckpts, STEPS, targets)
    for target, ref in zip(targets, refs):
        got = load_dir(tmp_path / "out" / f"step-{target}")
        assert set(got) == set(ref)
        for name, tensor in got.items():
            assert tensor.dtype == torch.float32
            assert_within_ulp(tensor, ref[name], name, base[name].double().numpy())
    out = tmp_path / "out" / "step-160"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert (out / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # the TP=2 run gives the same bytes
    relex.extrapolate(mega / "qwen2_tp2", base=mega / "base", targets=targets,
                      output=tmp_path / "out2", progress=False)
    a, b = load_dir(out), load_dir(tmp_path / "out2" / "step-160")
    assert all(torch.equal(a[k], b[k]) for k in a)


ADAM = dict(QWEN2, torch_dtype="bfloat16")
ADAM_STEPS = (2, 4, 6, 8)


def _megatron_load(ckpt: Path, out: Path, how: list[str] = ("--load",)) -> list[dict]:
    """Each rank's state after Megatron-style resuming from `ckpt` (megatron_run.py)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("megatron_run.py")),
                           *how, str(ckpt), str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def test_native_output_resumes_in_megatron(mega, tmp_path):
    """--output-format native on a bf16 TP=2 run with Adam on fp32 masters (Float16Optimizer
    layout): the copy of iter_0000008 holds the extrapolated weights in the model's tensors
    (each in its dtype: bf16, fp32 norms) and in the masters (fp32, = relex's fp32 HF output, within 1 ulp of
    the float64 fit), Adam's moments and everything else as saved; Megatron loads it at TP=2
    with the same moments and step as the last real checkpoint and its forward is the HF
    output's."""
    run = mega / "adam"
    base = write_hf(tmp_path / "base", hf_reference(run / "iter_0000000", ADAM), ADAM)
    relex.extrapolate(run, base=base, targets=[16], output=tmp_path / "hf", dtype="float32",
                      progress=False)
    relex.extrapolate(run, base=base, targets=[16], output=tmp_path / "nat",
                      output_format="native", progress=False)
    step = tmp_path / "nat" / "step-16"
    ckpt, last = step / "iter_0000008", run / "iter_0000008"
    assert (step / "latest_checkpointed_iteration.txt").read_text() == "8"
    native = json.loads((step / "relex.json").read_text())["native"]
    assert native["resume_step"] == 8 and "--load " + str(step) in native["resume"]
    assert (ckpt / "common.pt").read_bytes() == (last / "common.pt").read_bytes()
    want = load_dir(tmp_path / "hf" / "step-16")
    masters = hf_reference(ckpt, ADAM, "optimizer.state.fp32_param.")
    weights = hf_reference(ckpt, ADAM)
    observed = [hf_reference(run / f"iter_{s:07d}", ADAM) for s in ADAM_STEPS]
    basis = load_dir(base)
    ref = reference(basis, observed, ADAM_STEPS, [16])[0]
    assert set(masters) == set(want) == set(weights)
    for name, value in want.items():
        assert torch.equal(masters[name], value), name
        assert torch.equal(weights[name], value.to(weights[name].dtype)), name
        assert_within_ulp(value, ref[name], name, basis[name].double().numpy())
    assert not torch.equal(weights["model.layers.1.self_attn.k_proj.weight"],
                           observed[-1]["model.layers.1.self_attn.k_proj.weight"])
    for moment in ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."):
        a, b = stored_tensors(ckpt, moment), stored_tensors(last, moment)
        assert a and all(torch.equal(a[k], b[k]) for k in b)
    resumed = _megatron_load(ckpt, tmp_path / "resumed.pt")
    real = _megatron_load(last, tmp_path / "real.pt")
    for got, was in zip(resumed, real):
        assert got["step"] == was["step"] == 8
        for key in ("exp_avg", "exp_avg_sq"):
            assert all(torch.equal(a, b) for a, b in zip(got[key], was[key])), key
        assert all(torch.equal(w, m.to(w.dtype)) for w, m in zip(got["weights"], got["masters"]))
    logits = _hf_logits(ADAM, {k: v.to(torch.bfloat16) for k, v in want.items()})
    err = (logits - resumed[0]["logits"]).abs().max() / logits.abs().max()
    assert err < 0.03, err  # Megatron computes in bf16, transformers here in fp32
    moved = (logits - real[0]["logits"]).abs().max() / logits.abs().max()
    assert moved > 5 * err, (moved, err)  # and it is the jumped model, not the last real one
    # relex jump writes the same checkpoint, with the slime / Megatron-LM resume command
    relex.jump(run, base=base, ahead=8, output=tmp_path / "jumps", progress=False)
    record = json.loads((tmp_path / "jumps" / "jump-1" / "jump.json").read_text())
    assert record["resume_step"] == 8 and "--load" in record["resume"]
    jumped = hf_reference(tmp_path / "jumps" / "jump-1" / "step-16" / "iter_0000008", ADAM,
                          "optimizer.state.fp32_param.")
    assert all(torch.equal(jumped[k], masters[k]) for k in masters)


def megatron_tensors(hf: dict[str, torch.Tensor], cfg: dict, padded: int = 128) -> dict:
    """HF tensors put back into Megatron's stored layout (the inverse of hf_reference, written
    here): layers stacked, q/k/v interleaved per query group, [gate; up], the vocabulary
    padded with NaN rows (never compared)."""
    h, heads, groups = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, layers = h // heads, cfg["num_hidden_layers"]
    per = heads // groups
    np_ = {k: v.double().numpy() for k, v in hf.items()}

    def vocab(name):
        out = np.full((padded, h), np.nan)
        out[:VOCAB] = np_[name]
        return out
    out = {"embedding.word_embeddings.weight": vocab("model.embed_tokens.weight"),
           "output_layer.weight": vocab("lm_head.weight"),
           "decoder.final_layernorm.weight": np_["model.norm.weight"]}
    stack = {"self_attention.linear_qkv.layer_norm_weight": [], "mlp.linear_fc1.layer_norm_weight":
             [], "self_attention.linear_proj.weight": [], "mlp.linear_fc2.weight": [],
             "mlp.linear_fc1.weight": [], "self_attention.linear_qkv.weight": [],
             "self_attention.linear_qkv.bias": []}
    for i in range(layers):
        p = f"model.layers.{i}."
        stack["self_attention.linear_qkv.layer_norm_weight"].append(np_[p + "input_layernorm.weight"])
        stack["mlp.linear_fc1.layer_norm_weight"].append(np_[p + "post_attention_layernorm.weight"])
        stack["self_attention.linear_proj.weight"].append(np_[p + "self_attn.o_proj.weight"])
        stack["mlp.linear_fc2.weight"].append(np_[p + "mlp.down_proj.weight"])
        stack["mlp.linear_fc1.weight"].append(np.concatenate(
            [np_[p + "mlp.gate_proj.weight"], np_[p + "mlp.up_proj.weight"]]))
        for part, tail in (("weight", (h,)), ("bias", ())):
            q = np_[p + f"self_attn.q_proj.{part}"].reshape(groups, per * d, *tail)
            k = np_[p + f"self_attn.k_proj.{part}"].reshape(groups, d, *tail)
            v = np_[p + f"self_attn.v_proj.{part}"].reshape(groups, d, *tail)
            stack[f"self_attention.linear_qkv.{part}"].append(
                np.concatenate([q, k, v], axis=1).reshape(-1, *tail))
    out.update({"decoder.layers." + k: np.stack(v) for k, v in stack.items()})
    return out


def _local(stored: dict, name: str, info: dict, tp_rank: int, tp: int) -> np.ndarray:
    """The TP-local part of a stored tensor a parameter is, from where Megatron's sharded
    state says it lies (its key and global offset; SwiGLU's fc1, a factory: its gate and up
    halves)."""
    key, offsets, factory = info["where"]
    shape, full = info["shape"], stored[key]
    if factory:  # linear_fc1 of layer i: rows [r F/tp, (r+1) F/tp) of gate and of up
        layer, half = int(name.split(".")[2]), shape[0] // 2
        ffn = full.shape[1] // 2
        rows = full[layer]
        return np.concatenate([rows[tp_rank * half:(tp_rank + 1) * half],
                               rows[ffn + tp_rank * half: ffn + (tp_rank + 1) * half]])
    if len(offsets) > len(shape):  # stacked: the first offset is the layer
        full, offsets = full[offsets[0]], offsets[1:]
    return full[tuple(slice(o, o + s) for o, s in zip(offsets, shape))]


@pytest.mark.parametrize("run,tp,dp", [("distopt_tp2", 2, 1), ("distopt_dp2", 1, 2)])
def test_native_output_into_the_distributed_optimizers_buckets(mega, tmp_path, run, tp, dp):
    """Megatron-LM's default with --use-distributed-optimizer: masters and moments in gradient
    buckets (dp_reshardable), saved by megatron-core's own DDP + distributed optimizer with TP=2
    or DP=2. relex finds each weight's masters and writes relex's fp32 extrapolation there;
    Megatron loads the output at the same TP/DP and every rank's masters are that extrapolation
    at the positions Megatron's own sharded state gives (the vocabulary padding excepted),
    its bf16 weights those rounded, its moments the last real checkpoint's."""
    base = write_hf(tmp_path / "base", hf_reference(mega / run / "iter_0000000", ADAM), ADAM)
    relex.extrapolate(mega / run, base=base, targets=[16], output=tmp_path / "hf",
                      dtype="float32", progress=False)
    relex.extrapolate(mega / run, base=base, targets=[16], output=tmp_path / "nat",
                      output_format="native", progress=False)
    want = load_dir(tmp_path / "hf" / "step-16")
    assert all(torch.equal(v, want[k].to(v.dtype)) for k, v in hf_reference(
        tmp_path / "nat" / "step-16" / "iter_0000008", ADAM).items())
    stored = megatron_tensors(want, ADAM)
    resumed = _megatron_load(tmp_path / "nat" / "step-16" / "iter_0000008",
                             tmp_path / "resumed.pt", ["--load-distopt", str(tp), str(dp)])
    real = _megatron_load(mega / run / "iter_0000008", tmp_path / "real.pt",
                          ["--load-distopt", str(tp), str(dp)])
    checked = 0
    for got, was in zip(resumed, real):
        assert got["owned"].keys() == was["owned"].keys()
        for name, info in got["owned"].items():
            lo, hi = info["range"]
            expect = _local(stored, name, info, got["tp_rank"], tp).reshape(-1)[lo:hi]
            known = ~np.isnan(expect)
            master = info["param"].double().numpy()
            assert np.array_equal(master[known], expect[known]), name
            assert not torch.equal(info["param"], was["owned"][name]["param"]), name
            assert torch.equal(info["param"].to(torch.bfloat16),
                               info["weight"].reshape(-1)[lo:hi]), name
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(info[k], was["owned"][name][k]), (name, k)
            checked += int(known.sum())
    assert checked >= sum(v.numel() for v in want.values())  # each element, once or more


def test_native_output_refuses_unplaceable_masters(mega, tmp_path):
    """A distributed-optimizer bucket whose values match no weight (a layout relex does not
    know) refuses native output in one line naming the bucket; nothing is written. The same
    checkpoint re-saved whole by torch DCP (one chunk per tensor, layers and DP pieces
    merged) is written."""
    import torch.distributed.checkpoint as dcp
    base = write_hf(tmp_path / "base", hf_reference(mega / "distopt_dp2" / "iter_0000000",
                                                    ADAM), ADAM)
    for shift in (0.0, 1.0):
        run = tmp_path / f"run{shift}"
        shutil.copytree(mega / "distopt_dp2", run)
        last = run / "iter_0000008"
        md = dcp.FileSystemReader(str(last)).read_metadata()
        sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
              for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
        dcp.load(sd, checkpoint_id=str(last), no_dist=True)
        bucket = next(k for k in sd if k.endswith("bucket_idx_0.param"))
        sd[bucket] = sd[bucket] + shift  # 1.0: no weight rounds from these masters any more
        shutil.rmtree(last)
        dcp.save(sd, checkpoint_id=str(last), no_dist=True)
        for f in ("metadata.json", "common.pt"):
            shutil.copy(mega / "distopt_dp2" / "iter_0000008" / f, last)
        out = tmp_path / f"nat{shift}"
        if not shift:
            relex.extrapolate(run, base=base, targets=[16], output=out,
                              output_format="native", progress=False)
            continue
        with pytest.raises(RelexError, match=r"no weight of TP rank 0 matches the distributed "
                                             r"optimizer's masters at element 0 of "
                                             r"'optimizer\.distributed\.dp_group_idx_0"):
            relex.extrapolate(run, base=base, targets=[16], output=out,
                              output_format="native", progress=False)
        assert not out.exists()


# ----------------------------------------------------------------------------- bad input
def _copy(mega, tmp_path, step=40) -> Path:
    dst = tmp_path / f"iter_{step:07d}"
    shutil.copytree(mega / "qwen2" / dst.name, dst)
    return dst


def _refused(ckpt: Path, base, pattern: str, **kw) -> str:
    with pytest.raises(RelexError) as e:
        MegatronReader(ckpt, base=base, **kw)
    msg = str(e.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    return msg


def _common(ckpt: Path, **args) -> None:
    """Replace common.pt with Megatron-LM-like args (the test's own values)."""
    ns = dict(num_layers=3, hidden_size=32, num_attention_heads=4, group_query_attention=True,
              num_query_groups=2, ffn_hidden_size=48, kv_channels=8, num_experts=None)
    ns.update(args)
    torch.save({"args": argparse.Namespace(**ns), "iteration": 40}, ckpt / "common.pt")


def test_missing_or_unreadable_files(mega, tmp_path):
    ckpt = _copy(mega, tmp_path)
    (ckpt / ".metadata").unlink()
    _refused(ckpt, mega / "base", rf"{ckpt}/.metadata: is missing, so this torch DCP")
    ckpt = _copy(mega, tmp_path, 30)
    (ckpt / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    _refused(ckpt, mega / "base", r"metadata.json: sharded_backend 'zarr'.*torch_dist")
    (ckpt / "metadata.json").write_text("{not json")
    _refused(ckpt, mega / "base", r"metadata.json: unreadable Megatron metadata")
    ckpt = _copy(mega, tmp_path, 20)
    _refused(ckpt, None, r"no HF config.json for this Megatron checkpoint.*--base")


def test_config_mismatch_is_refused_naming_the_key(mega, tmp_path):
    ckpt = _copy(mega, tmp_path)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({**QWEN2, "num_key_value_heads": 4}))
    _refused(ckpt, mega / "base", r"common.pt: args.num_query_groups = 2 but .*cfg/config.json "
                                  r"has num_key_value_heads = 4", hf_config=cfg)
    torch.save({}, ckpt / "common.pt")  # megatron-core alone saves no args: the shapes decide
    for key, value, pattern in (
            ("num_key_value_heads", 4, (r"linear_qkv.weight' has shape \[64, 32\] per layer, "
                                        r"but .* num_key_value_heads=4")),
            ("num_hidden_layers", 2, r"stacks 3 layers but .* num_hidden_layers = 2"),
            ("vocab_size", 200, r"embedding.word_embeddings.weight' is \[128, 32\].*vocab_size"),
            ("tie_word_embeddings", True, (r"tie_word_embeddings = true, but the checkpoint "
                                           r"stores a separate 'output_layer.weight'")),
            ("model_type", "gemma", r"model_type 'gemma'")):
        (cfg / "config.json").write_text(json.dumps({**QWEN2, key: value}))
        _refused(ckpt, mega / "base", pattern, hf_config=cfg)
    # Megatron-LM's args (common.pt) saying another model than the HF config
    _common(ckpt, num_query_groups=4)
    _refused(ckpt, mega / "base", r"common.pt: args.num_query_groups = 4 but .*config.json has "
                                  r"num_key_value_heads = 2")
    _common(ckpt, num_experts=8)
    _refused(ckpt, mega / "base", r"common.pt: args.num_experts = 8: MoE")
    _common(ckpt)
    MegatronReader(ckpt, base=mega / "base").close()


def _with_extra_tensor(mega, tmp_path, key: str, shape) -> Path:
    """The step-40 checkpoint re-saved by torch DCP with one more stored tensor."""
    import torch.distributed.checkpoint as dcp
    src = mega / "qwen2" / "iter_0000040"
    dst = tmp_path / "extra"
    sd = {**stored_tensors(src), key: torch.zeros(shape)}
    dcp.save(sd, checkpoint_id=str(dst), no_dist=True)
    for f in ("metadata.json", "common.pt"):
        shutil.copy(src / f, dst)
    return dst


@pytest.mark.parametrize("key,pattern", [
    ("decoder.layers.mlp.experts.linear_fc1.weight0", "MoE experts"),
    ("decoder.layers.mlp.router.weight", "MoE experts"),
    ("decoder.layers.mixer.in_proj.weight", "hybrid"),
    ("embedding.position_embeddings.weight", "no Hugging Face counterpart")])
def test_unmapped_tensors_are_refused(mega, tmp_path, key, pattern):
    ckpt = _with_extra_tensor(mega, tmp_path, key, (3, 4, 32))
    _refused(ckpt, mega / "base", rf"stored tensor '{key}' \(1 unmapped in all\) .*{pattern}")


# ----------------------------------------------------------------------------- damaged files
def _run_cli(capsys, run: Path, base: Path, out: Path) -> tuple[int, str]:
    code = main(["extrapolate", str(run), "--base", str(base), "--target", "80", "--output",
                 str(out), "-q"])
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def clean_out(mega, tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron-out") / "out"
    assert main(["extrapolate", str(mega / "qwen2"), "--base", str(mega / "base"), "--target",
                 "80", "--output", str(out), "-q"]) == 0
    return load_dir(out / "step-80")


def _fuzz(capsys, mega, clean_out, tmp_path, n: int, seed: int) -> dict:
    """n seeded mutations (test_torch_damage's) of one file each of a copy of the run: every
    one is refused with one line naming the file (or its directory), or gives the same output
    (CRC-consistent rewrites of a pickle may give another)."""
    from test_errors import tree_digest
    from test_torch_damage import _mutate, _mutate_plain
    run = tmp_path / "run"
    shutil.copytree(mega / "qwen2", run, ignore=shutil.ignore_patterns("logits.pt"))
    files = [f for s in STEPS for f in sorted((run / f"iter_{s:07d}").iterdir())]
    rng, tally = random.Random(seed), {}
    for case in range(n):
        f = rng.choice(files)
        raw = f.read_bytes()
        if f.suffix in (".distcp", ".pt"):
            what, damaged, consistent = _mutate(raw, rng)
        else:  # .metadata and metadata.json: plain bytes, no checksum
            what, damaged, consistent = _mutate_plain(raw, rng)
        f.write_bytes(damaged)
        before, started = tree_digest(run), time.perf_counter()
        try:
            code, err = _run_cli(capsys, run, mega / "base", tmp_path / "out")
            assert tree_digest(run) == before, "inputs were modified"
        finally:
            f.write_bytes(raw)
        assert time.perf_counter() - started < 30
        if code == 0:
            got = load_dir(tmp_path / "out" / "step-80")
            same = all(torch.equal(got[k], clean_out[k]) for k in clean_out)
            assert same or consistent, f"case {case} ({what} of {f.name}): other output"
            shutil.rmtree(tmp_path / "out")
        else:
            lines = [x for x in err.splitlines() if not x.startswith("relex: warning:")]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("relex: error: "), err
            assert str(f) in err or str(f.parent) in err or consistent, (case, what, err)
            assert not (tmp_path / "out").exists()
        key = f"{what}: " + ("refused" if code else "same output")
        tally[key] = tally.get(key, 0) + 1
    return tally


def test_fuzz_fast(capsys, mega, clean_out, tmp_path):
    """12 mutations in the default suite (the slow test runs 150)."""
    tally = _fuzz(capsys, mega, clean_out, tmp_path, 12, seed=1)
    assert sum(v for k, v in tally.items() if k.endswith("refused")) >= 6, tally


@pytest.mark.slow
def test_fuzz(capsys, mega, clean_out, tmp_path):
    tally = _fuzz(capsys, mega, clean_out, tmp_path, 150, seed=0)
    print(f"\nmegatron: 150 mutations: {json.dumps(dict(sorted(tally.items())))}")
    assert not any(k.startswith("flip-tensor-bytes: same") for k in tally), tally
