"""Sampling responses: vLLM's offline engine when it is installed and a GPU is present, else
transformers' batched `generate` (CPU or GPU)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from relex.errors import RelexError
from relex.evaluation.datasets import QWEN_MATH_INSTRUCTION


def format_prompt(tokenizer, question: str, template: str) -> str:
    """auto: the model's chat template if it has one, else the question; qwen-math: the same
    with Qwen's boxed-answer instruction; raw: the question; anything with {question}: used as
    a format string."""
    if "{question}" in template:
        return template.format(question=question)
    if template == "raw":
        return question
    if template not in ("auto", "qwen-math"):
        raise RelexError(f"--template {template}: expected auto, qwen-math, raw or a string "
                         f"with {{question}}")
    content = question + ("\n" + QWEN_MATH_INSTRUCTION if template == "qwen-math" else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return content


def pick_backend(backend: str) -> str:
    if backend == "auto":
        return "vllm" if (importlib.util.find_spec("vllm") and torch.cuda.is_available()) \
            else "transformers"
    if backend not in ("vllm", "transformers"):
        raise RelexError(f"--backend {backend}: expected auto, vllm or transformers")
    return backend


def require(backend: str, task: str) -> None:
    """Stop before any work (a sweep's extrapolation, a model load) when generation or grading
    cannot run here, naming the extra to install."""
    need = ["vllm" if pick_backend(backend) == "vllm" else "transformers"]
    if task != "arithmetic":  # the demo's task is graded by exact match
        need.append("math_verify")
    for module in need:
        try:
            importlib.import_module(module)
        except ImportError:
            extra = "pip install vllm" if module == "vllm" else "pip install 'relex[eval]'"
            raise RelexError(f"scoring models needs {module.replace('_', '-')}, which is not "
                             f"installed here: {extra}") from None


class TransformersGenerator:
    """Batched sampling with transformers (left padding; CPU, or CUDA when available)."""

    def __init__(self, model_dir: Path, template: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
        self.model.eval()
        self.template = template

    def prompt(self, question: str) -> str:
        return format_prompt(self.tok, question, self.template)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[list[str]]:
        torch.manual_seed(seed)
        templated = getattr(self.tok, "chat_template", None) and self.template != "raw"
        enc = self.tok(prompts, return_tensors="pt", padding=True,
                       add_special_tokens=not templated).to(self.model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) \
            if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(**enc, max_new_tokens=max_tokens, num_return_sequences=n,
                                  pad_token_id=self.tok.pad_token_id, **sampling)
        texts = self.tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator:
    """vLLM's offline engine (GPU). Not exercised by the test suite (no GPU in CI)."""

    def __init__(self, model_dir: Path, template: str):
        from vllm import LLM
        self.llm = LLM(model=str(model_dir), dtype="auto")
        self.tok = self.llm.get_tokenizer()
        self.template = template

    def prompt(self, question: str) -> str:
        return format_prompt(self.tok, question, self.template)

    def generate(self, prompts, n, temperature, max_tokens, seed):
        from vllm import SamplingParams
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        return [[o.text for o in r.outputs] for r in self.llm.generate(prompts, params)]

    def close(self):
        import gc
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()


def quiet_transformers() -> None:
    """transformers draws a progress bar per model load; relex shows its own."""
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
