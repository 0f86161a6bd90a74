"""Benchmark: the soft prompt against prompting and fine-tuning, as `qprompt job --baselines` reports it.

For each recipe, one `qprompt job` with the recipe's defaults: the hand-written prompt (0-shot, k-shot), the soft
prompt, and LoRA / full fine-tuning trained on the same rows, batch and schedule for the soft prompt's training
time (--budget time, the default here: the comparison at equal wall time) or its step count. Every row is scored on
the same test rows. Then the deploy columns: the soft prompt and the LoRA adapter (merged into its base) are each
exported to ONNX with the same quantization (--deploy-quantize, int4 by default: what the edge runs) through
`qprompt export` and its parity check, and each graph is scored by ONNX Runtime on those test rows (`qprompt eval
EXPORT`): its metric, its files' size and its scoring speed. Each recipe's report goes to RESULTS/RECIPE.json (one
there already is reused: delete it to measure again, or --rerun some of its rows) and the table to docs/results.md.

    python bench/baselines.py --recipes sentiment,spam [--baselines hard,kshot,lora,full] [--budget time]
    python bench/baselines.py --recipes sentiment --rerun lora,full     # those rows again, the rest kept
    python bench/baselines.py --recipes sentiment --rerun lora,full --work NEW   # a new soft prompt (new defaults)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
TABLE_MARK = "<!-- table: written by bench/baselines.py -->"
END_MARK = "<!-- end of bench/baselines.py's table -->"
DEPLOYED = ("soft_prompt", "lora")  # the rows that deploy as a graph (full fine-tuning would be a whole new base)
NAMES = {"hard": "hard prompt 0-shot", "kshot": "hard prompt 4-shot", "soft_prompt": "soft prompt",
         "lora": "LoRA", "full": "full fine-tuning"}


@click.command()
@click.option("--recipes", default="sentiment", show_default=True, help="Comma-separated recipe names.")
@click.option("--baselines", default="hard,kshot,lora", show_default=True, help="As `qprompt job --baselines`.")
@click.option("--budget", type=click.Choice(["time", "steps"]), default="time", show_default=True,
              help="LoRA / full fine-tuning train for the soft prompt's training time, or its steps.")
@click.option("--work", type=click.Path(file_okay=False), default="runs/bench-baselines", show_default=True,
              help="The jobs' output folders (WORK/RECIPE); a trained soft prompt there is reused.")
@click.option("--results", type=click.Path(file_okay=False), default=str(ROOT / "bench" / "results" / "baselines"),
              show_default=True)
@click.option("--doc", type=click.Path(dir_okay=False), default=str(ROOT / "docs" / "results.md"), show_default=True)
@click.option("--rerun", default="", help="Baselines to measure again in a stored report (its other rows are kept; "
              "the soft prompt in WORK/RECIPE is reused and scored again, or trained if WORK has none).")
@click.option("--deploy-quantize", type=click.Choice(["none", "int8", "int4", "nf4", "fp4"]), default="int4",
              show_default=True, help="The exported graphs' weights (`qprompt export --quantize`).")
@click.option("--no-deploy", is_flag=True, help="Skip the export and the graphs' scoring.")
@click.argument("job_args", nargs=-1)
def main(recipes, baselines, budget, work, results, doc, rerun, deploy_quantize, no_deploy, job_args):
    """JOB_ARGS after `--` go to every `qprompt job` (e.g. -- --max-steps 20 --test-limit 200 train.eval_every=10)."""
    Path(results).mkdir(parents=True, exist_ok=True)
    reports = {}
    for recipe in recipes.split(","):
        path = Path(results) / f"{recipe}.json"
        if not path.exists():
            run_job(recipe, baselines, budget, work, path, job_args)
        elif rerun:
            stored = json.loads(path.read_text())
            fresh = run_job(recipe, rerun, budget, work, path.with_suffix(".rerun.json"), job_args)
            path.with_suffix(".rerun.json").unlink()
            replaced = {k: v for k, v in stored["baselines"].items() if k in fresh["baselines"]}
            if fresh["training"] != stored["training"]:  # a new soft prompt (a --work without one): recorded too
                replaced["soft_prompt"] = stored["soft_prompt"]
                stored.get("deploy", {}).get("rows", {}).pop("soft_prompt", None)
            stored["baselines"].update(fresh["baselines"])
            stored["soft_prompt"], stored["training"] = fresh["soft_prompt"], fresh["training"]
            stored["output"] = fresh["output"]
            stored["reruns"] = [*stored.get("reruns", []), {"rows": rerun.split(","), "command": fresh["command"],
                                                             "machine": fresh["machine"], "replaced": replaced}]
            for name in fresh["baselines"]:  # a retrained row's graph is measured again
                stored.get("deploy", {}).get("rows", {}).pop(name, None)
            path.write_text(json.dumps(stored, indent=1) + "\n")
        report = json.loads(path.read_text())
        if not no_deploy:  # the graphs not measured yet (a rerun drops its rows' graphs); the others are kept
            done = report.get("deploy", {})
            kept = done.get("rows", {}) if done.get("quantize") == deploy_quantize else {}
            missing = [n for n in DEPLOYED if (n == "soft_prompt" or n in report["baselines"]) and n not in kept]
            if missing:
                fresh = deploy(recipe, report, Path(work), deploy_quantize, job_args, missing)
                old = [c for c in done.get("commands", []) if any(f"/deploy/{recipe}-{n}-" in c for n in kept)]
                report["deploy"] = {"quantize": deploy_quantize, "rows": {**kept, **fresh["rows"]},
                                    "commands": old + fresh["commands"]}
                path.write_text(json.dumps(report, indent=1) + "\n")
        reports[recipe] = report
    for path in Path(results).glob("*.json"):  # the page's table holds every recipe measured, not just these
        if path.stem not in reports and "baselines" in (stored := json.loads(path.read_text())):
            reports[path.stem] = stored
    table = write_table(dict(sorted(reports.items())))
    click.echo(table)
    write_doc(Path(doc), table)


def run_job(recipe: str, baselines: str, budget: str, work: str, path: Path, job_args: tuple) -> dict:
    """`qprompt job RECIPE` with these baselines, its report (plus the command and machine) written to `path`."""
    command = ["qprompt", "job", recipe, "--baselines", baselines, "--baseline-budget", budget,
               "--output", str(Path(work) / recipe), "--json", str(path), *job_args]
    qprompt(command)
    from machine import describe

    report = {**json.loads(path.read_text()), "command": " ".join(command), "machine": describe()}
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def qprompt(command: list[str]) -> None:
    """Run `qprompt ...` from this checkout (cli.py), echoing the command; a failure ends the benchmark."""
    click.echo(" ".join(command), err=True)
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *command[1:]])
    if done.returncode != 0:
        raise click.ClickException(f"`{' '.join(command)}` failed (exit {done.returncode})")


def option_value(args: tuple, name: str) -> str | None:
    """The value of `name VALUE` (or `name=VALUE`) in a command's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def deploy(recipe: str, report: dict, work: Path, quantize: str, job_args: tuple, names: list[str]) -> dict:
    """Rows `names` (the soft prompt, the merged LoRA) exported with `quantize`, each graph scored on the job's test
    rows."""
    from tasks import test_rows

    soft = Path(report["output"])
    test = test_rows(soft, report["soft_prompt"]["rows"], option_value(job_args, "--test-data"))
    data = work / f"{recipe}-test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in test))
    rows, commands = {}, []
    for name in names:
        artifact = soft if name == "soft_prompt" else soft / "baselines" / name
        folder, scored = work / "deploy" / f"{recipe}-{name}-{quantize}", work / "deploy" / f"{recipe}-{name}.json"
        export = ["qprompt", "export", str(artifact), "--output", str(folder), "--quantize", quantize, "--overwrite"]
        score = ["qprompt", "eval", str(folder), "--data", str(data), "--json", str(scored)]
        start = time.perf_counter()
        qprompt(export)
        export_seconds = time.perf_counter() - start
        qprompt(score)
        result = json.loads(scored.read_text())
        result.pop("predictions")
        graph = sum(f.stat().st_size for f in folder.iterdir() if ".onnx" in f.name)
        rows[name] = {**result, "graph_bytes": graph, "export_seconds": round(export_seconds, 1),
                      "rows_per_s": round(result["rows"] / result["seconds"], 2)}
        commands += [" ".join(export), " ".join(score)]
    return {"quantize": quantize, "rows": rows, "commands": commands}


def write_table(reports: dict[str, dict]) -> str:
    lines = ["| recipe | row | metric | value | test rows | trainable params | steps | train time (s) "
             "| peak memory (GB) | artifact | graph | graph's value | graph size | graph rows/s |", "|---" * 14 + "|"]
    for recipe, report in reports.items():
        m = report["metric"]
        rows = {**report["baselines"], "soft_prompt": report["soft_prompt"]}
        deployed = report.get("deploy", {"rows": {}})
        for name in ("hard", "kshot", "soft_prompt", "lora", "full"):
            if name not in rows:
                continue
            r = rows[name]
            trained = "trainable_parameters" in r
            peak = r.get("peak_memory_gb")
            lines.append(f"| {recipe} | {NAMES[name]} | {m} | {r[m]:.4f} | {r['rows']} | "
                         + (f"{r['trainable_parameters']:,} | {r['steps']} | {r['train_seconds']:.0f} | "
                            f"{'–' if peak is None else f'{peak:.2f}'} | {r['artifact_bytes'] / 1024:,.0f} KB |"
                            if trained else "0 | – | – | – | – |")
                         + (f" {deployed['quantize']} | {deployed['rows'][name][m]:.4f} | "
                            f"{deployed['rows'][name]['graph_bytes'] / 1024**2:,.1f} MiB | "
                            f"{deployed['rows'][name]['rows_per_s']:.1f} |" if name in deployed["rows"]
                            else " – | – | – | – |"))
    return "\n".join(lines)


def write_doc(doc: Path, table: str) -> None:
    """Put the table between its marks in `doc` (appended the first time); the rest of the file is kept."""
    from page import put_block

    put_block(doc, TABLE_MARK, END_MARK, "Each recipe's JSON in bench/results/baselines/ holds its rows and the "
              f"command that made them.\n\n{table}", "Against fine-tuning (LoRA, full)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
