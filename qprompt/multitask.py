"""Multitask prompt training: one prompt learned on several recipes' rows at once, as a start for new tasks.

Each row keeps its own recipe's template and labels; every epoch takes as many rows from each task (the
smallest task's count; larger tasks show a different slice each epoch), so no task drowns the others. The
validation score is the mean of the tasks' main metrics. Two designs, both PEFT's (the method decides):

- prompt-tuning: one shared prompt for every task (the multitask source prompt of SPoT, Vu et al. 2022);
- multitask-prompt-tuning: the shared prompt times a per-task rank-1 part (MPT, Wang et al. 2023).

A new task starts from the result with `method.init_from` (`qprompt train --init-from`); docs/results.md
measures both designs against starting from the task's own instruction. The artifact is also the first
recipe's artifact (its manifest's recipe, template and samples are that task's), so eval and export work on it.
"""

from __future__ import annotations

import copy
import hashlib
import random
from pathlib import Path

import torch

from .config import MethodConfig, RecipeConfig, TrainConfig
from .data import Encoder, collate
from .errors import QPromptError
from .evaluate import evaluate as evaluate_rows
from .evaluate import main_metric
from .forward import prompt_task
from .models import ModelInfo
from .tracking import Report
from .train import Trainer, read_metrics

MULTITASK_METHODS = ("prompt-tuning", "multitask-prompt-tuning")


def multitask_recipe(recipes: list[RecipeConfig], method: MethodConfig, train: TrainConfig) -> RecipeConfig:
    """The recipe a multitask artifact records: the first task's, with the shared method and schedule."""
    if len(recipes) < 2:
        raise QPromptError("multitask training needs at least two recipes; for one, use `qprompt train`")
    names = [r.name for r in recipes]
    if len(set(names)) < len(names):
        raise QPromptError(f"recipe {names[0]!r} is given twice; name each task once")
    for other in recipes[1:]:
        if (other.model, other.quant) != (recipes[0].model, recipes[0].quant):
            raise QPromptError(f"recipes {recipes[0].name} and {other.name} name different bases "
                               f"({recipes[0].model} {recipes[0].quant} vs {other.model} {other.quant}); pass --model "
                               "and --quant to train all tasks on one")
    if method.name not in MULTITASK_METHODS:
        raise QPromptError(f"multitask training learns prompt-tuning or multitask-prompt-tuning, not {method.name}")
    if method.init_from:
        raise QPromptError("a multitask prompt starts from text, words or noise, not from an artifact (init_from)")
    recipe = copy.deepcopy(recipes[0])
    recipe.method = copy.deepcopy(method)
    recipe.method.tasks = len(recipes) if method.name == "multitask-prompt-tuning" else 1
    recipe.train = copy.deepcopy(train)
    return recipe.validate()


class MultitaskTrainer(Trainer):
    """The Trainer's loop on several tasks: balanced epochs, each row with its task id, per-task validation."""

    def __init__(self, recipes: list[RecipeConfig], recipe: RecipeConfig, tokenizer, info: ModelInfo,
                 splits: list[dict[str, list[dict]]], output: Path, progress: bool = True):
        super().__init__(recipe, tokenizer, info, splits[0], output, progress)
        self.recipes, self.task_splits = recipes, splits
        self.metric_name = "mean_task_metric"

    def digest(self) -> str:
        parts = [self.recipe.digest()] + [r.digest() for r in self.recipes]
        return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]

    def _encode_data(self) -> None:
        self.examples, self.example_task, self.task_rows = [], [], []
        self.task_val_rows = []
        for task, (recipe, splits) in enumerate(zip(self.recipes, self.task_splits)):
            encoder = Encoder(recipe, self.tokenizer, self.recipe.method.virtual_tokens)
            examples = encoder.encode_all(splits["train"], f"{recipe.name} training data")
            self.task_rows.append(list(range(len(self.examples), len(self.examples) + len(examples))))
            self.examples += examples
            self.example_task += [task] * len(examples)
            val_rows = splits["validation"][: recipe.train.eval_rows or None]  # each task's own evaluation size
            encoder.check_rows(val_rows, f"{recipe.name} validation data")
            self.task_val_rows.append(val_rows)
        self.val_rows = [row for rows in self.task_val_rows for row in rows]
        self.per_task = min(len(rows) for rows in self.task_rows)
        self.batch_size = min(self.cfg.batch_size, self.per_task * len(self.recipes))

    def _epoch_rows(self, epoch: int, rng: random.Random) -> list[int]:
        """The same number of rows from every task: slice `epoch` of each task's own fixed shuffle."""
        order = []
        for task, rows in enumerate(self.task_rows):
            shuffled = rows[:]
            random.Random(self.cfg.seed * 1000 + task).shuffle(shuffled)
            start = (epoch * self.per_task) % len(shuffled)
            order += (shuffled[start:] + shuffled[:start])[: self.per_task]
        rng.shuffle(order)
        return order

    def _next_batch(self) -> dict[str, torch.Tensor]:
        rows = self._next_rows()
        batch = collate([self.examples[i] for i in rows], self.tokenizer.pad_token_id)
        batch["task_ids"] = torch.tensor([self.example_task[i] for i in rows], dtype=torch.long)
        return batch

    def _validate(self) -> tuple[float, dict]:
        metrics, variance = {}, 0.0
        for task, (recipe, rows) in enumerate(zip(self.recipes, self.task_val_rows)):
            with prompt_task(self.model, task):
                result = evaluate_rows(self.model, self.tokenizer, recipe, rows, f"{recipe.name} validation data")
            metrics[recipe.name] = float(result[main_metric(recipe)])
            variance += float(result[main_metric(recipe) + "_se"]) ** 2
        k = len(metrics)  # the mean of k independent task metrics
        return sum(metrics.values()) / k, {"metric": self.metric_name, "tasks": metrics,
                                           "standard_error": variance**0.5 / k}

    def _manifest_extra(self) -> dict:
        """Each task's recipe and validation metric at the kept step."""
        best = [r for r in read_metrics(self.output) if "eval" in r and r["step"] == self.state["kept_step"]]
        at_best = best[-1]["tasks"] if best else {}
        return {"multitask": {"rows_per_task_per_epoch": self.per_task, "tasks": [
            {"name": r.name, "metric": main_metric(r), "validation": at_best.get(r.name), "recipe": r.to_dict()}
            for r in self.recipes]}}

def train_multitask(recipes: list[RecipeConfig], method: MethodConfig, train: TrainConfig, output: str | Path,
                    data: dict[str, str] | None = None, resume: bool = False, overwrite: bool = False,
                    compute_dtype: str | None = None, device: str | None = None, progress: bool = True,
                    report: Report | None = None) -> dict:
    """Train one prompt on every recipe's rows; `data` maps a recipe's name to its own training file (else its
    source). Writes the artifact to `output` and returns its manifest; `report`: experiment trackers."""
    from .data import check_splits, load_splits
    from .models import load_model

    recipe = multitask_recipe(recipes, method, train)
    data = data or {}
    unknown = set(data) - {r.name for r in recipes}
    if unknown:
        raise QPromptError(f"--data names {sorted(unknown)[0]!r}, which is not one of the recipes given "
                           f"({', '.join(r.name for r in recipes)}); write it as RECIPE=FILE")
    splits = []
    for r in recipes:
        splits.append(load_splits(r, data.get(r.name)))
        check_splits(r, splits[-1], data.get(r.name))  # bad rows fail now, not after the model load
    model, tokenizer, info = load_model(recipe.model, recipe.quant, compute_dtype, device)
    trainer = MultitaskTrainer(recipes, recipe, tokenizer, info, splits, Path(output), progress)
    trainer.setup(model, resume, overwrite, report)
    trainer.train()
    return trainer.save()
