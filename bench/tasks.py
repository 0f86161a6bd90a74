"""Benchmark: many tasks on one base — one task graph against one graph per task.

Given trained artifacts on the same base (one per recipe), this exports each alone and a task graph
of the first 1, 2 and 4 of them, then measures:
  - each task's test metric through the task graph and through its own graph (the same rows);
  - file size and resident memory: one N-task graph against N single-task graphs, N = 1, 2, 4
    (each set loaded in a fresh process; resident = peak RSS after loading and one request per task);
  - bytes added per task (the growth of the graph from N = 1 to N = 2, against the prefix tensors);
  - throughput: prefill rows/s (what scoring one-token labels costs) of mixed batches (the
    classification tasks' rows interleaved, one task graph) against single-task batches (each task's
    rows through its own graph), the same rows and batch size.

    python bench/tasks.py --artifact sentiment=runs/sentiment --artifact spam=runs/spam \\
        --artifact nli=runs/nli --artifact summarize=runs/summarize [--rows 200] [--work /tmp/bench-tasks]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY_PROBE = """
import sys
from qprompt.deploy.runtime import ExportedModel, Sampling
graphs = [ExportedModel(f, threads=1) for f in sys.argv[1:]]
for g in graphs:
    for t in g.tasks:
        g.generate([{f: "a short test input" for f in g.fields(t)}], Sampling(max_new_tokens=1), task=t)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report the parent's peak.
print([int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("model*.onnx*")) / 1e6, 2)


def peak_rss_mb(folders: list[Path]) -> float:
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *map(str, folders)], capture_output=True, text=True,
                          check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def test_rows(artifact: Path, rows: int, path: str | None = None) -> list[dict]:
    """The first `rows` test rows: from `path`, else the artifact's recipe's own test split."""
    from qprompt.artifact import read_manifest, recipe_of
    from qprompt.data import load_splits, read_rows

    if path:
        return read_rows(path)[:rows]
    recipe = recipe_of(read_manifest(artifact))
    return load_splits(recipe)["test"][:rows]


def score(model, task: str | None, rows: list[dict], kind: str, label_field: str, labels: list[str]) -> dict:
    from qprompt.deploy.runtime import Sampling
    from qprompt.metrics import task_metrics

    refs = [str(r[label_field]) for r in rows]
    preds = (model.classify(rows, task=task) if kind == "classification" else
             model.generate(rows, Sampling(max_new_tokens=64), task=task))
    return task_metrics(kind, preds, refs, labels)


@click.command()
@click.option("--artifact", "artifacts", multiple=True, required=True, help="NAME=FOLDER, in order (up to 4).")
@click.option("--rows", default=200, show_default=True, help="Test rows per classification task.")
@click.option("--generation-rows", default=20, show_default=True, help="Test rows per generation task.")
@click.option("--batch", default=16, show_default=True, help="Rows per forward pass in the throughput part.")
@click.option("--work", type=click.Path(file_okay=False), default="/tmp/bench-tasks", show_default=True)
@click.option("--parts", default="metrics,size,throughput", show_default=True,
              help="Which parts to run; results merge into an existing --out file.")
@click.option("--throughput-rows", default=64, show_default=True, help="Test rows per task in the throughput part.")
@click.option("--test-data", "test_files", multiple=True, help="NAME=FILE: that task's test rows [default: its "
              "recipe's test split].")
@click.option("--out", "json_out", default=str(ROOT / "bench" / "results" / "tasks.json"), show_default=True)
def main(artifacts, rows, generation_rows, batch, work, parts, throughput_rows, test_files, json_out):
    from qprompt.deploy.runtime import ExportedModel
    from qprompt.export import export

    named = dict(a.split("=", 1) for a in artifacts)
    test_files = dict(t.split("=", 1) for t in test_files)
    names, paths = list(named), [Path(p) for p in named.values()]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(Path(json_out).read_text()) if Path(json_out).exists() else {}
    results: dict = {**previous, "tasks": names}
    results.setdefault("commands", {})
    for part in parts.split(","):
        results["commands"][part] = " ".join(sys.argv)

    def save() -> None:  # after every part: a stopped run keeps what it measured
        from machine import describe

        results["machine"] = describe()
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=1) + "\n")

    def exported(folder: Path, build) -> Path:
        if not (folder / "qprompt-export.json").is_file():
            start = time.perf_counter()
            build(folder)
            click.echo(f"exported {folder.name} in {time.perf_counter() - start:.0f} s", err=True)
        return folder

    singles = {n: exported(work / f"single-{n}", lambda f, p=p: export(p, f)) for n, p in zip(names, paths)}
    banks = {k: exported(work / f"bank-{k}", lambda f, k=k: export(paths[:k], f, names=names[:k], multi_task=True))
             for k in (1, 2, 4) if k <= len(names)}

    # Each task's metric through the task graph and through its own graph.
    full = ExportedModel(banks[max(banks)], threads=2)
    metrics = {}
    for name in names if "metrics" in parts else []:
        task = full.task(name)
        n = rows if task.kind == "classification" else generation_rows
        test = test_rows(Path(named[name]), n, test_files.get(name))
        alone = ExportedModel(singles[name], threads=2)
        labels = list(task.label_targets)
        metrics[name] = {"rows": len(test),
                         "task_graph": score(full, name, test, task.kind, task.label_field, labels),
                         "own_graph": score(alone, None, test, task.kind, task.label_field, labels)}
        click.echo(f"{name}: {metrics[name]}", err=True)
    if metrics:
        results["metrics"] = metrics
        save()

    # Size and memory: one N-task graph against N single-task graphs.
    sizes = {}
    for k, bank in banks.items() if "size" in parts else []:
        own = [singles[n] for n in names[:k]]
        sizes[k] = {"task_graph_mb": folder_mb(bank), "single_graphs_mb": round(sum(folder_mb(f) for f in own), 2),
                    "task_graph_rss_mb": peak_rss_mb([bank]), "single_graphs_rss_mb": peak_rss_mb(own)}
        click.echo(f"N={k}: {sizes[k]}", err=True)
    if sizes:
        results["size"] = sizes
    if "size" in parts and 1 in banks and 2 in banks:
        manifest = full.manifest
        prefix_bytes = manifest.num_layers * 2 * manifest.num_kv_heads * manifest.head_dim * manifest.prefix_slots * 4
        grown = (banks[2] / "model.onnx").stat().st_size - (banks[1] / "model.onnx").stat().st_size
        results["bytes_per_task"] = {"measured": grown, "prefix_tensors": prefix_bytes + manifest.prefix_slots + 8}
    save()

    # Throughput: a mixed batch (classification tasks interleaved) against single-task batches, same rows.
    if "throughput" not in parts:
        return
    classification = [n for n in names if full.task(n).kind == "classification"]
    per_task = {n: [full.prompt_ids(r, task=n) for r in test_rows(Path(named[n]), throughput_rows, test_files.get(n))]
                for n in classification}
    count = min(len(v) for v in per_task.values())
    mixed = [(n, per_task[n][i]) for i in range(count) for n in classification]
    graphs = {n: ExportedModel(singles[n], threads=2) for n in classification}

    def passes(model, prompts: list[list[int]], tasks: list[str | None]) -> None:
        """Prefill passes over `batch` rows at a time: what scoring one-token labels costs."""
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            model.prompt_logits(chunk, model.task_ids(tasks[start : start + batch], len(chunk)), last=1)

    def run_mixed():
        passes(full, [p for _, p in mixed], [n for n, _ in mixed])

    def run_single():
        for n in classification:
            passes(graphs[n], per_task[n][:count], [None] * count)

    timings = {"mixed": [], "single": []}
    for fn in (run_mixed, run_single):  # warm-up
        fn()
    for _ in range(3):  # interleaved rounds: drift on this shared machine hits both alike
        for key, fn in (("mixed", run_mixed), ("single", run_single)):
            start = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    results["throughput"] = {"rows": len(mixed), "batch": batch,
                             "mixed_rows_per_s": round(len(mixed) / best["mixed"], 1),
                             "single_rows_per_s": round(len(mixed) / best["single"], 1),
                             "ratio": round(best["single"] / best["mixed"], 3), "seconds": timings}
    click.echo(json.dumps(results["throughput"]), err=True)
    save()
    click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    main()
