"""Benchmark: what LoRA's dropout costs the fine-tuning baseline on CPU (peak memory and time per step).

PEFT applies LoRA dropout to each adapted layer's input separately, and autograd keeps every dropped-out copy for
the backward pass: seven copies per decoder layer with `target_modules="all-linear"`. This trains the job's LoRA
baseline (`qprompt.baselines.finetune`: the soft prompt trainer's batches and memory settings) for --steps steps on
the recipe's longest training rows, once per dropout value, each in its own process so its peak memory is its own.

    python bench/lora_memory.py --recipe spam --dropouts 0.05,0 --steps 6
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def measure(recipe_name: str, dropout: float, steps: int, batch: int, model: str | None, data: str | None) -> dict:
    """One baseline run on the longest rows (every batch as long as the recipe's data gets)."""
    from qprompt import baselines
    from qprompt.config import load_recipe, override
    from qprompt.data import Encoder, load_splits
    from qprompt.models import load_tokenizer, resolve_model

    recipe = override(load_recipe(recipe_name), model=model)
    splits = load_splits(recipe, data)
    tokenizer = load_tokenizer(resolve_model(recipe.model))  # the rows' lengths only: no model in memory beside
    encoded = Encoder(recipe, tokenizer, 0).encode_all(splits["train"], "training data")
    longest = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].prompt_ids))[: batch * steps]
    rows = [splits["train"][i] for i in longest]
    baselines.LORA["lora_dropout"] = dropout
    recipe.train.batch_size = batch
    with tempfile.TemporaryDirectory() as out:
        row = baselines.finetune("lora", recipe, {"train": rows}, splits["validation"][:batch], "validation rows",
                                 steps, Path(out))
    return {"dropout": dropout, "steps": steps, "batch": batch, "tokens_per_row": len(encoded[longest[-1]].prompt_ids),
            "peak_memory_gb": row["peak_memory_gb"], "seconds_per_step": round(row["train_seconds"] / steps, 2)}


@click.command()
@click.option("--recipe", default="spam", show_default=True)
@click.option("--dropouts", default="0.05,0", show_default=True, help="Comma-separated LoRA dropout values.")
@click.option("--steps", default=6, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--model", default=None, help="Base model [default: the recipe's].")
@click.option("--data", default=None, help="Training rows [default: the recipe's source].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              default=str(ROOT / "bench" / "results" / "lora-memory.json"), show_default=True)
@click.option("--one", type=float, hidden=True, help="Measure this dropout in this process; print its JSON.")
def main(recipe, dropouts, steps, batch, model, data, json_out, one):
    if one is not None:
        print(json.dumps(measure(recipe, one, steps, batch, model, data)))
        return
    rows, given = [], [*(["--model", model] if model else []), *(["--data", data] if data else [])]
    for dropout in (float(d) for d in dropouts.split(",")):
        done = subprocess.run([sys.executable, __file__, "--recipe", recipe, "--steps", str(steps), "--batch",
                               str(batch), *given, "--one", str(dropout)], capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"dropout {dropout} failed: {done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    click.echo(f"LoRA baseline on {recipe}'s {batch * steps} longest training rows, {steps} steps of batch {batch}")
    click.echo(f"{'dropout':>8} {'peak GB':>8} {'s/step':>7}")
    for r in rows:
        click.echo(f"{r['dropout']:>8} {r['peak_memory_gb']:>8.2f} {r['seconds_per_step']:>7.2f}")
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import describe

    command = " ".join(["python bench/lora_memory.py --recipe", recipe, "--dropouts", dropouts, "--steps", str(steps),
                        "--batch", str(batch), *given])
    Path(json_out).write_text(json.dumps({"command": command, "rows": rows, "machine": describe()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
