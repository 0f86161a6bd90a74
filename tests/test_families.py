"""Model families: each exports, fused where onnxruntime-genai's model builder knows it, else written out.

Tiny random models built from each family's config (vocabulary and tokenizer of the shared tiny Llama). The
ones here cover each path: a plain Llama-like family (fused, q/k/v as one tensor), q/k norms (fused, q/k/v
apart), sliding-window layers (fused, full buffers), a family whose attention takes the prompt as a keyword
(GPT-2, written out), and two whose attention never sees it, so the prompt is joined to their cache (StableLM,
Falcon's multi-query attention). bench/families.py runs all eighteen families tried so far.
"""

from __future__ import annotations

import inspect
import shutil

import pytest
import torch

from qprompt.export import export
from tests.kit import train_small

FAMILIES = {  # family -> (config class name, extra config, expected graph)
    "qwen2": ("Qwen2Config", {}, "fused"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "fused"),
    "gemma2": ("Gemma2Config", {"head_dim": 16}, "fused"),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}, "written"),
    "stablelm": ("StableLmConfig", {}, "written"),
    "falcon": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": True}, "written"),
}


def tiny_family(family: str, tokenizer_dir, folder):
    import transformers

    name, extra, _ = FAMILIES[family]
    cls = getattr(transformers, name)
    kwargs = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  **extra)
    if "num_key_value_heads" not in inspect.signature(cls.__init__).parameters:
        kwargs.pop("num_key_value_heads")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs))
    with torch.no_grad():  # larger weights than the default init: distinct tokens, so a wrong position shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


CASES = [(family, "prompt-tuning") for family in FAMILIES] + [("falcon", "prefix-tuning")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_each_family_exports_with_parity(family, method, tiny_model_dir, sentiment_files, tmp_path):
    """Falcon with prefix tuning too: PEFT would size its prefix for four key/value heads, the cache holds one."""
    model_dir = tiny_family(family, tiny_model_dir, tmp_path / family)
    train_small(model_dir, sentiment_files, tmp_path / "art", method__name=method, train__max_steps=1,
                train__batch_size=4, train__eval_rows=4, train__lr=0.03)
    data = export(tmp_path / "art", tmp_path / "exp", parity_tokens=4)
    assert data.graph == FAMILIES[family][2]
    parity = data.tasks[0].parity
    assert parity["exact"] and parity["max_abs_logit_diff"] <= parity["tolerance"] and parity["greedy_tokens_equal"]
