"""Prompt transfer (method.init_from): a new prompt starts from one an artifact learned, e.g. a `qprompt multitask`
prompt (Vu et al., 2022, SPoT). Checked before anything is loaded or written: a wrong artifact costs a second."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QPromptError
from .methods import METHODS, get_method

if TYPE_CHECKING:
    from peft import PeftModel


def saved_prompt(folder: str | Path):
    """The prompt an artifact's adapter file holds, as the model reads it: (virtual tokens, width).

    For prompt tuning and prefix tuning that is the learned tensor (P-tuning's file holds its encoder's output);
    for a multitask prompt, the mean of its tasks' prompts: a new task starts from what they share."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    if "prompt_embeddings" not in weights:  # LoRA and other adapters: no prompt to start from
        raise QPromptError(f"{folder} holds no soft prompt (no prompt_embeddings in its adapter file); start from "
                           "a qprompt artifact")
    prompt = weights["prompt_embeddings"].float()
    if "prefix_task_cols" in weights:  # (tasks, n, r) @ (tasks, r, hidden): each task's scale of the shared prompt
        scales = weights["prefix_task_cols"].float() @ weights["prefix_task_rows"].float()
        prompt = (prompt * scales).mean(dim=0)
    return prompt


def start_prompt(folder: str | Path, method: str, virtual_tokens: int, fingerprint: str):
    """The prompt a new `method` prompt of `virtual_tokens` starts from (prompt transfer, method.init_from):
    checked before anything is loaded or written, so a wrong artifact costs a second and no files.

    Both must sit on the same base and read the prompt the same way (embeddings, or prefix tuning's keys and
    values) with the same number of virtual tokens; each mismatch is one error naming the fix."""
    from .artifact import check_adapter_weights, read_manifest

    source = read_manifest(folder)
    check_adapter_weights(folder)
    if source["base"].get("fingerprint") != fingerprint:
        raise QPromptError(f"--init-from {folder} was trained on {source['base'].get('name')!r}, another base than "
                           f"this run's; start from an artifact of the same base, or pass --model "
                           f"{source['base'].get('name')}")
    target = get_method(method)
    source_kind = get_method(source["method"]).exports_as if source["method"] in METHODS else None
    if source_kind != target.exports_as:
        raise QPromptError(f"--init-from {folder} holds a {source['method']} prompt ({source_kind}); this run learns "
                           f"a {target.exports_as}: start from an artifact whose prompt enters the model the same way, "
                           "or pass the matching --method")
    if source["virtual_tokens"] != virtual_tokens:
        raise QPromptError(f"--init-from {folder} has {source['virtual_tokens']} virtual tokens, this run "
                           f"{virtual_tokens}: pass --virtual-tokens {source['virtual_tokens']}")
    return saved_prompt(folder)


def copy_prompt(model: PeftModel, prompt) -> None:
    """Put `prompt` (from `start_prompt`) into `model`'s freshly built prompt."""
    import torch

    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    if prompt.shape != weight.shape:  # same base and kind make this impossible; a hand-edited file does not
        raise QPromptError(f"the starting prompt is {tuple(prompt.shape)}, this run's {tuple(weight.shape)}; "
                           "start from an artifact of the same base and method")
    with torch.no_grad():
        weight.copy_(prompt.to(weight.dtype))


def start_from_artifact(model: PeftModel, method: str, folder: str | Path, fingerprint: str) -> None:
    """`copy_prompt(model, start_prompt(...))` for a model already built."""
    copy_prompt(model, start_prompt(folder, method, model.active_peft_config.num_virtual_tokens, fingerprint))
