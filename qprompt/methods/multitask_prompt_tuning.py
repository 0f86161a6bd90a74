"""Multitask prompt tuning (Wang et al., 2023; PEFT's MPT): one shared prompt, and per task a rank-r matrix
that scales it element by element, so each row of a batch reads its task's prompt (`forward.prompt_task`).

`qprompt multitask` trains it on several recipes at once (method.tasks = the number of recipes); a new task
then starts from it with method.init_from. Trained on one recipe it is prompt tuning with a learned scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import EMBEDDING_PREFIX, SoftPromptMethod, init_text, option, register

if TYPE_CHECKING:
    from peft import PeftModel

    from ..config import MethodConfig, RecipeConfig
    from ..plan import Shape

RANK = 1  # the paper's rank: a task adds (virtual tokens + hidden) numbers


@dataclass
class MultitaskOptions:
    tasks: int = option(1, "multitask-prompt-tuning: tasks sharing the prompt, each with its own part (`qprompt "
                        "multitask` sets it to the number of recipes)", low=1)


def peft_config(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str):
    from peft import MultitaskPromptTuningConfig, MultitaskPromptTuningInit

    from_text = method.init in ("text", "labels")
    return MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.virtual_tokens,
        num_tasks=method.tasks,
        num_ranks=RANK,
        # vocab: drawn in `initialise` (PEFT's multitask init has no such option)
        prompt_tuning_init=MultitaskPromptTuningInit.TEXT if from_text else MultitaskPromptTuningInit.RANDOM,
        prompt_tuning_init_text=init_text(method, recipe) if from_text else None,
        tokenizer_name_or_path=tokenizer_path if from_text else None,
    )


def initialise(model: PeftModel, recipe: RecipeConfig, tokenizer_path: str, seed: int) -> None:
    """Every task's part starts at ones, so at step 0 each task's prompt is the shared one (text, words or noise).

    PEFT draws both factors from N(0, 0.02): their product scales the shared prompt by ~4e-4, which starts
    every task from an almost-zero prompt whatever method.init says."""
    import torch

    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad():
        encoder.prefix_task_cols.fill_(1.0)
        encoder.prefix_task_rows.fill_(1.0 / RANK)
        if recipe.method.init == "vocab":  # words of the vocabulary, as prompt tuning's init=vocab
            words = model.get_base_model().get_input_embeddings().weight
            picked = torch.randint(0, words.shape[0], (encoder.embedding.weight.shape[0],))
            encoder.embedding.weight.copy_(words[picked].to(encoder.embedding.weight.dtype))


def trainable_parameters(shape: Shape, virtual_tokens: int, tasks: int = 1, **_options) -> int:
    return virtual_tokens * shape.hidden + tasks * RANK * (virtual_tokens + shape.hidden)


MULTITASK_PROMPT_TUNING = register(SoftPromptMethod(
    name="multitask-prompt-tuning", help="multitask prompt tuning (shared prompt x per-task rank-1 part)",
    peft_config=peft_config, suggested_lr=3e-2, exports_as=EMBEDDING_PREFIX,
    trainable_parameters=trainable_parameters, initialise=initialise,
    starts_from_prompt=lambda method: True,
    settings=lambda method: {"tasks": method.tasks},
    options=MultitaskOptions, listed=3,
))
