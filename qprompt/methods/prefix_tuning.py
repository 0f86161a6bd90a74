"""Prefix tuning (Li & Liang, 2021): keys and values for every layer, read before the real tokens' own.

Learned directly (the deep prompts of P-tuning v2, started from the keys/values of real tokens) or,
with method.prefix_projection, through an MLP as in Li & Liang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import QPromptError
from . import KV_PREFIX, SoftPromptMethod, init_text, option, register

if TYPE_CHECKING:
    from peft import PeftModel

    from ..config import MethodConfig, RecipeConfig
    from ..plan import Shape


@dataclass
class PrefixTuningOptions:
    prefix_projection: bool = option(False, "prefix-tuning: learn the prefix through an MLP (Li & Liang); false learns "
                                     "it directly (the deep prompts of P-tuning v2)")
    # shared with p-tuning (same name, same meaning): the width of the MLP
    encoder_hidden_size: int = option(0, "width of p-tuning's encoder and the prefix MLP (0: the model's "
                                      "hidden size for p-tuning, 512 for the prefix MLP)", low=0)


def peft_config(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtual_tokens,
                              prefix_projection=method.prefix_projection,
                              encoder_hidden_size=method.encoder_hidden_size or 512)


def trainable_parameters(shape: Shape, virtual_tokens: int, encoder_hidden: int | None = None,
                         prefix_projection: bool = False, **_options) -> int:
    p = virtual_tokens
    kv_width = 2 * shape.layers * shape.kv_heads * shape.head_dim  # one key and one value per layer
    if not prefix_projection:
        return p * kv_width
    e, token = encoder_hidden or 512, shape.kv_heads * shape.head_dim  # PEFT embeds at the key/value width
    return p * token + (token * e + e) + (e * kv_width + kv_width)


def initialise(model: PeftModel, recipe: RecipeConfig, tokenizer_path: str, seed: int) -> None:
    """Deep prompts start from real tokens' keys/values; the MLP and init=random keep PEFT's random start."""
    method = recipe.method
    if method.prefix_projection or method.init == "random":
        return
    vocab_size = model.get_base_model().config.vocab_size
    init_prefix_from_tokens(model, init_token_ids(method, recipe, tokenizer_path, vocab_size, seed))


def init_token_ids(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str, vocab_size: int,
                   seed: int = 0) -> list[int]:
    """The tokens a prefix starts from: the instruction (text), the label words (labels) or random words."""
    import torch

    if method.init == "vocab":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(vocab_size, (method.virtual_tokens,), generator=generator).tolist()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = tokenizer(init_text(method, recipe), add_special_tokens=False)["input_ids"]
    if not ids:
        raise QPromptError("method.init_text is empty and so is the template's instruction: give one, or init: random")
    return ids


def init_prefix_from_tokens(model: PeftModel, token_ids: list[int]) -> None:
    """Start a deep prefix from the keys/values the frozen model computes for real tokens (Li & Liang, 2021).

    PEFT starts prefix tuning from N(0, 1) noise, which is far from any key/value the layers produce and
    trains poorly in few steps. The tokens are repeated or cut to the prompt length and sit at positions
    0..n-1, where the virtual tokens are.
    """
    import torch

    from ..forward import cache_of, virtual_tokens

    n = virtual_tokens(model)
    ids = (token_ids * (n // len(token_ids) + 1))[:n]
    base = model.get_base_model()
    device = next(base.parameters()).device
    with torch.no_grad():
        layers = cache_of(base(input_ids=torch.tensor([ids], device=device), use_cache=True)).layers
        # PEFT reads the embedding row of virtual token t as (layers * 2, kv_heads, head_dim), key then value.
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # (L, 2, H, n, D)
        weight = model.prompt_encoder[model.active_adapter].embedding.weight
        weight.copy_(kv.flatten(0, 1).permute(2, 0, 1, 3).reshape(n, -1).to(weight.dtype))


PREFIX_TUNING = register(SoftPromptMethod(
    name="prefix-tuning", help="prefix tuning", peft_config=peft_config, suggested_lr=3e-2,
    exports_as=KV_PREFIX, trainable_parameters=trainable_parameters, initialise=initialise,
    uses_init=lambda method: not method.prefix_projection,  # the MLP starts from random weights (PEFT)
    settings=lambda method: {"prefix_projection": True} if method.prefix_projection else {},
    starts_from_prompt=lambda method: not method.prefix_projection,
    options=PrefixTuningOptions, listed=2,
))
