"""Tiny real models and synthetic RLVR-like trajectories, plus a float64 reference of RELEX.

Everything is built locally from a transformers config: no hub access.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

def pytest_report_header(config):
    """The CPU and the matrix-product code path, since float results depend on both: torch's CPU
    matrix products go through MKL, whose summation order follows the CPU unless MKL_CBWR pins
    it. The numeric tests hold under every path (bounds in ulp of a float64 reference)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    return (f"cpu: {model}; torch {torch.__version__} cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()}; "
            f"MKL_CBWR={os.environ.get('MKL_CBWR', '(unset: the CPU decides)')}")


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(arch: str = "qwen2", tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=tied, **TINY))
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **TINY))


def write_tokenizer(path: Path) -> None:
    """A real (tiny, word-level) fast tokenizer with a chat template, saved like a trainer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [str(i) for i in range(90)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def trajectory_state(base: dict[str, torch.Tensor], step: float, seed: int = 1,
                     noise: float = 0.05, curve: float = 0.0) -> dict[str, torch.Tensor]:
    """theta_step = theta_0 + sum_i c_i(step) v_i + noise, per tensor (float64).

    Three fixed random directions per tensor (seeded by name) with strengths 1, 0.3, 0.1 and
    profiles linear (+ `curve` x quadratic), sqrt and log, plus fresh noise per step: a
    low-rank-plus-noise trajectory like RLVR's, with well separated singular values. Updates
    are ~1% of the weights at step 50, as in real runs.
    """
    out = {}
    for i, (name, t) in enumerate(base.items()):
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        g = torch.Generator().manual_seed(seed * 1000 + i)
        v = torch.randn((3, *t.shape), generator=g, dtype=torch.float64)
        a = 2e-4 * (1 + torch.rand(1, generator=g, dtype=torch.float64).item())
        g2 = torch.Generator().manual_seed(seed * 1000 + i + int(step * 7919) % 100003)
        n = torch.randn(t.shape, generator=g2, dtype=torch.float64)
        scale = t.double().std().item() if t.numel() > 1 else 1.0
        scale = scale if scale > 0 else 1.0
        c = (a * step * (1 + curve * step / 100), 0.3 * a * 5 * math.sqrt(step),
             0.1 * a * 10 * math.log1p(step))
        delta = sum(ci * vi for ci, vi in zip(c, v)) + noise * a * math.sqrt(step) * n
        out[name] = t.double() + scale * delta
    return out


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict,
                    dtype: torch.dtype | None, shards: int = 1, tokenizer_from: Path | None = None,
                    ) -> None:
    """Write an HF model dir with safetensors (optionally sharded + index) and config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, per = {}, math.ceil(len(names) / shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = dict(config)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (path / f.name).write_bytes(f.read_bytes())


def make_run(root: Path, *, steps=(2, 4, 6, 8, 10), arch: str = "qwen2", tied: bool = False,
             base_dtype=torch.float32, ckpt_dtype=None, shards: int = 1, layout: str = "trl",
             noise: float = 0.05, curve: float = 0.0, extra: dict | None = None,
             tokenizer: bool = False) -> tuple[Path, Path]:
    """Build base + checkpoints under root; returns (run_dir, base_dir).

    layout: "trl" (checkpoint-N), "verl" (global_step_N/actor/huggingface), "openrlhf"
    (global_stepN_hf), "nemo" (step_N/policy/weights/hf), "plain" (step-N).
    extra: additional tensors (e.g. integer buffers) added to every file.
    """
    model = tiny_model(arch, tied)
    config = model.config.to_dict()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        base_state.pop("lm_head.weight", None)
    base_state.update(extra or {})
    base_dir = root / "base"
    tok_dir = None
    if tokenizer:
        tok_dir = root / "tok"
        write_tokenizer(tok_dir)
    save_checkpoint(base_dir, base_state, config, base_dtype, shards, tok_dir)
    base_stored = load_dir(base_dir)  # what relex sees as theta_0 (after dtype rounding)
    run = root / "run"
    for s in steps:
        state = trajectory_state(base_stored, s, noise=noise, curve=curve)
        rel = {"trl": f"checkpoint-{s}", "verl": f"global_step_{s}/actor/huggingface",
               "openrlhf": f"global_step{s}_hf", "nemo": f"step_{s}/policy/weights/hf",
               "plain": f"step-{s}"}[layout]
        save_checkpoint(run / rel, state, config, ckpt_dtype or base_dtype, shards, tok_dir)
    return run, base_dir


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors dir (single or sharded), via the safetensors library."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---------------------------------------------------------------- independent float64 reference
def reference(base: dict, ckpts: list[dict], steps, targets, *, rank=1, degree=1, window=None,
              method="relex") -> list[dict[str, np.ndarray]]:
    """RELEX computed the textbook way: SVD of the stacked deltas, coefficients, np.polyfit."""
    steps = np.asarray(steps, dtype=np.float64)
    idx = np.arange(len(steps))[-window:] if window else np.arange(len(steps))
    outs = [{} for _ in targets]
    for name, b in base.items():
        b64 = b.double().numpy().ravel()
        if not b.is_floating_point():
            for o in outs:
                o[name] = b.numpy()
            continue
        d = np.stack([c[name].double().numpy().ravel() - b64 for c in ckpts])
        for k, target in enumerate(targets):
            if method == "linear-weights":
                coef = np.polyfit(steps[idx], d[idx], degree)  # per parameter
                pred = b64 + np.polyval(coef, target)
            else:
                u, s, vt = np.linalg.svd(d, full_matrices=False)
                keep = int(np.sum(s > 1e-6 * s[0])) if s[0] > 0 else 0
                r = min(rank, keep)
                c = d @ vt[:r].T
                pred = b64.copy()
                for i in range(r):
                    fit = np.polyfit(steps[idx], c[idx, i], degree)
                    pred += np.polyval(fit, target) * vt[i]
            outs[k][name] = pred.reshape(b.shape)
    return outs


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of `dtype` numbers at |x| (one unit in the last place)."""
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}[dtype]
    tiny = {torch.float32: 1.2e-38, torch.bfloat16: 1.2e-38, torch.float16: 6.1e-5,
            torch.float64: 2.3e-308}[dtype]
    _, e = np.frexp(np.maximum(np.abs(x), tiny))
    return np.ldexp(1.0, e - bits)


def assert_within_ulp(out: torch.Tensor, ref: np.ndarray, name: str = "", base=None,
                      ulps: float = 1.0, scale=None):
    """|out - ref| <= `ulps` units in the last place of out's dtype, at the magnitude of the
    operands of theta_0 + delta: max(|ref|, |theta_0|, |delta|), or max(|ref|, scale) where the
    caller knows the operands' magnitude. Where the result is much smaller than its operands
    (cancellation), no computation in the output's precision can be closer than the operands'
    spacing; for bf16 outputs this is the plain 1-ulp bound."""
    got = out.double().numpy()
    err = np.abs(got - ref)
    if scale is not None:
        scale = np.maximum(np.abs(ref), scale)
    else:
        scale = np.abs(ref) if base is None else np.maximum.reduce(
            [np.abs(ref), np.abs(base), np.abs(ref - base)])
    bound = ulps * ulp(scale, out.dtype)
    worst = np.argmax(err / bound) if err.size else 0
    assert (err <= bound).all(), (
        f"{name}: {int((err > bound).sum())} of {err.size} elements beyond {ulps} ulp; worst "
        f"got {got.ravel()[worst]!r} ref {ref.ravel()[worst]!r}")


@pytest.fixture
def run_factory(tmp_path):
    counter = [0]

    def make(**kw):
        counter[0] += 1
        return make_run(tmp_path / f"r{counter[0]}", **kw)
    return make
