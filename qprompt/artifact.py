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
from .errors import QPromptError
from .methods import load_soft_prompt
from .models import ModelInfo, load_model

MANIFEST = "qprompt.json"
FORMAT = "qprompt-artifact/1"
log = logging.getLogger("qprompt")


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


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise QPromptError(f"artifact folder {folder} does not exist; pass the --output folder of `qprompt train`")
    if not path.is_file():
        raise QPromptError(f"{folder} has no {MANIFEST}, so it is not a qprompt artifact; "
                           "pass an --output folder of `qprompt train`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QPromptError(f"{path} is not valid JSON (line {exc.lineno}); restore it or train again") from exc
    missing = [k for k in ("format", "base", "recipe") if k not in data]
    if missing or data.get("format") != FORMAT:
        raise QPromptError(f"{path} is not a {FORMAT} manifest (missing {', '.join(missing) or 'format'}); train again")
    return data


def recipe_of(data: dict) -> RecipeConfig:
    return from_dict(RecipeConfig, data["recipe"], MANIFEST).validate()


def check_base(data: dict, info: ModelInfo, folder: str | Path) -> None:
    """Refuse a base model whose architecture or vocabulary differs from the one trained on."""
    trained = data["base"]
    if trained.get("fingerprint") != info.fingerprint:
        raise QPromptError(
            f"artifact {folder} was trained on {trained.get('name')!r} (fingerprint {trained.get('fingerprint')}), "
            f"but the model given is {info.name!r} (fingerprint {info.fingerprint}); pass --model {trained.get('name')}"
        )
    if trained.get("name") != info.name:
        log.warning("base %r differs by name from %r but has the same fingerprint", info.name, trained.get("name"))


def load_artifact(folder: str | Path, model: str | None = None, quant: str | None = None,
                  compute_dtype: str | None = None, device: str | None = None):
    """Base model (as recorded, or as overridden) + the soft prompt; returns (model, tokenizer, recipe, manifest)."""
    data = read_manifest(folder)
    if not (Path(folder) / "adapter_config.json").is_file():
        raise QPromptError(f"{folder} has no adapter_config.json: training never saved a prompt; train again")
    base = data["base"]
    model_obj, tokenizer, info = load_model(model or base["name"], quant or base["quant"], compute_dtype, device)
    check_base(data, info, folder)
    return load_soft_prompt(model_obj, folder), tokenizer, recipe_of(data), data
