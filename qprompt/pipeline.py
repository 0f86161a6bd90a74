"""The main job, in steps: read a recipe's data, score the hand-written prompt, train the soft prompt,
score it on the same held-out rows. `train_and_compare` runs them all (`qprompt job`); the recipe
scripts call the steps one by one, so each reads as its task's job. No command-line code here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .artifact import MANIFEST, load_artifact, read_manifest
from .config import RecipeConfig
from .data import check_recipe_rows, check_splits, load_splits, read_rows
from .evaluate import evaluate, main_metric
from .models import load_model
from .tracking import Report
from .train import train

log = logging.getLogger("qprompt")


@dataclass
class JobOptions:
    """Where the job reads and writes, and how it runs; the recipe holds everything about the task."""

    output: str | Path = "runs/job"  # the artifact folder
    data: str | None = None  # training rows [default: the recipe's source]
    eval_data: str | None = None  # validation rows [default: held out from the training rows]
    test_data: str | None = None  # test rows [default: the recipe's test split, else the validation rows]
    test_limit: int | None = None  # score only the first N test rows
    resume: bool = False  # continue an interrupted run in `output`
    overwrite: bool = False  # train again even if `output` holds a trained prompt
    compute_dtype: str | None = None
    device: str | None = None
    json_out: str | None = None  # also write the results here
    report_to: tuple[str, ...] = ()  # experiment trackers training logs to (tensorboard, mlflow)


@dataclass
class JobData:
    splits: dict[str, list[dict]]  # train / validation (/ test) rows
    test: list[dict]  # the rows both prompts are scored on
    where: str  # what the test rows are, for messages


def load_job_data(recipe: RecipeConfig, job: JobOptions) -> JobData:
    """The splits and the test rows, every row checked now: a bad one fails in a second, not after the model load."""
    splits = load_splits(recipe, job.data, job.eval_data)
    if job.test_data:
        test, where = read_rows(job.test_data), job.test_data
    elif "test" in splits:
        test, where = splits["test"], f"{recipe.name} test rows"
    else:  # user files without a test file: score on the validation rows, and say so
        log.warning("no test rows given (--test-data): reporting on the validation rows")
        test, where = splits["validation"], job.eval_data or job.data  # the file the rows' line numbers refer to
    test = test[: job.test_limit] if job.test_limit else test
    check_splits(recipe, splits, job.data, job.eval_data)
    check_recipe_rows(recipe, test, where)
    return JobData(splits, test, where)


def load_base(recipe: RecipeConfig, job: JobOptions):
    """(model, tokenizer, info) of the recipe's base, quantized as the recipe says."""
    return load_model(recipe.model, recipe.quant, job.compute_dtype, job.device)


def score_hard_prompt(model, tokenizer, recipe: RecipeConfig, data: JobData) -> dict:
    """The base with the recipe's hand-written instruction and no soft prompt."""
    log.info("hard-prompt baseline on %d test rows", len(data.test))
    return evaluate(model, tokenizer, recipe, data.test, data.where, hard_prompt=True)


def train_or_reuse(recipe: RecipeConfig, model, tokenizer, info, data: JobData, job: JobOptions) -> None:
    """Train the soft prompt into `job.output`; a finished one already there is kept (unless `overwrite`), so
    running the job twice never throws away a trained prompt."""
    output = Path(job.output)
    if (output / MANIFEST).is_file() and not job.overwrite and not job.resume:
        log.info("%s already holds a trained soft prompt: evaluating it (pass --overwrite to train again)", output)
        return
    log.info("training %s: %d rows, %d validation rows", recipe.method.name, len(data.splits["train"]),
             len(data.splits["validation"]))
    train(recipe, model, tokenizer, info, data.splits, output, resume=job.resume, overwrite=job.overwrite,
          report=Report(tuple(job.report_to)))


def score_artifact(recipe: RecipeConfig, data: JobData, job: JobOptions) -> dict:
    """The trained prompt in `job.output`, loaded on its base, on the test rows."""
    model, tokenizer, tuned_recipe, _ = load_artifact(job.output, recipe.model, recipe.quant, job.compute_dtype,
                                                      job.device)
    log.info("soft prompt on %d test rows", len(data.test))
    return evaluate(model, tokenizer, tuned_recipe, data.test, data.where)


def report(recipe: RecipeConfig, baseline: dict, tuned: dict, job: JobOptions) -> dict:
    """The comparison as a dict (written to `job.json_out` too, without per-row predictions)."""
    result = {"metric": main_metric(recipe), "baseline": baseline, "soft_prompt": tuned,
              "training": read_manifest(job.output)["training"], "output": str(job.output)}
    if job.json_out:
        slim = {k: ({kk: vv for kk, vv in v.items() if kk != "predictions"} if isinstance(v, dict) else v)
                for k, v in result.items()}
        Path(job.json_out).write_text(json.dumps(slim, indent=1) + "\n")
    return result


def train_and_compare(recipe: RecipeConfig, job: JobOptions) -> dict:
    """The whole job: {"baseline": metrics, "soft_prompt": metrics, "training": ...} on the same test rows."""
    data = load_job_data(recipe, job)
    model, tokenizer, info = load_base(recipe, job)
    baseline = score_hard_prompt(model, tokenizer, recipe, data)
    train_or_reuse(recipe, model, tokenizer, info, data, job)
    del model  # the artifact is loaded on a fresh base: exactly what a user of the artifact gets
    return report(recipe, baseline, score_artifact(recipe, data, job), job)


def report_lines(result: dict) -> list[str]:
    """A short table of the comparison, for printing."""
    m = result["metric"]
    t = result["training"]
    return [
        f"{'':<28}{m:>10}{'rows':>8}",
        f"{'hard prompt (instruction)':<28}{result['baseline'][m]:>10.4f}{result['baseline']['rows']:>8}",
        f"{'soft prompt (qprompt)':<28}{result['soft_prompt'][m]:>10.4f}{result['soft_prompt']['rows']:>8}",
        f"training: {t['steps']} steps, {t['wall_seconds']:.0f} s wall ({t['seconds']:.0f} s in steps), "
        f"{t['tokens_per_s']:.0f} tokens/s, {t['trainable_parameters']} trainable parameters; "
        f"artifact: {result['output']}",
    ]
