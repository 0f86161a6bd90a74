"""Benchmark: a prompt ensemble against its best single prompt.

Exports the given artifacts (prompts for one classification task, trained on the same base) into one graph with
`--ensemble`, then scores every member and the ensemble on the same test rows through qprompt's runtime: accuracy,
macro-F1, and the seconds each took (an ensemble costs one forward pass per member).

    python bench/ensemble.py --artifact runs/sentiment-int4 --artifact runs/sentiment-adapted \\
        --data ../shared/data/rotten_tomatoes/test.jsonl --quantize int4 [--limit N] [--out bench/results/ensemble.json]
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@click.command()
@click.option("--artifact", "artifacts", multiple=True, required=True, type=click.Path(file_okay=False),
              help="A member prompt (repeat: two or more).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Test rows (.jsonl).")
@click.option("--quantize", default="none", show_default=True, help="The graph's weights (as qprompt export).")
@click.option("--limit", type=int, default=0, help="Test rows (0: all).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qprompt-ensemble"),
              show_default=True, help="Where the export is made.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=ROOT / "bench" / "results" / "ensemble.json", show_default=True)
def main(artifacts, data, quantize, limit, work, out):
    from machine import describe

    from qprompt.cli import quiet_libraries
    from qprompt.data import read_rows
    from qprompt.deploy.runtime import ExportedModel
    from qprompt.export import export
    from qprompt.metrics import classification_metrics

    quiet_libraries()
    names = [f"m{i}" for i in range(len(artifacts))]
    shutil.rmtree(work, ignore_errors=True)
    export(list(artifacts), work, quantize, names=names, ensemble="vote")
    graph = ExportedModel(work, providers=["CPUExecutionProvider"])
    rows = read_rows(data)
    rows = rows[:limit] if limit else rows
    field = graph.task(names[0]).label_field
    gold = [r[field] for r in rows]
    labels = sorted(set(gold))
    results = {}
    for task in [*names, "vote"]:
        start = time.perf_counter()
        predictions = graph.classify(rows, task=task, truncate=True)
        metrics = classification_metrics(predictions, gold, labels)
        results[task] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                         "seconds": round(time.perf_counter() - start, 1),
                         "artifact": str(artifacts[names.index(task)]) if task in names else "ensemble"}
    best = max(names, key=lambda n: results[n]["accuracy"])
    click.echo(f"{'prompt':<10}{'accuracy':>10}{'macro-F1':>10}{'seconds':>9}  artifact")
    for task, r in results.items():
        click.echo(f"{task:<10}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['seconds']:>9.1f}  {r['artifact']}")
    gain = results["vote"]["accuracy"] - results[best]["accuracy"]
    click.echo(f"ensemble vs best single prompt ({best}): {gain * 100:+.2f} points on {len(rows)} rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "best_single": best, "gain_points": round(gain * 100, 2),
                               "rows": len(rows), "quantize": quantize, "command": " ".join(sys.argv),
                               "machine": describe()}, indent=1) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
