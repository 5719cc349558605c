"""The written directory loads unchanged in transformers and computes what its weights say."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import relex
from conftest import load_dir


@pytest.mark.parametrize("arch,tied,dtype", [("qwen2", True, torch.bfloat16),
                                             ("llama", False, torch.float32)])
def test_output_loads_and_runs(run_factory, tmp_path, arch, tied, dtype):
    run, base = run_factory(arch=arch, tied=tied, base_dtype=dtype, tokenizer=True, shards=2)
    relex.extrapolate(run, base=base, targets=[40], output=tmp_path / "out",
                      max_shard_size="40KB", progress=False)
    out = tmp_path / "out" / "step-40"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "1 2 3"}], tokenize=False)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 96) and torch.isfinite(logits).all()

    # The same weights put into a fresh model by hand give the same logits.
    weights = load_dir(out)
    ref = AutoModelForCausalLM.from_pretrained(base)
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, logits)
