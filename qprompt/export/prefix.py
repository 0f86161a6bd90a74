"""The soft prompt as export sees it: per layer, the constant keys and values of the virtual tokens.

In a causal decoder the virtual tokens come first, so no real token can change their keys and values:
once training is over they are constants, computed here once (a forward pass over the soft prompt alone,
on the float base the prompt was trained against). Prefix tuning learned them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifact import load_artifact
from ..data import template_of
from ..deploy.manifest import TaskEntry
from ..forward import cache_of, is_prefix, soft_prompt, virtual_tokens
from ..templates import Template
from .folder import portable_base


@torch.no_grad()
def constant_prefix(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values of the virtual tokens: one forward pass over the soft prompt alone."""
    if not virtual_tokens(model):
        return []
    if is_prefix(model):  # prefix tuning learned these keys/values directly
        cache = soft_prompt(model, 1)
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    base = model.get_base_model()
    prompts = soft_prompt(model, 1).to(base.dtype)
    out = base.get_decoder()(inputs_embeds=prompts, use_cache=True)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache_of(out).layers]


@dataclass
class TaskSource:
    """One task's soft prompt, loaded for export: its PEFT model (the parity reference) and constant prefix."""

    name: str
    model: Any
    tokenizer: Any
    recipe: Any
    artifact: dict  # the artifact's qprompt.json (or a stand-in for the bare base)
    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    base: Any  # the float32 base the prefix was computed on (bitsandbytes or int4 layers dequantized)
    weights: str  # that base's weights: none (full precision), or the quantization they were dequantized from

    def entry(self) -> TaskEntry:
        recipe = self.recipe
        template = (template_of(recipe, self.tokenizer) if recipe else Template("{text}"))
        labels = ({lab: template.target_text(word) for lab, word in recipe.labels.items()}
                  if recipe and recipe.task == "classification" else {})
        a = self.artifact
        truncation = None
        if recipe and recipe.data.on_long == "truncate":
            from ..data import Encoder

            encoder = Encoder(recipe, self.tokenizer, a["virtual_tokens"])
            truncation = {"max_length": encoder.max_length, "tail_tokens": encoder.tail_tokens}
        return TaskEntry(self.name, recipe.task if recipe else "generation", template,
                         recipe.data.label_field if recipe else "label", labels, a["virtual_tokens"],
                         {"artifact": a.get("folder"), "base": portable_base(a["base"]), "method": a["method"],
                          "virtual_tokens": a["virtual_tokens"]}, truncation=truncation)


def load_task(artifact: str | Path | None, weights: str, name: str | None = None, base_model: str | None = None,
              recipe=None, int4_scheme: dict | None = None) -> TaskSource:
    """An artifact (or, with `base_model`, a bare base: no soft prompt), ready to export on float32 weights."""
    if base_model is None:
        model, tokenizer, recipe, manifest = load_artifact(artifact, quant=weights, compute_dtype="float32",
                                                           device="cpu", int4_scheme=int4_scheme)
        manifest = {**manifest, "folder": Path(artifact).resolve().name}
    else:
        from ..models import load_model

        model, tokenizer, info = load_model(base_model, weights, "float32", "cpu", int4_scheme=int4_scheme)
        manifest = {"base": info.to_dict(), "method": "none", "virtual_tokens": 0, "folder": None}
    model.eval()
    base = model.get_base_model() if virtual_tokens(model) else model
    if weights == "int4":
        from ..int4 import dequantize_model

        dequantize_model(base)  # float32 Linear layers holding the int4 grid's values
    elif weights != "none":
        base.dequantize()  # swaps each Linear4bit for a float32 Linear holding the same values
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config  # the weights are float now: saved, they must read as such
    name = name or (Path(artifact).resolve().name if artifact else "base")
    return TaskSource(name, model, tokenizer, recipe, manifest, constant_prefix(model), base, weights)
