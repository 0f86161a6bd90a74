"""The artifact folder: a PEFT adapter plus `qprompt.json`, which says what it was trained on.

    ARTIFACT/
      adapter_config.json, adapter_model.safetensors   the best soft prompt (PEFT's own format)
      qprompt.json       base model identity, quantization, recipe, template, labels, metrics
      metrics.jsonl      one line per logged step and per evaluation
      loss.png           the training curve
      checkpoint/        the last training state, for --resume
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import __version__
from .config import RecipeConfig, from_dict
from .deploy.runtime import ExportError, read_json_object
from .errors import QPromptError
from .methods import load_soft_prompt
from .models import ModelInfo, load_model

MANIFEST = "qprompt.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "qprompt-artifact/1"
log = logging.getLogger("qprompt")


# ------------------------------------------------------------------------------------ checkpoint
# The keys train.py reads back from checkpoint/state.pt on --resume.
CHECKPOINT_KEYS = ("optimizer", "scheduler", "rng", "prompt_encoder", "step", "epoch", "position", "best",
                   "best_step", "tokens", "seconds", "wall_seconds", "recipe_digest", "fingerprint")


def read_checkpoint_state(path: str | Path) -> dict:
    """checkpoint/state.pt for --resume: tensors and plain data only (weights_only), and a clear error when
    the file is truncated, damaged or not a qprompt checkpoint."""
    import pickle

    import torch

    path = Path(path)
    fix = (f"if you kept a copy of the run folder {path.parent.parent}, resume from the copy; else start the run again "
           "with --overwrite (this checkpoint's progress is lost)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: running code from the file
        raise QPromptError(f"checkpoint {path} holds more than tensors and plain values, so it was not written by "
                           f"qprompt, and qprompt never runs code from a checkpoint; {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first.split(". ")[0][:160]
        raise QPromptError(f"checkpoint {path} cannot be read: it is truncated or damaged ({first}); {fix}") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else ["all keys"]
    if missing:
        raise QPromptError(f"checkpoint {path} is not a qprompt training state (missing {missing[0]!r}); {fix}")
    return state


# --------------------------------------------------------------------------------------- manifest
def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def manifest(info: ModelInfo, recipe: RecipeConfig, metrics: dict, training: dict, samples: list[dict]) -> dict:
    return {
        "format": FORMAT,
        "qprompt_version": __version__,
        "base": info.to_dict(),
        "method": recipe.method.name,
        "virtual_tokens": recipe.method.virtual_tokens,
        "task": recipe.task,
        "labels": recipe.labels,
        "template": recipe.to_dict()["template"],
        "recipe": recipe.to_dict(),
        "recipe_digest": recipe.digest(),
        "metrics": metrics,
        "training": training,
        "samples": samples,  # a few validation rows: export checks its graph against PyTorch on them
    }


# The keys read back from qprompt.json (by eval, generate, export and the recipe scripts).
MANIFEST_KEYS = ("base", "base.name", "base.quant", "base.fingerprint", "recipe", "method", "virtual_tokens",
                 "training")


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise QPromptError(f"artifact folder {folder} does not exist; pass the --output folder of `qprompt train`")
    if not path.is_file():
        raise QPromptError(f"{folder} has no {MANIFEST}, so it is not a qprompt artifact; "
                           "pass an --output folder of `qprompt train`")
    fix = "restore it from a copy or train again"
    try:
        data = read_json_object(path, FORMAT, MANIFEST_KEYS, fix)
    except ExportError as exc:  # the shared reader's type; here it is an artifact problem
        raise QPromptError(str(exc)) from None
    if not isinstance(data["recipe"], dict) or not isinstance(data["base"], dict):
        raise QPromptError(f"{path}: 'base' and 'recipe' must be JSON objects; {fix}")
    return data


def recipe_of(data: dict) -> RecipeConfig:
    return from_dict(RecipeConfig, data["recipe"], f"{MANIFEST} recipe").validate()


def check_base(data: dict, info: ModelInfo, folder: str | Path) -> None:
    """Refuse a base model whose architecture or vocabulary differs from the one trained on."""
    trained = data["base"]
    if trained.get("fingerprint") != info.fingerprint:
        if trained.get("name") == info.name:  # the same name now loads another model
            raise QPromptError(
                f"artifact {folder} was trained on {info.name!r} with fingerprint {trained.get('fingerprint')}, but "
                f"{info.name!r} now loads a model with fingerprint {info.fingerprint} (another architecture or "
                "vocabulary): put the original model back at that name, or train a prompt for this one")
        raise QPromptError(
            f"artifact {folder} was trained on {trained.get('name')!r} (fingerprint {trained.get('fingerprint')}), "
            f"but the model given is {info.name!r} (fingerprint {info.fingerprint}); pass --model "
            f"{trained.get('name')}, the base it was trained on"
        )
    if trained.get("name") != info.name:
        log.warning("base %r differs by name from %r but has the same fingerprint", info.name, trained.get("name"))


def load_artifact(folder: str | Path, model: str | None = None, quant: str | None = None,
                  compute_dtype: str | None = None, device: str | None = None, int4_scheme: dict | None = None):
    """Base model (as recorded, or as overridden) + the soft prompt; returns (model, tokenizer, recipe, manifest).
    quant int4: `int4_scheme` if given, else the artifact's own if it was trained on int4, else the default."""
    data = read_manifest(folder)
    if not (Path(folder) / "adapter_config.json").is_file():
        raise QPromptError(f"{folder} has no adapter_config.json: training never saved a prompt; train again")
    check_adapter_weights(folder)
    base = data["base"]
    quant = quant or base["quant"]
    scheme = int4_scheme or (base.get("int4") if quant == base.get("quant") else None)  # the grid it was trained on
    model_obj, tokenizer, info = load_model(model or base["name"], quant, compute_dtype, device, int4_scheme=scheme)
    check_base(data, info, folder)
    return load_soft_prompt(model_obj, folder), tokenizer, recipe_of(data), data


# ----------------------------------------------------------------------------- checks before loading
# Both files are read only after the ~20-second base load, and their libraries' errors are tracebacks.
def check_adapter_weights(folder: str | Path) -> None:
    """Refuse a missing, truncated or damaged adapter_model.safetensors before PEFT reads it."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise QPromptError(f"{folder} has no {ADAPTER_WEIGHTS}: the soft prompt itself is missing; copy the "
                           "artifact again or train again")
    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header against the file's size
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise QPromptError(f"{path} is damaged ({str(exc).splitlines()[0]}); copy the artifact again or "
                           "train again") from exc
