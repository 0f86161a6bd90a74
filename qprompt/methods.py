"""Soft-prompt methods, built on PEFT: their configs, initialisation and learning rates.

PEFT owns the prompt parameters, their initialisation and the adapter files, so every artifact
stays loadable with `PeftModel.from_pretrained`. The forward pass qprompt runs them with is in
forward.py; the training memory savers are in memory.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)

from .config import MethodConfig, RecipeConfig
from .errors import QPromptError
from .forward import cache_of, virtual_tokens
from .models import keep_4bit_layers_trainable

METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
# Peak learning rates that trained each method in 50 steps on SmolLM2-135M (docs/results.md): p-tuning's
# MLP encoder stays at chance at prompt tuning's 0.03 and reaches 79% sentiment accuracy at 0.003.
SUGGESTED_LR = {"prompt-tuning": 3e-2, "p-tuning": 3e-3, "prefix-tuning": 3e-2}


def learning_rate_for(method: str | None, recipe: RecipeConfig, lr: float | None) -> float | None:
    """--lr when given; for a --method other than the recipe's, the rate measured for that method
    (the recipe's rate was chosen for its own method); else None, keeping the recipe's."""
    if lr is None and method and method != recipe.method.name:
        return SUGGESTED_LR[method]
    return lr


def init_text(method: MethodConfig, recipe: RecipeConfig) -> str:
    """The text a prompt starts from: the label words for init=labels (class-label init, Lester et al.),
    else init_text or the template's instruction."""
    if method.init == "labels":
        return " ".join(recipe.labels.values())
    return method.init_text or recipe.template.instruction


def peft_config(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str):
    """The PEFT config for `method` (the recipe supplies the init text and label words)."""
    hidden = method.encoder_hidden_size or None  # None: PEFT uses the model's hidden size
    if method.name == "p-tuning":
        kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtual_tokens,
                                   encoder_reparameterization_type=kind[method.encoder],
                                   encoder_hidden_size=hidden)
    if method.name == "prefix-tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtual_tokens,
                                  prefix_projection=method.prefix_projection,
                                  encoder_hidden_size=hidden or 512)
    if method.name != "prompt-tuning":
        raise QPromptError(f"unknown method {method.name!r}: use one of {', '.join(METHODS)}")
    init = {"text": PromptTuningInit.TEXT, "labels": PromptTuningInit.TEXT,
            "vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}
    from_text = method.init in ("text", "labels")  # PEFT repeats the text's embeddings to fill the prompt
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.virtual_tokens,
        prompt_tuning_init=init[method.init],
        prompt_tuning_init_text=init_text(method, recipe) if from_text else None,
        tokenizer_name_or_path=tokenizer_path if from_text else None,
    )


def add_soft_prompt(model, recipe: RecipeConfig, tokenizer_path: str, seed: int = 0) -> PeftModel:
    """Wrap a frozen base model with a freshly initialised soft prompt."""
    keep_4bit_layers_trainable(model)  # also for a model loaded by the caller: the prefix init runs it below
    torch.manual_seed(seed)  # vocab and random init draw from torch's generator
    peft_model = get_peft_model(model, peft_config(recipe.method, recipe, tokenizer_path))
    method = recipe.method
    if method.name == "prefix-tuning" and not method.prefix_projection and method.init != "random":
        init_prefix_from_tokens(peft_model, init_token_ids(method, recipe, tokenizer_path, model.config.vocab_size,
                                                           seed))
    return peft_model


def init_token_ids(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str, vocab_size: int,
                   seed: int = 0) -> list[int]:
    """The tokens a prefix starts from: the instruction (text), the label words (labels) or random words."""
    if method.init == "vocab":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(vocab_size, (method.virtual_tokens,), generator=generator).tolist()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = tokenizer(init_text(method, recipe), add_special_tokens=False)["input_ids"]
    if not ids:
        raise QPromptError("method.init_text is empty and so is the template's instruction: give one, or init: random")
    return ids


@torch.no_grad()
def init_prefix_from_tokens(model: PeftModel, token_ids: list[int]) -> None:
    """Start a deep prefix from the keys/values the frozen model computes for real tokens (Li & Liang, 2021).

    PEFT starts prefix tuning from N(0, 1) noise, which is far from any key/value the layers produce and
    trains poorly in few steps. The tokens are repeated or cut to the prompt length and sit at positions
    0..n-1, where the virtual tokens are.
    """
    n = virtual_tokens(model)
    ids = (token_ids * (n // len(token_ids) + 1))[:n]
    base = model.get_base_model()
    device = next(base.parameters()).device
    layers = cache_of(base(input_ids=torch.tensor([ids], device=device), use_cache=True)).layers
    # PEFT reads the embedding row of virtual token t as (layers * 2, kv_heads, head_dim), key then value.
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # (L, 2, H, n, D)
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    weight.copy_(kv.flatten(0, 1).permute(2, 0, 1, 3).reshape(n, -1).to(weight.dtype))


def load_soft_prompt(model, folder: str | Path) -> PeftModel:
    """A saved soft prompt on `model`, for inference."""
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file, for direct callers
        raise QPromptError(f"could not load the soft prompt in {folder} ({str(exc).splitlines()[0]})") from exc


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
