"""Benchmark: the sentiment recipe with its defaults on ../shared/data/rotten_tomatoes.

Trains on the shared train split, keeps the best prompt on the validation split, and scores the
hard-prompt baseline and the soft prompt on the full test split. Prints a table, writes JSON.

    python bench/sentiment.py [--quant nf4] [--max-steps N] [--out bench/results/sentiment-nf4.json]
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"


@click.command()
@click.option("--quant", default="nf4", show_default=True)
@click.option("--max-steps", type=int, default=None, help="Override the recipe's steps.")
@click.option("--lr", type=float, default=None, help="Override the recipe's learning rate.")
@click.option("--output", default="runs/bench-sentiment", show_default=True, help="Artifact folder (replaced).")
@click.option("--out", "json_out", default=None, help="JSON results [default: bench/results/sentiment-QUANT.json].")
@click.option("--model", "model_name", default=None, help="Base model [default: the recipe's].")
@click.option("--data", "data_dir", default=str(DATA), show_default=True,
              help="Folder of train.jsonl, validation.jsonl and test.jsonl.")
@click.option("--test-limit", type=int, default=None, help="Score only the first N test rows.")
def main(quant, max_steps, lr, output, json_out, model_name, data_dir, test_limit):
    sys.path.insert(0, str(ROOT))
    from machine import describe

    from qprompt.cli import quiet_libraries
    from qprompt.config import load_recipe_file, override
    from qprompt.pipeline import JobOptions, report_lines, train_and_compare

    quiet_libraries()
    recipe = override(load_recipe_file(ROOT / "recipes" / "sentiment.yaml"), model=model_name, quant=quant,
                      train__max_steps=max_steps, train__lr=lr)
    data = Path(data_dir)
    start = time.perf_counter()
    job = JobOptions(output=output, data=str(data / "train.jsonl"), eval_data=str(data / "validation.jsonl"),
                     test_data=str(data / "test.jsonl"), test_limit=test_limit, overwrite=True)
    result = train_and_compare(recipe, job)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    for part in ("baseline", "soft_prompt"):
        result[part].pop("predictions", None)
    result.update(quant=quant, recipe=recipe.to_dict(), total_seconds=round(time.perf_counter() - start, 1),
                  peak_rss_gb=round(peak_rss_gb, 2), command=" ".join(sys.argv), machine=describe())
    click.echo("\n".join(report_lines(result)))
    click.echo(f"peak RSS {peak_rss_gb:.2f} GB; whole job {result['total_seconds']:.0f} s")
    path = Path(json_out or ROOT / "bench" / "results" / f"sentiment-{quant}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
