"""The main job, in steps: read a recipe's data, score the hand-written prompt, train the soft prompt,
score it on the same held-out rows. `train_and_compare` runs them all (`qprompt job`); the recipe
scripts call the steps one by one, so each reads as its task's job. No command-line code here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import owned
from .artifact import MANIFEST, load_artifact, read_manifest
from .baselines import DEFAULT_BASELINES, finetune, score_kshot
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
    baselines: tuple[str, ...] = DEFAULT_BASELINES  # what the soft prompt is compared with (qprompt/baselines.py)
    baseline_budget: str = "steps"  # lora/full train the soft prompt's steps, or for its training time ("time")


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


def score_prompting(model, tokenizer, recipe: RecipeConfig, data: JobData, job: JobOptions) -> dict:
    """The prompting baselines `job.baselines` names, on the base: hard (0-shot) and kshot."""
    out = {}
    if "hard" in job.baselines:
        out["hard"] = score_hard_prompt(model, tokenizer, recipe, data)
    if "kshot" in job.baselines:
        log.info("k-shot baseline on %d test rows", len(data.test))
        out["kshot"] = score_kshot(model, tokenizer, recipe, data.splits["train"], data.test, data.where)
    return out


def score_finetuned(recipe: RecipeConfig, data: JobData, job: JobOptions) -> dict:
    """The fine-tuning baselines `job.baselines` names (lora, full), trained for as many steps as the soft prompt
    took (or for as long: `job.baseline_budget`), on its rows, with its batch and schedule; their artifacts go to
    OUTPUT/baselines/."""
    training = read_manifest(job.output)["training"]
    steps, seconds = training["steps"], training["seconds"] if job.baseline_budget == "time" else None
    out = {}
    for kind in ("lora", "full"):
        if kind in job.baselines:
            folder = Path(job.output) / "baselines" / kind
            owned.claim(Path(job.output), "baselines")
            folder.mkdir(parents=True, exist_ok=True)
            out[kind] = finetune(kind, recipe, data.splits, data.test, data.where, steps, folder, job.compute_dtype,
                                 job.device, seconds)
    return out


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


def report(recipe: RecipeConfig, baselines: dict, tuned: dict, job: JobOptions) -> dict:
    """The comparison as a dict (written to `job.json_out` too, without per-row predictions): `baselines` by name,
    `baseline` the hard prompt's row, `soft_prompt` with its trainable parameters, time, memory and size."""
    training = read_manifest(job.output)["training"]
    adapter = Path(job.output) / "adapter_model.safetensors"
    tuned = {**tuned, "trainable_parameters": training["trainable_parameters"],
             "train_seconds": training["seconds"], "peak_memory_gb": training.get("peak_memory_gb"),
             "artifact_bytes": adapter.stat().st_size, "steps": training["steps"]}
    result = {"metric": main_metric(recipe), "baselines": baselines, "baseline": baselines.get("hard"),
              "soft_prompt": tuned, "training": training, "output": str(job.output)}
    if job.json_out:
        Path(job.json_out).write_text(json.dumps(slim(result), indent=1) + "\n")
    return result


def slim(value):
    """`value` without per-row predictions, at any depth."""
    if isinstance(value, dict):
        return {k: slim(v) for k, v in value.items() if k != "predictions"}
    return value


def train_and_compare(recipe: RecipeConfig, job: JobOptions) -> dict:
    """The whole job: {"baselines": {name: metrics}, "soft_prompt": metrics, "training": ...} on the same test
    rows."""
    data = load_job_data(recipe, job)
    model, tokenizer, info = load_base(recipe, job)
    prompting = score_prompting(model, tokenizer, recipe, data, job)
    train_or_reuse(recipe, model, tokenizer, info, data, job)
    del model  # the artifact is loaded on a fresh base: exactly what a user of the artifact gets
    tuned = score_artifact(recipe, data, job)
    return report(recipe, {**prompting, **score_finetuned(recipe, data, job)}, tuned, job)


# How the report names each row.
ROW_NAMES = {"hard": "hard prompt (0-shot)", "kshot": "hard prompt (k-shot)", "lora": "LoRA (fine-tuning)",
             "full": "full fine-tuning", "soft_prompt": "soft prompt (qprompt)"}


def report_lines(result: dict) -> list[str]:
    """A short table of the comparison, for printing: each row's metric on the same test rows, and for the trained
    ones their trainable parameters, training time, peak memory and artifact size."""
    m = result["metric"]
    t = result["training"]
    rows = {**result["baselines"], "soft_prompt": result["soft_prompt"]}
    lines = [f"{'':<24}{m:>10}{'rows':>6}{'trainable':>12}{'train s':>9}{'peak GB':>9}{'artifact':>11}"]
    for name, row in rows.items():
        line = f"{ROW_NAMES[name]:<24}{row[m]:>10.4f}{row['rows']:>6}"
        if "trainable_parameters" in row:
            peak = row.get("peak_memory_gb")
            line += (f"{row['trainable_parameters']:>12,}{row['train_seconds']:>9.1f}"
                     f"{'' if peak is None else f'{peak:.2f}':>9}{_size(row['artifact_bytes']):>11}")
        lines.append(line)
    lines.append(f"soft prompt training: {t['steps']} steps ({t.get('stopped') or 'max_steps'}), "
                 f"{t['wall_seconds']:.0f} s wall, {t['tokens_per_s']:.0f} tokens/s; artifact: {result['output']}")
    return lines


def _size(n: int) -> str:
    return f"{n / 1024**2:.1f} MB" if n >= 1024**2 else f"{n / 1024:.0f} KB"
