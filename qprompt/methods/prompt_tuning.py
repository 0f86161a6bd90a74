"""Prompt tuning (Lester et al., 2021): the virtual tokens' input embeddings, learned directly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import EMBEDDING_PREFIX, SoftPromptMethod, init_text, register

if TYPE_CHECKING:
    from ..config import MethodConfig, RecipeConfig
    from ..plan import Shape

# method.init -> PEFT's PromptTuningInit; labels is text too (the label words).
PEFT_INIT = {"text": "TEXT", "labels": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


def peft_config(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str):
    from peft import PromptTuningConfig, PromptTuningInit

    from_text = method.init in ("text", "labels")  # PEFT repeats the text's embeddings to fill the prompt
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.virtual_tokens,
        prompt_tuning_init=PromptTuningInit[PEFT_INIT[method.init]],
        prompt_tuning_init_text=init_text(method, recipe) if from_text else None,
        tokenizer_name_or_path=tokenizer_path if from_text else None,
    )


def trainable_parameters(shape: Shape, virtual_tokens: int, **_options) -> int:
    return virtual_tokens * shape.hidden


PROMPT_TUNING = register(SoftPromptMethod(
    name="prompt-tuning", help="prompt tuning", peft_config=peft_config, suggested_lr=3e-2,
    exports_as=EMBEDDING_PREFIX, trainable_parameters=trainable_parameters,
    starts_from_prompt=lambda method: True, listed=0,
))
