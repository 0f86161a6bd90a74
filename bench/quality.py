"""Benchmark: what each soft-prompt method buys over prompt engineering, on nf4 and unquantized bases.

For each task (the recipes' data, from ../shared/data), rows are: the hard prompt zero-shot, the
hard prompt k-shot, and each method trained on each quantization. Columns: the task metric on the
test split, trainable parameters, training time (wall, this machine) and peak memory (RSS).
Writes JSON per row to bench/results/quality/ (rows already there are reused) and the table to
docs/results.md.

    python bench/quality.py --tasks sentiment,spam,nli \
        --methods prompt-tuning,p-tuning,prefix-tuning,prefix-tuning+mlp --quants nf4,none \
        [--max-steps N] [--test-limit N]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FOLDERS = {"sentiment": "rotten_tomatoes", "spam": "sms_spam", "nli": "snli", "summarize": "aclsum"}
RESULTS = ROOT / "bench" / "results" / "quality"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_row(task: str, kind: str, method: str, quant: str, max_steps: int | None, test_limit: int | None,
            shots: int, model_name: str | None, data_root: str, work: str) -> dict:
    from qprompt.artifact import load_artifact
    from qprompt.config import load_recipe, override
    from qprompt.data import demonstrations, read_rows
    from qprompt.evaluate import evaluate, main_metric
    from qprompt.methods import get_method
    from qprompt.models import load_model
    from qprompt.train import train

    folder = Path(data_root) / FOLDERS[task]
    spec, _, lr = method.partition("@")  # e.g. p-tuning@0.003: a learning rate other than the recipe's
    spec, _, init = spec.partition(":")  # e.g. prefix-tuning:random: an init other than the recipe's
    name, _, variant = spec.partition("+")  # e.g. prefix-tuning+mlp, p-tuning+lstm
    recipe = override(load_recipe(task), model=model_name, quant=quant, method__name=name if kind == "soft" else None,
                      train__max_steps=max_steps, train__lr=float(lr) if lr else None,
                      train__eval_every=0, train__eval_rows=200)  # one validation check, at the end
    if init:
        recipe.method.init = init
    if variant == "mlp":
        recipe.method.prefix_projection = True
    elif variant:
        recipe.method.encoder = variant
    if kind == "soft" and not get_method(name).uses_init(recipe.method):
        recipe.method.init = "random"  # encoders start from random weights (PEFT)
    test = read_rows(str(folder / "test.jsonl"))[:test_limit]
    train_rows = read_rows(str(folder / "train.jsonl"))
    metric = main_metric(recipe)
    start = time.perf_counter()
    model, tok, info = load_model(recipe.model, quant)
    row = {"task": task, "kind": kind, "quant": quant, "metric": metric, "test_rows": len(test)}
    if kind == "hard":
        demos = demonstrations(train_rows, shots, label_field=recipe.data.label_field) if shots else None
        result = evaluate(model, tok, recipe, test, "test", hard_prompt=True, shots=demos)
        row.update(method=f"hard prompt {shots}-shot", trainable_parameters=0, train_seconds=0)
    else:
        out = Path(work) / f"quality-{task}-{method}-{quant}"
        splits = {"train": train_rows, "validation": read_rows(str(folder / "validation.jsonl"))}
        data = train(recipe, model, tok, info, splits, out, overwrite=True, progress=False)
        tuned, tok, tuned_recipe, _ = load_artifact(out, quant=quant)
        result = evaluate(tuned, tok, tuned_recipe, test, "test")
        row.update(method=spec, trainable_parameters=data["training"]["trainable_parameters"],
                   validation=data["metrics"],
                   train_seconds=data["training"]["wall_seconds"], steps=data["training"]["steps"],
                   settings={"virtual_tokens": recipe.method.virtual_tokens, "lr": recipe.train.lr,
                             "batch_size": recipe.train.batch_size, "init": recipe.method.init,
                             **get_method(name).settings(recipe.method)})
    row.update(value=result[metric], total_seconds=round(time.perf_counter() - start, 1),
               peak_rss_gb=round(peak_rss_gb(), 2), **{k: v for k, v in result.items()
                                                      if k.startswith(("accuracy", "f1_", "macro", "rouge"))})
    return row


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def write_table(rows: list[dict]) -> str:
    lines = ["| task | row | quant | init | lr | test metric | value | macro-F1 | spam F1 | validation "
             "| trainable params | train time (s) | peak RSS (GB) |", "|---" * 13 + "|"]
    for r in rows:
        settings = r.get("settings", {})
        validation = next((v for k, v in r.get("validation", {}).items() if k.startswith("validation_")), None)
        lines.append(f"| {r['task']} | {r['method']} | {r['quant']} | {settings.get('init', '–')} | "
                     f"{settings.get('lr', '–')} | {r['metric']} | "
                     f"{r['value']:.4f} | {_num(r.get('macro_f1'))} | {_num(r.get('f1_spam'))} | {_num(validation)} | "
                     f"{r['trainable_parameters']:,} | {r['train_seconds']:.0f} | {r['peak_rss_gb']:.1f} |")
    return "\n".join(lines)


@click.command()
@click.option("--tasks", default="sentiment,spam,nli", show_default=True)
@click.option("--methods", default=None,
              help="Methods [default: every registered method, and prefix-tuning+mlp]; +mlp = prefix tuning "
                   "through the MLP reparameterisation, +lstm = p-tuning's LSTM encoder, :INIT = an init other than "
                   "the recipe's (prefix-tuning:random), @LR = a learning rate other than the recipe's "
                   "(p-tuning@0.003).")
@click.option("--quants", default="nf4,none", show_default=True)
@click.option("--shots", default=4, show_default=True, help="k for the k-shot row.")
@click.option("--max-steps", type=int, default=None, help="Override every recipe's steps.")
@click.option("--test-limit", type=int, default=None, help="Score only the first N test rows.")
@click.option("--model", "model_name", default=None, help="Base model [default: each recipe's].")
@click.option("--data-root", default=str(SHARED), show_default=True,
              help="Folder holding each task's data folder (rotten_tomatoes/, sms_spam/, ...) of train/validation/"
                   "test.jsonl.")
@click.option("--work", default=str(ROOT / "runs"), show_default=True, help="Where the trained artifacts go.")
@click.option("--results", default=str(RESULTS), show_default=True, help="One JSON per row (reused when there).")
@click.option("--doc", default=str(ROOT / "docs" / "results.md"), show_default=True, help="The table's page.")
@click.option("--row", "row_spec", default=None, hidden=True)
def main(tasks, methods, quants, shots, max_steps, test_limit, model_name, data_root, work, results, doc, row_spec):
    sys.path.insert(0, str(ROOT))
    from qprompt.cli import quiet_libraries
    from qprompt.methods import method_names

    quiet_libraries()
    if methods is None:
        methods = ",".join([*method_names(), "prefix-tuning+mlp"])  # prefix tuning as Li & Liang wrote it, too
    if row_spec:  # child process: one row, written to its JSON file
        *spec, out = json.loads(row_spec)
        row = run_row(*spec)
        from machine import describe

        row["machine"] = describe()
        Path(out).write_text(json.dumps(row, indent=1) + "\n")
        return
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in tasks.split(","):
        plan = [("hard", "none", "nf4", 0), ("hard", "none", "nf4", shots)]
        plan += [("soft", m, q, 0) for m in methods.split(",") if m for q in quants.split(",")]
        for kind, method, quant, k in plan:
            name = f"{task}-{kind}-{method}-{quant}-{k}shot-{max_steps}-{test_limit}.json"
            path = results / name
            if path.exists():  # each row runs in a fresh process in practice; reuse finished ones
                rows.append(json.loads(path.read_text()))
                continue
            # One process per row, so its peak RSS is its own.
            spec = json.dumps([task, kind, method, quant, max_steps, test_limit, k, model_name, data_root, work,
                               str(path)])
            done = subprocess.run([sys.executable, __file__, "--row", spec], stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise click.ClickException(f"row {name} failed:\n{done.stderr[-3000:]}")
            row = {**json.loads(path.read_text()), "command": row_command(task, kind, method, quant, k, max_steps,
                                                                          test_limit)}
            path.write_text(json.dumps(row, indent=1) + "\n")
            rows.append(row)
            click.echo(f"{task:<10} {row['method']:<22} {quant:<5} {row['metric']} {row['value']:.4f}")
            write_doc(results, Path(doc))  # after every row: a long run that stops early still leaves its table
    click.echo(write_table(rows))


def row_command(task: str, kind: str, method: str, quant: str, shots: int, max_steps: int | None,
                test_limit: int | None) -> str:
    """The command that runs this row alone (the hard rows run with every task; --methods '' skips the rest)."""
    parts = ["python bench/quality.py", f"--tasks {task}"]
    parts += [f"--shots {shots}", "--methods ''"] if kind == "hard" else [f"--methods {method}", f"--quants {quant}"]
    if max_steps is not None:
        parts.append(f"--max-steps {max_steps}")
    if test_limit is not None:
        parts.append(f"--test-limit {test_limit}")
    return " ".join(parts)


def write_doc(results: Path, doc: Path) -> None:
    """docs/results.md: every stored row (all runs so far), by task, then hard prompts, then methods."""
    rows = [json.loads(p.read_text()) for p in results.glob("*.json")]
    tasks = list(FOLDERS)
    from qprompt.methods import method_names

    names = method_names()

    def method_rank(row: dict) -> int:  # the registry's order; a variant (+mlp) then sorts after its plain rows
        base = row["method"].partition("+")[0]
        return names.index(base) if base in names else len(names)

    rows.sort(key=lambda r: (tasks.index(r["task"]), r["kind"], method_rank(r), r["method"],
                             r.get("settings", {}).get("init", ""),
                             r.get("settings", {}).get("lr", 0), r["quant"] != "nf4"))
    text = doc.read_text() if doc.exists() else DOC_HEAD
    start = text.find(TABLE_MARK)
    start = len(text) if start == -1 else start
    following = text.find("\n## ", start)  # the sections after the table are kept
    tail = text[following:] if following != -1 else ""
    doc.write_text(text[:start] + TABLE_MARK + "\n\nEach row's JSON in bench/results/quality/ holds its settings and "
                   "the command that reruns it alone. Validation = the metric on 200 validation rows at the end of "
                   "training.\n\n" + write_table(rows) + "\n" + tail)


TABLE_MARK = "<!-- table: written by bench/quality.py -->"
DOC_HEAD = "# Quality: soft prompts against prompt engineering\n\n"


if __name__ == "__main__":
    main()
