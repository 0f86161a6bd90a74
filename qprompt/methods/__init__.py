"""The soft-prompt methods, as a registry: one module per method declares all that qprompt asks of it.

A method is its PEFT config, its own options (a dataclass of `option` fields: they become keys of a
recipe's `method:` section), an optional initialisation once PEFT has built the prompt, the learning
rate measured to train it, how its prompt enters the model (and so the export), and its
trainable-parameter count for `qprompt plan`. The CLI's choices, config validation, `tune`'s search
space, plan and the benches read the registry, so a new method is one module in this folder that
calls `register` (every module here is imported), plus its tests; a new option is one field.

PEFT owns the prompt's parameters, their initialisation and the adapter files, so every artifact
stays loadable with `PeftModel.from_pretrained`. Importing this module imports neither torch nor
PEFT: the torch-free deploy install reads the method names too.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QPromptError

if TYPE_CHECKING:
    from peft import PeftModel

    from ..config import MethodConfig, RecipeConfig

# How a method's prompt enters the frozen decoder; the forward pass and the export follow it.
EMBEDDING_PREFIX = "embedding prefix"  # virtual token embeddings in front of the real ones
KV_PREFIX = "kv prefix"  # keys/values every layer reads before the real tokens' own


def option(default: Any, help: str, choices: tuple = (), low: int | None = None) -> Any:
    """A field of a method's options dataclass: its default, its help, and what values it may take: `choices`
    (checked in every recipe, searched by `qprompt tune`) or a lowest value `low`."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices), "low": low})


@dataclass(frozen=True)
class SoftPromptMethod:
    name: str  # as the CLI and recipes name it, e.g. prompt-tuning
    help: str  # a few words for --help
    peft_config: Callable[[MethodConfig, RecipeConfig, str], Any]  # (method, recipe, tokenizer path) -> PEFT config
    # Peak learning rate measured to train it in 50 steps on SmolLM2-135M (docs/results.md); a --method other than
    # the recipe's trains at this rate unless --lr says otherwise.
    suggested_lr: float
    exports_as: str  # EMBEDDING_PREFIX or KV_PREFIX
    # (plan.Shape, virtual tokens, **options: encoder, encoder_hidden, prefix_projection) -> parameters PEFT trains.
    trainable_parameters: Callable[..., int]
    # (PEFT model, recipe, tokenizer path, seed): changes the prompt PEFT initialised; None keeps PEFT's.
    initialise: Callable[[PeftModel, RecipeConfig, str, int], None] | None = None
    # Whether method.init shapes the starting prompt (else random encoder weights do): the benches record it.
    uses_init: Callable[[MethodConfig], bool] = lambda method: True
    # The dataclass of the options only this method reads (fields made with `option`); they join MethodConfig,
    # so a recipe sets them under `method:` and the CLI as method.NAME=VALUE.
    options: type | None = None
    # The method's own settings a benchmark row records, e.g. p-tuning's encoder.
    settings: Callable[[MethodConfig], dict] = lambda method: {}
    # Whether method.init_from can start it from a saved prompt: true when it learns the prompt tensor itself
    # (no encoder in between), so the saved tensor can be its starting point.
    starts_from_prompt: Callable[[MethodConfig], bool] = lambda method: False
    listed: int = 100  # where the CLI lists it (lower first)

    def option_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options) if self.options else ()

    def choices(self) -> dict[str, tuple]:
        """The options with a set of allowed values, e.g. p-tuning's encoder: (mlp, lstm)."""
        return {f.name: f.metadata["choices"] for f in self.option_fields() if f.metadata["choices"]}


METHODS: dict[str, SoftPromptMethod] = {}


def register(method: SoftPromptMethod) -> SoftPromptMethod:
    if method.name in METHODS:
        raise ValueError(f"a soft-prompt method named {method.name!r} is already registered")
    if method.exports_as not in (EMBEDDING_PREFIX, KV_PREFIX):
        raise ValueError(f"{method.name}: exports_as must be EMBEDDING_PREFIX or KV_PREFIX")
    known = option_fields()
    for f in method.option_fields():  # one name, one meaning: two methods may share an option only if it agrees
        if f.name in known and (known[f.name].type, known[f.name].default) != (f.type, f.default):
            raise ValueError(f"{method.name}: option {f.name!r} differs from another method's option of that name")
    METHODS[method.name] = method
    ordered = sorted(METHODS.values(), key=lambda m: m.listed)
    METHODS.clear()
    METHODS.update((m.name, m) for m in ordered)
    return method


def option_fields() -> dict[str, dataclasses.Field]:
    """Every registered method's options by name: the method-specific part of MethodConfig."""
    return {f.name: f for method in METHODS.values() for f in method.option_fields()}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> SoftPromptMethod:
    if name not in METHODS:
        raise QPromptError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def option_choices(option: str) -> list[str]:
    """The values the registered methods allow for a MethodConfig option, e.g. encoder: mlp, lstm."""
    return [value for method in METHODS.values() for value in method.choices().get(option, ())]


def learning_rate_for(method: str | None, recipe: RecipeConfig, lr: float | None) -> float | None:
    """--lr when given; for a --method other than the recipe's, the rate measured for that method
    (the recipe's rate was chosen for its own method); else None, keeping the recipe's."""
    if lr is None and method and method != recipe.method.name:
        return get_method(method).suggested_lr
    return lr


def init_text(method: MethodConfig, recipe: RecipeConfig) -> str:
    """The text a prompt starts from: the label words for init=labels (class-label init, Lester et al.),
    else init_text or the template's instruction."""
    if method.init == "labels":
        return " ".join(recipe.labels.values())
    return method.init_text or recipe.template.instruction


def add_soft_prompt(model, recipe: RecipeConfig, tokenizer_path: str, seed: int = 0) -> PeftModel:
    """Wrap a frozen base model with a freshly initialised soft prompt of the recipe's method."""
    import torch
    from peft import get_peft_model

    from ..models import keep_4bit_layers_trainable

    method = get_method(recipe.method.name)
    keep_4bit_layers_trainable(model)  # also for a model loaded by the caller: an initialise hook may run it
    torch.manual_seed(seed)  # vocab and random init draw from torch's generator
    config = method.peft_config(recipe.method, recipe, tokenizer_path)
    if method.exports_as == KV_PREFIX and getattr(config, "token_dim", None) is None:
        # PEFT sizes a prefix from the config's head counts, which some families state otherwise than their cache
        # holds (Falcon's multi-query attention keeps one key/value head whatever num_kv_heads says): size it
        # from the cache itself.
        from ..forward import cache_shape

        heads, head_dim = cache_shape(model)
        config.num_attention_heads, config.token_dim = heads, heads * head_dim
    peft_model = get_peft_model(model, config)
    if method.initialise is not None:
        method.initialise(peft_model, recipe, tokenizer_path, seed)
    return peft_model


def load_soft_prompt(model, folder: str | Path) -> PeftModel:
    """A saved soft prompt on `model`, for inference."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file, for direct callers
        raise QPromptError(f"could not load the soft prompt in {folder} ({str(exc).splitlines()[0]})") from exc


def trainable_parameters(model) -> int:
    """Counted on a built model; a method's `trainable_parameters` predicts it from the shape alone."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


for _module in pkgutil.iter_modules(__path__):  # every method module in this folder registers itself
    importlib.import_module(f".{_module.name}", __package__)
