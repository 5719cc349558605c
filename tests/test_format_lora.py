"""LoRA adapters: fixtures written by real peft (get_peft_model, a few real optimizer steps,
save_pretrained per checkpoint), relex's output compared with the float64 reference of the exact
merged weights (peft's merge of the same adapters done in float64, in the test).

These tests used to require relex on the adapters to equal, bit for bit, relex on peft's own
merged exports (merge_and_unload + save_pretrained). That meant rounding every checkpoint to the
base's dtype before taking its delta, which for a bf16 base destroys most of an RL-sized delta;
relex now takes the exact delta scaling * B @ A, so the comparison is with the exact float64
reference instead, and the merged exports only serve as a model-directory view of a checkpoint.
"""

import copy
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import relex
from conftest import assert_within_ulp, load_dir, reference, tiny_model
from relex.cli import main
from relex.errors import RelexError
from relex.formats import open_reader

peft = pytest.importorskip("peft")

STEPS = (2, 4, 6, 8, 10)


def lora_run(root, *, dtype=torch.float32, record_base=False, save_kw=None, **lora_kw):
    """Train a tiny qwen2 with LoRA for 10 Adam steps on a fixed batch; save the adapter (and
    peft's merged export) at STEPS. Returns (adapter run, merged run, base dir); the exact
    merged weights of each step (peft's merge in float64) are in EXACT[adapter run]."""
    model = tiny_model("qwen2").to(dtype)
    base = root / "base"
    model.save_pretrained(base)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj",
                                                                          "up_proj"], **lora_kw})
    pm = peft.get_peft_model(model, cfg)
    if record_base:
        pm.peft_config["default"].base_model_name_or_path = str(base)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    for step in range(1, max(STEPS) + 1):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in STEPS:
            pm.save_pretrained(root / "run" / f"checkpoint-{step}", **(save_kw or {}))
            merged = copy.deepcopy(pm).merge_and_unload()
            merged.save_pretrained(root / "merged" / f"checkpoint-{step}")
            exact = copy.deepcopy(pm).double().merge_and_unload().state_dict()
            EXACT.setdefault(root / "run", {})[step] = {k: v.detach() for k, v in exact.items()}
    return root / "run", root / "merged", base


#: adapter run -> {step: the exact merged weights in float64}, filled by lora_run
EXACT: dict = {}


def exact_reference(run, base, targets, steps=STEPS):
    """The float64 RELEX reference of the exact (never rounded) merged weights."""
    b = load_dir(base)
    ckpts = [{k: EXACT[run][s][k] for k in b} for s in steps]
    return reference(b, ckpts, steps, targets)


def check_exact(tmp_path, run, merged, base, targets=(20,)):
    """relex on the adapters is within 1 ulp of the float64 reference of the exact merged
    weights; on peft's merged exports (each checkpoint rounded to the base's dtype) it is
    within 1 ulp of the reference of those rounded weights, a different model for a bf16
    base."""
    relex.extrapolate(run, base=base, targets=list(targets), output=tmp_path / "a",
                      progress=False)
    relex.extrapolate(merged, base=base, targets=list(targets), output=tmp_path / "m",
                      progress=False)
    b = load_dir(base)
    refs = exact_reference(run, base, targets)
    rounded = reference(b, [load_dir(merged / f"checkpoint-{s}") for s in STEPS], STEPS, targets)
    for target, ref, ref_m in zip(targets, refs, rounded):
        got, via_merged = load_dir(tmp_path / "a" / f"step-{target}"), \
            load_dir(tmp_path / "m" / f"step-{target}")
        assert set(got) == set(ref) == set(via_merged)
        for name, t in got.items():
            assert t.dtype == b[name].dtype, name
            assert_within_ulp(t, ref[name], name, b[name].double().numpy())
            assert_within_ulp(via_merged[name], ref_m[name], name, b[name].double().numpy())


def merge_bound(r, name, exact) -> tuple[np.ndarray, float]:
    """(magnitude, ulps): how far a merged weight computed in float32 may lie from the float64
    merge `exact`, on any CPU. BLAS sums B[i] @ A[:, j] in an order that depends on the CPU
    (MKL's code path), so the bound is in ulps of the largest term, not bit-equality with one
    machine's result: the r products and r - 1 sums each round by at most half an ulp of
    max(|W|, scaling * |B| @ |A|), the scaling and the add once more: r + 1 ulp. DoRA rescales
    each row V = W + s B A by m / ||V||: the row norm's 2n - 1 roundings move it by at most n / 2
    ulp (n = the row's length, an error that sqrt halves), the division and the product by two
    more roundings: r + 1 + n / 2 + 1 ulp at the row's scale m / ||V||. A float32 result rounded
    to a 16-bit base's dtype is within one ulp of that dtype. Returns the magnitude per element
    (flat) and the bound in ulps of the weight's dtype."""
    lo, hi, s = r.factors(name)
    w = r.base.read(name, 0, r.tensors[name].numel).double().view(r.tensors[name].shape)
    terms = w.abs() + s * (lo.double().abs() @ hi.double().abs())
    ulps = lo.shape[1] + 1.0
    if r.adapters[name].magnitude is not None:
        v = w + s * (lo.double() @ hi.double())
        rows = exact.double().norm(dim=1) / v.norm(dim=1)
        terms = terms * rows[:, None]
        ulps += w.shape[1] / 2 + 1
    if r.tensors[name].dtype in (torch.bfloat16, torch.float16):
        ulps = 1.0
    return terms.reshape(-1).numpy(), ulps


def check_merged_reads(run, merged, base, step, names):
    """LoraReader.read of element ranges (unaligned to rows: a few rows of B times A) and peft's
    own merged export (the whole B @ A) both lie within merge_bound of the float64 merge."""
    want = load_dir(merged / f"checkpoint-{step}")
    with open_reader(run / f"checkpoint-{step}", base=base) as r:
        for name in names:
            exact = EXACT[run][step][name]
            ref = exact.reshape(-1).numpy()
            n = ref.size
            if name not in r.adapters or r.adapters[name].bias:  # copied, not computed
                assert torch.equal(r.read(name, 0, n), want[name].reshape(-1)), name
                continue
            scale, ulps = merge_bound(r, name, exact)
            assert_within_ulp(want[name].reshape(-1), ref, f"peft's merge {name}", ulps=ulps,
                              scale=scale)
            for a, b in [(0, n), (7, 45), (33, n - 20), (n - 5, n)]:
                assert_within_ulp(r.read(name, a, b), ref[a:b], f"{name}[{a}:{b}]", ulps=ulps,
                                  scale=scale[a:b])


def test_lora_exact_fp32_base(tmp_path):
    """Patterns, lora_B bias, an embedding adapter and a modules_to_save lm_head at once."""
    run, merged, base = lora_run(
        tmp_path, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
        lora_bias=False, modules_to_save=["lm_head"])
    check_exact(tmp_path, run, merged, base)
    # every element range, unaligned to rows, is the merged weight within the merge's bound
    check_merged_reads(run, merged, base, 6, ("model.layers.0.self_attn.v_proj.weight",
                                              "model.embed_tokens.weight", "lm_head.weight",
                                              "model.layers.1.mlp.up_proj.weight"))
    with open_reader(run / "checkpoint-6", base=base) as r:
        assert r.format == "lora" and len(r.adapters) == 2 * 3 + 1
        lm = load_dir(merged / "checkpoint-6")["lm_head.weight"].reshape(-1)
        assert torch.equal(r.read("lm_head.weight", 3, 40), lm[3:40]), "saved tensors: copies"


def test_rslora_with_lora_bias_and_base_from_adapter_config(tmp_path):
    """rsLoRA (alpha / sqrt(r)), lora_B biases on qwen2's biased q/v projections, and the base
    found from adapter_config.json's base_model_name_or_path (no --base)."""
    run, merged, base = lora_run(tmp_path, r=8, lora_alpha=4, use_rslora=True, lora_bias=True,
                                 target_modules=["q_proj", "v_proj"], record_base=True)
    check_exact(tmp_path, run, merged, base)
    rep = relex.extrapolate(run, targets=[30], output=tmp_path / "nobase", progress=False)
    assert rep.tensors == len(load_dir(base))
    # fitted: the adapted q/v weights and their lora_B biases; every other tensor is the base's
    with open_reader(run / "checkpoint-2") as r:
        adapted = {n for n, ad in r.adapters.items() if ad.rank} | {
            n.replace(".weight", ".bias") for n, ad in r.adapters.items() if ad.bias}
    assert rep.moving == len(adapted) and rep.copied == rep.tensors - len(adapted)
    assert f"({len(adapted)} fitted, {rep.tensors - len(adapted)} copied" in str(rep)
    with open_reader(run / "checkpoint-2") as r:
        assert r.adapters["model.layers.0.self_attn.q_proj.weight"].scaling == 4 / 8 ** 0.5


def test_lora_exact_bf16_base(tmp_path):
    """peft keeps adapters in fp32 over a bf16 base; its merge rounds each checkpoint into
    bf16, relex does not (one rounding, of the output)."""
    run, merged, base = lora_run(tmp_path, dtype=torch.bfloat16)
    check_exact(tmp_path, run, merged, base)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    run, _, base = lora_run(root, target_modules=["q_proj"])
    return run, base


def _broken_copy(tmp_path, small_run):
    run, base = small_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, base, dst / "checkpoint-4"


def _cli_fails(tmp_path, run, base, match, *extra):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = ["extrapolate", str(run), "--target", "30", "-o", str(tmp_path / "out"), "-q"]
    assert main(args + (["--base", str(base)] if base else []) + list(extra)) == 2
    assert not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    with pytest.raises(RelexError, match=match) as e:
        relex.extrapolate(run, base=base, targets=[30], output=tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def test_adapter_for_module_the_base_lacks(tmp_path, small_run):
    run, base, ck = _broken_copy(tmp_path, small_run)
    f = ck / "adapter_model.safetensors"
    t = load_file(f)
    t = {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}
    save_file(t, f, metadata={"format": "pt"})
    _cli_fails(tmp_path, run, base, r"checkpoint-4/adapter_model.safetensors: adapter for "
                                    r"'model.layers.7.self_attn.q_proj'.*no tensor")


def test_adapter_shape_mismatch_with_base(tmp_path, small_run):
    run, base, ck = _broken_copy(tmp_path, small_run)
    f = ck / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = torch.zeros(4, 31)
    save_file(t, f, metadata={"format": "pt"})
    _cli_fails(tmp_path, run, base, "do not form the base weight's shape")


def test_truncated_and_corrupt_adapter(tmp_path, small_run):
    run, base, ck = _broken_copy(tmp_path, small_run)
    f = ck / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    _cli_fails(tmp_path, run, base, "adapter_model.safetensors: truncated")
    (ck / "adapter_config.json").write_text("{not json")
    _cli_fails(tmp_path, run, base, "adapter_config.json: not valid JSON")


def test_overlapping_offsets_refused(tmp_path, small_run):
    """The fuzzing finding: two entries sharing bytes; the strict header check refuses it."""
    run, base, ck = _broken_copy(tmp_path, small_run)
    f = ck / "adapter_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a, b = [k for k in header if k.endswith("lora_A.weight")][:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    _cli_fails(tmp_path, run, base, "adapter_model.safetensors: corrupt safetensors header")


def test_dora_config_without_magnitudes_and_remote_base_needs_flag(tmp_path, small_run):
    run, base, ck = _broken_copy(tmp_path, small_run)
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-Math-1.5B"
    for c in run.iterdir():
        (c / "adapter_config.json").write_text(json.dumps(cfg))
    _cli_fails(tmp_path, run, None, "no --base given")
    with pytest.raises(RelexError, match=r"is not a local directory; pass --base"):
        open_reader(ck)
    cfg["use_dora"] = True  # without magnitude vectors in the file
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    _cli_fails(tmp_path, run, base, r"checkpoint-4/adapter_model.safetensors: adapter for "
                                    r"'model.layers.0.self_attn.q_proj': use_dora is true in "
                                    r"adapter_config.json but the file lacks its "
                                    r"lora_magnitude_vector")


def test_verl_lora_adapter_layout_and_mixed_with_hf(tmp_path, small_run):
    """verl's global_step_N/actor/lora_adapter beside HF checkpoints of other steps."""
    run, base = small_run
    merged = tmp_path / "mixed"
    for i, s in enumerate(STEPS):
        src = run / f"checkpoint-{s}"
        if i % 2:
            shutil.copytree(src, merged / f"global_step_{s}" / "actor" / "lora_adapter")
        else:
            d = merged / f"global_step_{s}" / "actor" / "huggingface"
            d.mkdir(parents=True)
            with open_reader(src, base=base) as r:  # an HF export of the same step
                save_file({n: r.read(n, 0, m.numel).reshape(m.shape).clone()
                           for n, m in r.tensors.items()},
                          d / "model.safetensors", metadata={"format": "pt"})
            shutil.copy(base / "config.json", d)
    relex.extrapolate(merged, base=base, targets=[20], output=tmp_path / "x", progress=False)
    # each step as relex sees it: the HF export as stored, the adapters' exact merged weights
    b = load_dir(base)
    ckpts = [load_dir(merged / f"global_step_{s}" / "actor" / "huggingface") if i % 2 == 0
             else {k: EXACT[run][s][k] for k in b} for i, s in enumerate(STEPS)]
    (ref,) = reference(b, ckpts, STEPS, [20])
    x = load_dir(tmp_path / "x/step-20")
    assert set(x) == set(ref)
    for name, t in x.items():
        assert_within_ulp(t, ref[name], name, b[name].double().numpy())


def test_pissa_adapter_refused_and_its_converted_save_read(tmp_path):
    """A real PiSSA save is a delta to a base peft rewrites (W - B0 A0): refused, naming the
    save_pretrained option that converts it; the converted save reads as peft's merge."""
    model = tiny_model("qwen2")
    base = tmp_path / "base"
    model.save_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa",
                                                    target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "init")  # the initial adapter, for the conversion
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "pissa")
    cfg = tmp_path / "pissa" / "adapter_config.json"
    assert json.loads(cfg.read_text())["init_lora_weights"] == "pissa"
    with pytest.raises(RelexError, match=r"pissa/adapter_config.json: init_lora_weights is "
                                         r"'pissa'.*path_initial_model_for_weight_conversion"
                       ) as e:
        open_reader(tmp_path / "pissa", base=base)
    assert "\n" not in str(e.value)
    pm.save_pretrained(tmp_path / "plain",
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    want = copy.deepcopy(pm).merge_and_unload().state_dict()
    with open_reader(tmp_path / "plain", base=base) as r:
        name = "model.layers.0.self_attn.q_proj.weight"
        got = r.read(name, 0, r.tensors[name].numel).reshape(r.tensors[name].shape)
        assert torch.allclose(got, want[name], atol=1e-5)


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "olora", "loftq", "lora_ga", "mica"])
def test_inits_that_rewrite_the_base_refused(tmp_path, small_run, init):
    _, base, ck = _broken_copy(tmp_path, small_run)
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RelexError, match=rf"adapter_config.json: init_lora_weights is '{init}'"):
        open_reader(ck, base=base)
    for ok in (True, False, "gaussian", "eva", "orthogonal"):  # plain LoRA deltas
        cfg["init_lora_weights"] = ok
        (ck / "adapter_config.json").write_text(json.dumps(cfg))
        open_reader(ck, base=base).close()


def _shape_case(tmp_path, fifo, shapes):
    """A base of 2-D weights {module: shape} and a rank-2 adapter on each (A (2, in), B (out, 2),
    in / out from the shape as nn.Linear (out, in) or Conv1D (in, out) per `shapes[m][1]`)."""
    g = torch.Generator().manual_seed(0)
    base, ad, want = tmp_path / "base", tmp_path / "ad", {}
    base.mkdir()
    ad.mkdir()
    weights, lora = {}, {}
    for m, (shape, conv1d) in shapes.items():
        w = torch.randn(shape, generator=g)
        fan_in, fan_out = shape if conv1d else shape[::-1]
        a, b = torch.randn(2, fan_in, generator=g), torch.randn(fan_out, 2, generator=g)
        weights[f"{m}.weight"] = w
        lora[f"base_model.model.{m}.lora_A.weight"] = a
        lora[f"base_model.model.{m}.lora_B.weight"] = b
        delta = (b @ a) * 2.0  # lora_alpha 4 / r 2
        want[f"{m}.weight"] = w + (delta.T if conv1d else delta)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    save_file(lora, ad / "adapter_model.safetensors", metadata={"format": "pt"})
    (ad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": fifo,
         "target_modules": sorted(shapes)}))
    return ad, base, want


@pytest.mark.parametrize("fifo", [True, False])
def test_fan_in_fan_out_decided_per_layer(tmp_path, fifo):
    """peft decides per module (nn.Linear: never, transformers Conv1D: always), whatever
    adapter_config.json says: a GPT-2-like model has both kinds."""
    shapes = {"h.c_attn": ((4, 12), True), "lm_head": ((10, 4), False)}
    if not fifo:  # a square weight is an nn.Linear unless the config says fan_in_fan_out
        shapes["h.o_proj"] = ((5, 5), False)
    ad, base, want = _shape_case(tmp_path, fifo, shapes)
    with open_reader(ad, base=base) as r:
        for name, w in want.items():
            flat = w.reshape(-1)
            for a, b in [(0, flat.numel()), (3, 17), (5, flat.numel() - 2)]:
                assert torch.allclose(r.read(name, a, b), flat[a:b], atol=1e-5), (name, a, b)


def test_square_weight_with_fan_in_fan_out_refused(tmp_path):
    ad, base, _ = _shape_case(tmp_path, True, {"h.c_proj": ((6, 6), True)})
    with pytest.raises(RelexError, match=r"adapter for 'h.c_proj': its base weight is square.*"
                                         r"fan_in_fan_out is true in adapter_config.json") as e:
        open_reader(ad, base=base)
    assert "\n" not in str(e.value)


def test_factor_gram_equals_materialized_gram(small_run):
    """The Gram matrix relex computes from r x r factor products equals the one of the
    materialised float64 deltas (in the test: B @ A of each checkpoint) within float64
    rounding; the fit file relex saves holds it."""
    from relex.stream.factors import factor_gram
    run, base = small_run
    readers = [open_reader(run / f"checkpoint-{s}", base=base) for s in STEPS]
    try:
        for name in [n for n in readers[0].adapters]:
            deltas, lefts, rights, owner = [], [], [], []
            for t, r in enumerate(readers):
                lo, hi, s = r.factors(name)
                deltas.append((s * lo.double() @ hi.double()).reshape(-1).numpy())
                lefts.append(lo.double() * s)
                rights.append(hi.double())
                owner += [t] * lo.shape[1]
            d = np.stack(deltas)
            want = d @ d.T
            got = factor_gram(torch.cat(lefts, 1), torch.cat(rights, 0), torch.tensor(owner),
                              len(STEPS))
            assert np.allclose(got, want, rtol=1e-12, atol=1e-14 * np.abs(want).max()), name
    finally:
        for r in readers:
            r.close()


def test_rank_or_target_modules_changing_between_checkpoints(tmp_path, small_run):
    run, base, ck = _broken_copy(tmp_path, small_run)
    f = ck / "adapter_model.safetensors"
    t = load_file(f)
    good = dict(t)
    key = next(k for k in t if "layers.1" in k and k.endswith("lora_A.weight"))
    t[key] = torch.cat([t[key], t[key]])  # r 4 -> 8 for one module
    bkey = key.replace("lora_A", "lora_B")
    t[bkey] = torch.cat([t[bkey], t[bkey]], 1)
    save_file(t, f, metadata={"format": "pt"})
    cfg_file = ck / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "rank_pattern": {"model.layers.1.self_attn.q_proj": 8}}))
    _cli_fails(tmp_path, run, base, r"checkpoint-4/adapter_model.safetensors: at step 4, module "
                                    r"'model.layers.1.self_attn.q_proj' has r=8 but r=4 at step 2")
    cfg_file.write_text(json.dumps(cfg))
    save_file({k: v for k, v in good.items() if "layers.1" not in k}, f,
              metadata={"format": "pt"})
    _cli_fails(tmp_path, run, base, r"at step 4, module 'model.layers.1.self_attn.q_proj' has no "
                                    r"LoRA weight but step 2 has one \(target_modules changed\)")


def test_factor_of_wrong_rank_refused(tmp_path, small_run):
    """lora_B's columns must match lora_A's rows (nothing is written)."""
    run, base, ck = _broken_copy(tmp_path, small_run)
    f = ck / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = t[key][:, :3].contiguous()
    save_file(t, f, metadata={"format": "pt"})
    _cli_fails(tmp_path, run, base, r"checkpoint-4/adapter_model.safetensors: adapter for .*A "
                                    r"\[4, 32\] and B \[\d+, 3\] do not form")


# ---------------------------------------------------------------- adapter outputs
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def out_run(request, tmp_path_factory):
    """Adapters and a modules_to_save lm_head; on the fp32 base on q/k/v with lora_B biases,
    on the bf16 base on q/v/up with an embedding adapter (transposed factors; peft has no
    lora_bias for embeddings)."""
    root = tmp_path_factory.mktemp("lora-out")
    fp32 = request.param == torch.float32
    targets = ["q_proj", "k_proj", "v_proj"] if fp32 else ["q_proj", "v_proj", "up_proj",
                                                          "embed_tokens"]
    run, _, base = lora_run(root, dtype=request.param, lora_bias=fp32, target_modules=targets,
                            modules_to_save=["lm_head"],
                            save_kw={"save_embedding_layers": False})
    return run, base, request.param


def _logits(model_dir_or_model, ids=IDS):
    from transformers import AutoModelForCausalLM
    model = (AutoModelForCausalLM.from_pretrained(model_dir_or_model)
             if not isinstance(model_dir_or_model, torch.nn.Module) else model_dir_or_model)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.double()


def _adapter_deltas(adapter_dir, base_state):
    """{weight: scaling * B @ A in float64} of an adapter directory, as peft merges it."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    scaling = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key, a in t.items():
        module = key.removeprefix("base_model.model.")
        if module.endswith(".lora_A.weight"):
            b = t[key.replace("lora_A", "lora_B")]
            out[module.removesuffix(".lora_A.weight") + ".weight"] = scaling * (
                b.double() @ a.double())
        elif module.endswith(".lora_embedding_A"):
            b = t[key.replace("lora_embedding_A", "lora_embedding_B")]
            out[module.removesuffix(".lora_embedding_A") + ".weight"] = scaling * (
                b.double() @ a.double()).T
    assert all(out[n].shape == base_state[n].shape for n in out)
    return out


def test_adapter_output_at_full_rank_loads_in_peft_and_matches_merged_output(tmp_path,
                                                                            out_run):
    """peft.PeftModel.from_pretrained(base, step-S) gives the logits of relex's merged output
    of the same step; every tensor keeps its whole delta (norm share 1)."""
    from transformers import AutoModelForCausalLM
    run, base, dtype = out_run
    full = len(STEPS) * 4
    rep = relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "a",
                            output_format="lora", lora_rank=full, progress=False)
    relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "m", progress=False)
    d = tmp_path / "a" / "step-20"
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json",
                                                   "adapter_model.safetensors", "relex.json"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (full, full, {})
    assert rep.output_format == "lora" and rep.lora_rank == full and not rep.notes
    shares = rep.norm_share[20]
    assert len(shares) == 2 * 3 + (dtype == torch.bfloat16)
    assert min(shares.values()) > 1 - 1e-9
    prov = json.loads((d / "relex.json").read_text())
    assert prov["lora"]["norm_share"] == shares
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), d)
    got, want = _logits(model), _logits(tmp_path / "m" / "step-20")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max()
    # and merged by peft, the weights are relex's merged output within 1 ulp of the dtype
    merged = model.merge_and_unload().state_dict()
    b = load_dir(base)
    for name, t in load_dir(tmp_path / "m" / "step-20").items():
        assert_within_ulp(merged[name], t.double().numpy(), name, b[name].double().numpy(),
                          ulps=1.0 if dtype == torch.bfloat16 else 64.0)


def test_adapter_output_at_reduced_rank_reports_true_norm_share(tmp_path, out_run):
    """At rank 2 each adapted weight's delta is the best rank-2 approximation of the
    extrapolated delta (float64 reference from the exact merged weights, in the test), and
    the reported share is ||delta_2|| / ||delta||."""
    run, base, dtype = out_run
    rep = relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "a",
                            output_format="lora", lora_rank=2, progress=False)
    b = load_dir(base)
    (ref,) = exact_reference(run, base, [20])
    got = _adapter_deltas(tmp_path / "a" / "step-20", b)
    assert set(got) == set(rep.norm_share[20])
    for name, dk in got.items():
        full = ref[name] - b[name].double().numpy()
        sv = np.linalg.svd(full, compute_uv=False)
        share = np.sqrt((sv[:2] ** 2).sum() / (sv ** 2).sum())
        assert abs(rep.norm_share[20][name] - share) < 1e-5, name
        assert abs(np.linalg.norm(dk.numpy()) / np.linalg.norm(full) - share) < 1e-5, name
        best = np.sqrt((sv[2:] ** 2).sum())  # Eckart-Young: nothing of rank 2 is closer
        assert np.linalg.norm(full - dk.numpy()) <= best * (1 + 1e-4) + 1e-12, name
    t = load_file(tmp_path / "a" / "step-20" / "adapter_model.safetensors")
    lm = t["base_model.model.lm_head.weight"]  # kept whole, under the key peft saved it with
    assert_within_ulp(lm, ref["lm_head.weight"], "lm_head", b["lm_head.weight"].double().numpy())
    if dtype == torch.float32:  # a lora_B bias: the extrapolated bias delta
        bias = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]
        want = ref["model.layers.0.self_attn.q_proj.bias"] - \
            b["model.layers.0.self_attn.q_proj.bias"].double().numpy()
        assert np.allclose(bias.double().numpy(), want, rtol=1e-5, atol=1e-9)


def test_adapter_output_rank_clamped_and_refusals(tmp_path, small_run, run_factory, capsys):
    run, base = small_run
    rep = relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "a",
                            output_format="lora", lora_rank=100, progress=False)
    assert rep.lora_rank == 20 and rep.notes == [
        "--lora-rank 100 is more than T*r = 5*4 = 20, the rank of the extrapolated delta: "
        "using 20"]
    t = load_file(tmp_path / "a" / "step-20" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in t.items() if k.endswith("lora_A.weight")} == {20}
    args = ["extrapolate", str(run), "--base", str(base), "--target", "20", "-q",
            "--output-format", "lora"]
    assert main(args + ["-o", str(tmp_path / "b")]) == 0  # default: the run's r
    cfg = json.loads((tmp_path / "b" / "step-20" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "d"), "--lora-rank", "64"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines()
             if not line.startswith("relex: warning: target step")]  # the horizon's line
    assert notes == ["relex: note: --lora-rank 64 is more than T*r = 5*4 = 20, the rank of the "
                     "extrapolated delta: using 20"]
    hf_run, hf_base = run_factory()
    assert main(["extrapolate", str(hf_run), "--base", str(hf_base), "--target", "20", "-q",
                 "--output-format", "lora", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relex: error: --output-format lora: the checkpoint of step 2")
    assert err.count("\n") == 1 and not (tmp_path / "c").exists()
    with pytest.raises(RelexError, match=r"--output-format lora: the checkpoint of step 2 "
                                         r"\(.*checkpoint-2\) is a hf checkpoint, not a LoRA "
                                         r"adapter") as e:
        relex.extrapolate(hf_run, base=hf_base, targets=[20], output=tmp_path / "c",
                          output_format="lora", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()
    with pytest.raises(RelexError, match="--lora-rank is the rank of an adapter output"):
        relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "c", lora_rank=2,
                          progress=False)


def test_saved_fit_and_analyze_on_adapters(tmp_path, small_run):
    """The factor Gram is saved like any other: --from-fit reproduces the output bit for bit
    and reads only the base and the factors; analyze takes the factor path too."""
    run, base = small_run
    first = relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "a",
                              progress=False)
    again = relex.extrapolate(from_fit=tmp_path / "a", targets=[20], output=tmp_path / "b",
                              progress=False)
    x, y = load_dir(tmp_path / "a" / "step-20"), load_dir(tmp_path / "b" / "step-20")
    assert all(torch.equal(x[k], y[k]) for k in x)
    n_base = sum(t.numel() * t.element_size() for t in load_dir(base).values())
    n_factors = sum(t.numel() * t.element_size() for s in STEPS
                    for t in load_file(run / f"checkpoint-{s}" / "adapter_model.safetensors")
                    .values())
    assert again.bytes_read == n_base + n_factors == first.bytes_read
    res = relex.analyze(run, base=base, output=tmp_path / "r", progress=False)
    assert res.summary and (tmp_path / "r" / "report.html").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_exact(tmp_path, dtype):
    """DoRA on linear layers: the exact row-rescaled delta m * V / ||V|| - W (V = W + s B A),
    within 1 ulp of peft's float64 merge; no adapter output (the delta is not low rank)."""
    run, merged, base = lora_run(tmp_path, dtype=dtype, use_dora=True,
                                 target_modules=["q_proj", "v_proj", "up_proj"])
    check_exact(tmp_path, run, merged, base)
    check_merged_reads(run, merged, base, 6, ("model.layers.1.mlp.up_proj.weight",
                                              "model.layers.0.self_attn.q_proj.weight"))
    with pytest.raises(RelexError, match=r"--output-format lora: .*checkpoint-10 is a DoRA "
                                         r"adapter, whose extrapolated delta .* is not a "
                                         r"low-rank product") as e:
        relex.extrapolate(run, base=base, targets=[20], output=tmp_path / "x",
                          output_format="lora", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
