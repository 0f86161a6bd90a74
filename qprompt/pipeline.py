"""The main job, as one function: train a recipe's soft prompt, then score it and the hard-prompt
baseline on the same held-out rows. Recipe scripts call this; so can your own code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .artifact import MANIFEST, load_artifact, read_manifest
from .config import RecipeConfig
from .data import check_recipe_rows, check_splits, load_splits, read_rows
from .evaluate import evaluate, main_metric
from .methods import learning_rate_for
from .models import load_model
from .train import train

log = logging.getLogger("qprompt")


def train_and_compare(recipe: RecipeConfig, output: str | Path, data: str | None = None,
                      eval_data: str | None = None, test_data: str | None = None, resume: bool = False,
                      overwrite: bool = False, compute_dtype: str | None = None, device: str | None = None,
                      test_limit: int | None = None) -> dict:
    """Returns {"baseline": metrics, "soft_prompt": metrics, "training": ...} on the test rows.

    A finished artifact already in `output` is evaluated again rather than retrained (unless
    `overwrite`), so running the main job twice never throws away a trained prompt.
    """
    output = Path(output)
    splits = load_splits(recipe, data, eval_data)
    if test_data:
        test, where = read_rows(test_data), test_data
    elif "test" in splits:
        test, where = splits["test"], f"{recipe.name} test rows"
    else:  # user files without a test file: score on the validation rows, and say so
        log.warning("no test rows given (--test-data): reporting on the validation rows")
        test, where = splits["validation"], eval_data or data  # the file the rows' line numbers refer to
    test = test[:test_limit] if test_limit else test
    # Every row is checked now: a bad one fails in a second, not after the model load (which checks the tokenizer).
    check_splits(recipe, splits, data, eval_data)
    check_recipe_rows(recipe, test, where)

    model, tokenizer, info = load_model(recipe.model, recipe.quant, compute_dtype, device)
    log.info("hard-prompt baseline on %d test rows", len(test))
    baseline = evaluate(model, tokenizer, recipe, test, where, hard_prompt=True)

    if (output / MANIFEST).is_file() and not overwrite and not resume:
        log.info("%s already holds a trained soft prompt: evaluating it (pass --overwrite to train again)", output)
    else:
        log.info("training %s: %d rows, %d validation rows", recipe.method.name, len(splits["train"]),
                 len(splits["validation"]))
        train(recipe, model, tokenizer, info, splits, output, resume=resume, overwrite=overwrite)
    del model
    tuned_model, tokenizer, tuned_recipe, _ = load_artifact(output, recipe.model, recipe.quant, compute_dtype, device)
    log.info("soft prompt on %d test rows", len(test))
    tuned = evaluate(tuned_model, tokenizer, tuned_recipe, test, where)
    return {"metric": main_metric(recipe), "baseline": baseline, "soft_prompt": tuned,
            "training": read_manifest(output)["training"], "output": str(output)}


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


def recipe_command(config_path: Path):
    """The command line of a recipe script: its YAML gives the defaults, options override them."""
    import json as _json

    import click

    from .cli import (
        MethodChoice,
        QPromptCommand,
        check_output_file,
        check_output_folder,
        model_options,
        quiet_libraries,
    )
    from .config import load_recipe_file, override

    @click.command(cls=QPromptCommand, help=f"Train the {config_path.stem} soft prompt and compare it with the "
                   "hand-written prompt on the test rows.")
    @click.option("--model", type=str, default=None, help="Base model [default: the recipe's].")
    @model_options
    @click.option("--method", type=MethodChoice(), default=None)
    @click.option("--data", type=str, default=None, help="Training rows [default: the recipe's source].")
    @click.option("--eval-data", type=str, default=None, help="Validation rows [default: held out].")
    @click.option("--test-data", type=str, default=None, help="Test rows [default: held out from the source].")
    @click.option("--test-limit", type=click.IntRange(1), default=None, help="Score only the first N test rows.")
    @click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps.")
    @click.option("--virtual-tokens", type=click.IntRange(1), default=None, help="Number of virtual tokens.")
    @click.option("--lr", type=float, default=None,
                  help="Peak learning rate [default: the recipe's; for another --method, the rate measured for it].")
    @click.option("--output", type=click.Path(file_okay=False), default=f"runs/{config_path.stem}",
                  show_default=True, help="Artifact folder.")
    @click.option("--resume", is_flag=True, help="Continue an interrupted run in --output.")
    @click.option("--overwrite", is_flag=True, help="Train again even if --output holds a trained prompt.")
    @click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the results.")
    def main(model, quant, compute_dtype, device, method, data, eval_data, test_data, test_limit, max_steps,
             virtual_tokens, lr, output, resume, overwrite, json_out):
        quiet_libraries()
        check_output_file(json_out, "--json")
        check_output_folder(output, "--output")
        recipe = load_recipe_file(config_path)
        recipe = override(recipe, model=model, quant=quant, method__name=method, train__max_steps=max_steps,
                          method__virtual_tokens=virtual_tokens, train__lr=learning_rate_for(method, recipe, lr))
        result = train_and_compare(recipe, output, data, eval_data, test_data, resume, overwrite, compute_dtype,
                                   device, test_limit)
        click.echo("\n".join(report_lines(result)))
        if json_out:
            slim = {k: ({kk: vv for kk, vv in v.items() if kk != "predictions"} if isinstance(v, dict) else v)
                    for k, v in result.items()}
            Path(json_out).write_text(_json.dumps(slim, indent=1) + "\n")

    return main
