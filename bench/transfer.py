"""Benchmark: does a new task learn faster from a multitask prompt than from its own instruction?

1. Trains a multitask prompt on the source recipes, in both designs `qprompt multitask` offers: one shared
   prompt (prompt-tuning, SPoT) and a shared prompt times per-task parts (multitask-prompt-tuning, MPT).
2. Trains the target recipe's prompt with the same budget and schedule from each start: its instruction text
   (the recipe's own init), and each multitask prompt (`--init-from`).
3. Reports the target's validation metric before training (step 0: the starting prompt itself) and after
   5, 10, 25, 50 and 100 steps (one 100-step run per start, evaluated along the way), the kept prompt's test
   metric, and what each source cost to train. Each target run is repeated for every --seeds value (the data
   order; the sources are trained once), and the table gives the mean over seeds.

Runs are kept in --work and reused (delete a folder to run it again); the table is rebuilt from their logs.

    python bench/transfer.py --target sentiment --sources spam,nli,summarize --work /work/runs-mt \\
        [--seeds 0,1] [--steps 100] [--eval-every 5] [--test-rows 1000] [--json bench/results/transfer.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS = 20  # every prompt, source and target, has this length: a start from another prompt needs it
# The target learns an input prompt whatever its recipe's default (a prefix's keys/values cannot start from a source's
# embeddings), with prompt tuning's measured rate.
TARGET_METHOD = "prompt-tuning"
DESIGNS = {"prompt-tuning": "shared prompt (SPoT)", "multitask-prompt-tuning": "shared x per-task (MPT)"}
REPORT_STEPS = (0, 5, 10, 25, 50, 100)


def qprompt(*args: str, log: Path) -> None:
    """One qprompt command, its output in `log`; single-threaded so two runs can share the cores fairly."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as out:
        subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], stdout=out, stderr=subprocess.STDOUT,
                       check=True, env=env)


def evaluations(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["eval"] for r in lines if "eval" in r}


def starting_metric(target: str, quant: str, init_from: str | None, seed: int, model_name: str | None = None,
                    eval_data: str | None = None) -> float:
    """The validation metric of the prompt a run starts from, on the rows its evaluations use."""
    from qprompt.config import load_recipe, override
    from qprompt.data import load_splits, read_rows
    from qprompt.evaluate import evaluate, main_metric
    from qprompt.methods import add_soft_prompt
    from qprompt.models import load_model
    from qprompt.transfer import start_from_artifact

    recipe = override(load_recipe(target), model=model_name, quant=quant, method__init_from=init_from,
                      method__name=TARGET_METHOD, method__virtual_tokens=TOKENS, train__seed=seed)
    model, tokenizer, info = load_model(recipe.model, recipe.quant)
    model = add_soft_prompt(model, recipe, info.path, recipe.train.seed)
    if init_from:
        start_from_artifact(model, recipe.method.name, init_from, info.fingerprint)
    model.eval()
    rows = (read_rows(eval_data) if eval_data else load_splits(recipe)["validation"])[: recipe.train.eval_rows]
    return float(evaluate(model, tokenizer, recipe, rows)[main_metric(recipe)])


def test_metric(run: Path, rows: int, test_data: str | None = None) -> float:
    out = run / "test.json"
    if not out.is_file():
        data = ["--data", test_data] if test_data else []
        qprompt("eval", str(run), "--limit", str(rows), "--json", str(out), *data, log=run / "test.log")
    result = json.loads(out.read_text())
    return result.get("accuracy", result.get("rouge_l"))


def cell(values: list[float | None]) -> str:
    """'mean (a / b)' over seeds; '–' where a run has no evaluation at that step."""
    if any(v is None for v in values):
        return "–"
    each = " / ".join(f"{v:.3f}" for v in values)
    return f"{sum(values) / len(values):.4f} ({each})" if len(values) > 1 else f"{values[0]:.4f}"


@click.command()
@click.option("--target", default="sentiment", show_default=True, help="The new task's recipe.")
@click.option("--sources", default="spam,nli,summarize", show_default=True, help="Recipes the multitask prompt "
              "learns from (comma-separated).")
@click.option("--work", type=click.Path(file_okay=False), default="/tmp/bench-transfer", show_default=True)
@click.option("--seeds", default="0,1", show_default=True, help="Seeds of the target runs (comma-separated).")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps of every run.")
@click.option("--eval-every", type=int, default=5, show_default=True)
@click.option("--test-rows", type=int, default=1000, show_default=True)
@click.option("--quant", default="none", show_default=True)
@click.option("--json", "json_out", default="bench/results/transfer.json", show_default=True)
@click.option("--model", "model_name", default=None, help="Base model [default: the recipes'].")
@click.option("--data", "data_files", multiple=True, help="RECIPE=FILE: that recipe's training rows [default: its "
              "source]; repeatable.")
@click.option("--eval-data", default=None, help="The target's validation rows [default: held out].")
@click.option("--test-data", default=None, help="The target's test rows [default: its test split].")
def main(target, sources, work, seeds, steps, eval_every, test_rows, quant, json_out, model_name, data_files,
         eval_data, test_data):
    files = dict(item.split("=", 1) for item in data_files)
    model = ["--model", model_name] if model_name else []
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    source_rows = []
    for design in DESIGNS:
        run = work / f"source-{design}"
        if not (run / "qprompt.json").is_file():
            source_data = [a for name in sources.split(",") if name in files
                           for a in ("--data", f"{name}={files[name]}")]
            qprompt("multitask", *sources.split(","), "--quant", quant, "--method", design,
                    "--virtual-tokens", str(TOKENS), "--init", "vocab", "--max-steps", str(steps), "--batch-size", "16",
                    "--eval-every", "50",
                    "--output", str(run), *model, *source_data, log=work / f"source-{design}.log")
        manifest = json.loads((run / "qprompt.json").read_text())
        source_rows.append({"design": DESIGNS[design], "method": design, "run": str(run),
                            "tasks": {t["name"]: t["validation"] for t in manifest["multitask"]["tasks"]},
                            "mean": manifest["metrics"]["validation_mean_task_metric"],
                            "seconds": manifest["training"]["wall_seconds"]})
    starts = {"instruction text": []} | {f"multitask: {DESIGNS[d]}": ["--init-from", str(work / f"source-{d}")]
                                         for d in DESIGNS}
    target_rows = []
    for name, extra in starts.items():
        for seed in map(int, seeds.split(",")):
            run = work / f"{target}-from-{'text' if not extra else Path(extra[1]).name}{f'-seed{seed}' if seed else ''}"
            if not (run / "qprompt.json").is_file():
                target_data = (["--data", files[target]] if target in files else []) + \
                    (["--eval-data", eval_data] if eval_data else [])
                qprompt("train", "--recipe", target, "--method", TARGET_METHOD, "--quant", quant, "--max-steps",
                        str(steps), "--eval-every", str(eval_every), "--virtual-tokens", str(TOKENS), "--seed",
                        str(seed), "--output", str(run),
                        *extra, *model, *target_data,
                        log=work / f"{run.name}.log")
            seen = evaluations(run)
            start_file = run / "start.json"  # step 0, measured once
            if not start_file.is_file():
                start = starting_metric(target, quant, extra[1] if extra else None, seed, model_name, eval_data)
                start_file.write_text(json.dumps({"eval": start}))
            seen[0] = json.loads(start_file.read_text())["eval"]
            target_rows.append({"start": name, "seed": seed, "run": str(run),
                                "validation": {s: seen.get(s) for s in REPORT_STEPS},
                                "test": test_metric(run, test_rows, test_data), "test_rows": test_rows})

    print(f"\nSources ({sources}), {steps} steps each: validation metric per task at the kept step")
    print("| design | " + " | ".join(source_rows[0]["tasks"]) + " | mean | train s |")
    print("|---" * (len(source_rows[0]["tasks"]) + 3) + "|")
    for r in source_rows:
        cells = " | ".join(f"{v:.4f}" for v in r["tasks"].values())
        print(f"| {r['design']} | {cells} | {r['mean']:.4f} | {r['seconds']:.0f} |")
    print(f"\nTarget {target}: validation metric after N steps (one {steps}-step run per start and seed), "
          "test of the kept prompt; each cell: mean over seeds (each seed)")
    print("| start | " + " | ".join(f"step {s}" for s in REPORT_STEPS) + " | test |")
    print("|---" * (len(REPORT_STEPS) + 2) + "|")
    for name in starts:
        runs = [r for r in target_rows if r["start"] == name]
        columns = [[r["validation"][s] for r in runs] for s in REPORT_STEPS] + [[r["test"] for r in runs]]
        print(f"| {name} | " + " | ".join(cell(values) for values in columns) + " |")
    from machine import describe  # bench/machine.py, beside this script

    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps({"target": target, "sources": sources.split(","), "steps": steps,
                                          "seeds": seeds, "quant": quant, "source_runs": source_rows,
                                          "target_runs": target_rows, "machine": describe()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
