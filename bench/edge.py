"""Benchmark: the edge graph, every kind side by side, against onnxruntime-genai's own graph of the bare base.

For one base (smollm2-135m) and two tasks (sentiment, spam), each with a prompt trained on nf4 and one
trained on int4 (`qprompt train --quant int4`), the graph kinds:

    builder-fp32, builder-int4   anchors: the model builder's own graphs of the bare base (no prompt)
    fp32                         the nf4-trained prompt, fused float32 graph (full-precision weights)
    int8 (level 4), int8-dynamic, nf4    the nf4-trained prompt, fused
    int4-ptq                     the nf4-trained prompt in an int4 graph (weights it never trained on)
    int4                         the int4-trained prompt in its int4 graph, the classification default (accuracy
                                 level 1: float32 compute)
    int4-level4                  the same graph computing with int8 activations (the generation default)
    int4-adapted                 the nf4-trained prompt after a short `--quant int4 --init-from` run (TASK:adapted=...)
    written-fp32, written-int4   the written-out graph (torch's exporter), as before the fused graph

Parts (each saves into --out as it ends; rerun with --parts to redo one):
  exports   make every export folder under --work (kept and reused)
  speed     one process, interleaved rounds, same threads: time to first token and per-token time of a
            --prompt-tokens prompt + --new-tokens greedy tokens, in onnxruntime-genai and in qprompt's runtime
  rss       peak resident memory of each graph, a fresh process per graph and runtime
  accuracy  each task's test rows through every prompt-carrying graph (qprompt's runtime), and agreement with
            the trained PyTorch model's labels
  floor     memory bandwidth of this machine (numpy) and the per-token floor it puts on each graph
  schemes   int4 schemes for the nf4-trained sentiment prompt (symmetric/asymmetric, block 32/64/128, k-quant
            scales, an 8-bit LM head): size and accuracy before any int4 training

    python bench/edge.py --work /work/edge --artifact sentiment:nf4=RUNS/sentiment-nf4 \\
        --artifact sentiment:int4=RUNS/sentiment-int4 --artifact spam:nf4=RUNS/spam-nf4 \\
        --artifact spam:int4=RUNS/spam-int4 --data ../shared/data --out bench/results/edge.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402

# kind -> (artifact trained on, export quantize, export options)
KINDS = {
    "fp32": ("nf4", "none", {}),
    "int8": ("nf4", "int8", {"accuracy_level": 4}),
    "int8-dynamic": ("nf4", "int8-dynamic", {}),
    "nf4": ("nf4", "nf4", {}),
    "int4-ptq": ("nf4", "int4", {}),
    "int4": ("int4", "int4", {}),
    "int4-level4": ("int4", "int4", {"accuracy_level": 4}),
    "int4-adapted": ("adapted", "int4", {}),
    "written-fp32": ("nf4", "none", {"graph": "written"}),
    "written-int4": ("nf4", "int4", {"graph": "written"}),
}
ANCHORS = {"builder-fp32": "fp32", "builder-int4": "int4"}
TASK_DATA = {"sentiment": "rotten_tomatoes", "spam": "sms_spam"}
# int4 schemes tried on the nf4-trained sentiment prompt: builder options.
SCHEMES = {
    # asym: the builder (0.18) makes a graph ONNX Runtime cannot load when zero points meet the shared (tied)
    # embedding, so that scheme keeps the embedding and the LM head apart.
    "sym-b32": (), "asym-b32": ("is_symmetric=false", "shared_embeddings=false"), "sym-b64": ("block_size=64",),
    "sym-b128": ("block_size=128",), "kquant-b32": ("algo_config=k_quant",),
    "sym-b32-head8": ("matmul_mixed_precision=last_matmul:int8",),
}


def load(out: Path) -> dict:
    return json.loads(out.read_text()) if out.is_file() else {}


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "machine": describe()}, indent=1) + "\n")


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("model*.onnx*")) / 1e6, 1)


# ------------------------------------------------------------------------------------------------ exports
def make_exports(work: Path, artifacts: dict[str, dict[str, Path]], model: str) -> dict[str, Path]:
    """Every export folder, named TASK-KIND (and the anchors, bare-KIND); existing ones are kept."""
    from qprompt.export import export

    folders = {}
    for task, by_quant in artifacts.items():
        for kind, (trained, quantize, options) in KINDS.items():
            folder = work / f"{task}-{kind}"
            if trained in by_quant and not (folder / "qprompt-export.json").is_file():
                start = time.perf_counter()
                export(by_quant[trained], folder, quantize=quantize, **options)
                print(f"exported {folder.name} in {time.perf_counter() - start:.0f} s", flush=True)
            if folder.is_dir():
                folders[folder.name] = folder
    for anchor, precision in ANCHORS.items():
        folders[anchor] = builder_anchor(work / anchor, model, precision)
    return folders


def builder_anchor(folder: Path, model: str, precision: str) -> Path:
    """onnxruntime-genai's model builder on the bare base, as its README runs it, plus a qprompt-export.json so that
    qprompt's runtime can drive the very same files (the graph is untouched)."""
    from qprompt.deploy.manifest import ExportManifest, TaskEntry
    from qprompt.export.fused import build_base_graph
    from qprompt.models import resolve_model
    from qprompt.templates import Template

    if (folder / "qprompt-export.json").is_file():
        return folder
    source = Path(resolve_model(model))
    build_base_graph(source, folder, precision)
    config = json.loads((source / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    manifest = ExportManifest(
        model_file="model.onnx", num_layers=config["num_hidden_layers"], num_kv_heads=heads,
        head_dim=config["hidden_size"] // config["num_attention_heads"], vocab_size=config["vocab_size"],
        max_positions=config["max_position_embeddings"], pad_token_id=None,
        eos_token_ids=[config["eos_token_id"]], bos_token_id=config.get("bos_token_id"), opset=21,
        quantization="none" if precision == "fp32" else precision,
        tasks=[TaskEntry("bare", "generation", Template("{text}"), "label", {}, 0)],
        task_ids_input=False, prefix_slots=0, base={"name": model}, graph="fused")
    manifest.write(folder)
    return folder


# ------------------------------------------------------------------------------------------------ speed
def prompt_ids(folder: Path, n: int, data: Path) -> list[int]:
    """n token ids of real text (test reviews, one after another), without a template."""
    from qprompt.deploy.runtime import ExportedModel

    model = ExportedModel(folder)
    ids: list[int] = []
    for line in (data / "rotten_tomatoes" / "test.jsonl").read_text().splitlines():
        ids += model.encode(" " + json.loads(line)["text"], special=False)
        if len(ids) >= n:
            return ids[:n]
    raise click.ClickException("not enough test text for the prompt")


def genai_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def time_genai(model, ids: list[int], new: int, virtual: int) -> tuple[float, list[float]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new + virtual)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.array([ids], dtype=np.int32))
    generator.generate_next_token()
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(new - 1):
        start = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - start)
    return ttft, steps


def time_qprompt(model, ids: list[int], new: int) -> tuple[float, list[float]]:
    from qprompt.deploy.runtime import DecodeBatch

    batch = DecodeBatch(model)
    start = time.perf_counter()
    token = int(batch.join([ids], reserve=new)[0].argmax())
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(new - 1):
        start = time.perf_counter()
        token = int(batch.step(np.array([token]))[0].argmax())
        steps.append(time.perf_counter() - start)
    return ttft, steps


def measure_speed(folders: dict[str, Path], data: Path, threads: int, rounds: int, prompt_tokens: int,
                  new_tokens: int) -> dict:
    from qprompt.deploy.runtime import ExportedModel

    names = [n for n in folders if n.startswith("builder-") or n.startswith("sentiment-")]
    ids = prompt_ids(folders[names[0]], prompt_tokens, data)
    loaded = {}
    for name in names:
        runtime = ExportedModel(folders[name], threads=threads, providers=["CPUExecutionProvider"])
        virtual = runtime.manifest.prefix_slots if runtime.fused else 0
        genai = genai_model(folders[name], threads) if (folders[name] / "genai_config.json").is_file() else None
        loaded[name] = (runtime, genai, virtual)
    times = {n: {"genai_ttft": [], "genai_token": [], "qprompt_ttft": [], "qprompt_token": []} for n in names}
    for r in range(rounds + 1):  # round 0 warms up
        for name in names:
            runtime, genai, virtual = loaded[name]
            if genai is not None:
                ttft, steps = time_genai(genai, ids, new_tokens, virtual)
                if r:
                    times[name]["genai_ttft"].append(ttft)
                    times[name]["genai_token"].append(statistics.median(steps))
            ttft, steps = time_qprompt(runtime, ids, new_tokens)
            if r:
                times[name]["qprompt_ttft"].append(ttft)
                times[name]["qprompt_token"].append(statistics.median(steps))
        print(f"speed round {r}/{rounds}", flush=True)
    return {name: {key: round(1000 * statistics.median(v), 2) if v else None for key, v in t.items()}
            for name, t in times.items()} | {"_setup": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                                                        "threads": threads, "rounds": rounds}}


# ------------------------------------------------------------------------------------------------ memory
def rss_child(folder: str, runtime: str, threads: int) -> None:
    """(In a fresh process) load one graph, generate once, print the peak resident memory in MB."""
    ids = list(range(1000, 1040))
    if runtime == "genai":
        model = genai_model(Path(folder), threads)
        from qprompt.deploy.runtime import ExportedModel

        virtual = ExportedModel(folder).manifest.prefix_slots if json.loads(
            (Path(folder) / "qprompt-export.json").read_text()).get("graph") == "fused" else 0
        time_genai(model, ids, 32, virtual)
    else:
        from qprompt.deploy.runtime import ExportedModel

        time_qprompt(ExportedModel(folder, threads=threads), ids, 32)
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1)}))


def measure_rss(folders: dict[str, Path], threads: int) -> dict:
    result = {}
    for name, folder in folders.items():
        if not (name.startswith("builder-") or name.startswith("sentiment-")):
            continue
        result[name] = {}
        for runtime in ("genai", "qprompt"):
            if runtime == "genai" and not (folder / "genai_config.json").is_file():
                continue
            done = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), "--rss-runtime", runtime,
                                   "--threads", str(threads)], capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            result[name][runtime] = json.loads(lines[-1])["peak_rss_mb"] if done.returncode == 0 and lines else None
        result[name]["file_mb"] = folder_mb(folder)
        print(name, result[name], flush=True)
    return result


# ------------------------------------------------------------------------------------------------ accuracy
def trained_labels(artifact: Path, rows: list[dict]) -> list[str]:
    """The trained PyTorch model's labels (on the base it was trained on)."""
    from qprompt.artifact import load_artifact
    from qprompt.evaluate import evaluate

    model, tokenizer, recipe, _ = load_artifact(artifact, device="cpu")
    return evaluate(model, tokenizer, recipe, rows)["predictions"]


def measure_accuracy(folders: dict[str, Path], artifacts: dict[str, dict[str, Path]], data: Path, limit: int,
                     results: dict) -> dict:
    from qprompt.data import read_rows
    from qprompt.deploy.runtime import ExportedModel
    from qprompt.metrics import classification_metrics

    out = results.get("accuracy", {})
    for task, by_quant in artifacts.items():
        rows = read_rows(str(data / TASK_DATA[task] / "test.jsonl"))
        rows = rows[:limit] if limit else rows
        gold = [r["label"] for r in rows]
        torch_labels = {q: trained_labels(path, rows) for q, path in by_quant.items()}
        for quant, labels in torch_labels.items():
            labels_set = sorted(set(gold))
            out[f"{task}-trained-{quant}"] = {**_metrics(classification_metrics(labels, gold, labels_set)),
                                              "rows": len(rows)}
        for name, folder in folders.items():
            if not name.startswith(task + "-"):
                continue
            kind = name.removeprefix(task + "-")
            start = time.perf_counter()
            predictions = ExportedModel(folder, providers=["CPUExecutionProvider"]).classify(rows, truncate=True)
            metrics = _metrics(classification_metrics(predictions, gold, sorted(set(gold))))
            reference = torch_labels.get(KINDS[kind][0]) if kind in KINDS else None
            agreement = (sum(a == b for a, b in zip(predictions, reference)) / len(rows)) if reference else None
            out[name] = {**metrics, "agreement_with_trained": agreement, "rows": len(rows),
                         "seconds": round(time.perf_counter() - start, 1)}
            print(name, out[name], flush=True)
    return out


def _metrics(m: dict) -> dict:
    return {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}


# ------------------------------------------------------------------------------------------------ floor
def measure_floor(folders: dict[str, Path], speed: dict, threads: int = 2) -> dict:
    """Read bandwidth of this machine, and per graph the time per token its weights take to stream once at that
    bandwidth (every weight is read once per token; the cos/sin tables and the prompt's constants are left out),
    against the measured per-token time.

    Bandwidth: numpy sums of a 512 MB array, one thread and `threads` threads (each summing its share; numpy
    releases the GIL), best of 5; and, as a check, what the fastest float32 graph streamed per token (its weights /
    its time): a graph cannot read faster than the machine, so that is a lower bound of the bandwidth. The floor
    uses the highest of the three."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(128 * 1024 * 1024, dtype=np.float32)  # 512 MB
    parts = np.array_split(a, threads)
    single, parallel = [], []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            a.sum()
            single.append(time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            parallel.append(time.perf_counter() - start)
    one_gbs, many_gbs = a.nbytes / min(single) / 1e9, a.nbytes / min(parallel) / 1e9
    streamed = {name: weight_bytes(folders[name]) / (speed[name]["genai_token"] / 1e3) / 1e9
                for name in folders if name in speed and "fp32" in name and speed[name].get("genai_token")}
    graph_gbs = max(streamed.values(), default=0.0)
    read_gbs = max(one_gbs, many_gbs, graph_gbs)
    out = {"read_gb_s_1_thread": round(one_gbs, 1), f"read_gb_s_{threads}_threads": round(many_gbs, 1),
           "fp32_graph_streamed_gb_s": round(graph_gbs, 1), "read_gb_s": round(read_gbs, 1), "graphs": {}}
    for name, folder in folders.items():
        if name not in speed:
            continue
        weight_mb = weight_bytes(folder) / 1e6
        floor_ms = weight_mb / 1e3 / read_gbs * 1e3
        entry = {"weight_mb": round(weight_mb, 1), "floor_ms": round(floor_ms, 2)}
        for runtime in ("genai", "qprompt"):
            measured = speed[name].get(f"{runtime}_token")
            if measured:
                entry[f"{runtime}_x_floor"] = round(measured / floor_ms, 2)
        out["graphs"][name] = entry
    return out


def weight_bytes(folder: Path) -> int:
    import onnx

    manifest = json.loads((folder / "qprompt-export.json").read_text())
    model = onnx.load(str(folder / manifest["model_file"]), load_external_data=False)
    skip = {"cos_cache", "sin_cache", "qprompt.prefix", "qprompt.virtual_tokens"}
    total = 0
    for t in model.graph.initializer:
        if t.name in skip:
            continue
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += length if length is not None else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


# ------------------------------------------------------------------------------------------------ schemes
def measure_schemes(work: Path, nf4_export: Path, data: Path, limit: int) -> dict:
    """The nf4-trained sentiment prompt (no int4 training) in int4 graphs of several schemes, float32 compute: the
    prompt's rows are copied from its sym-b32 export (same prompt, same base), the graph is the builder's with other
    options. Size and test accuracy: how much each scheme loses before any int4 training."""
    from qprompt.data import read_rows
    from qprompt.deploy.manifest import ExportManifest
    from qprompt.export import fused
    from qprompt.models import resolve_model

    manifest = ExportManifest.read(nf4_export)
    tables = fused.read_prompt_tables(nf4_export / manifest.model_file)
    rows = read_rows(str(data / "rotten_tomatoes" / "test.jsonl"))
    rows = rows[:limit] if limit else rows
    gold = [r["label"] for r in rows]
    source = Path(resolve_model("smollm2-135m"))
    out = {}
    for name, options in SCHEMES.items():
        try:
            out[name] = scheme_row(work, name, options, source, nf4_export, manifest, tables, rows, gold)
        except Exception as exc:  # a scheme the builder or the prompt surgery cannot make: recorded, not fatal
            out[name] = {"error": str(exc).splitlines()[0][:300]}
        print(name, out[name], flush=True)
    return out


def scheme_row(work: Path, name: str, options: tuple, source: Path, nf4_export: Path, manifest, tables, rows, gold):
    from qprompt.deploy.runtime import ExportedModel
    from qprompt.export import fused
    from qprompt.metrics import classification_metrics

    folder = work / f"scheme-{name}"
    if not (folder / "qprompt-export.json").is_file():
        build = work / f".scheme-{name}"
        shutil.rmtree(build, ignore_errors=True)
        fused.build_base_graph(source, build, "int4", accuracy_level=1, extra_options=options)
        folder.mkdir(exist_ok=True)
        fused.move_graph(build / fused.GRAPH_FILE, folder / manifest.model_file)
        fused.add_prefix(folder / manifest.model_file, tables, manifest.head_dim, manifest.num_layers,
                         manifest.eos_token_ids[0], False)
        genai = json.loads((build / "genai_config.json").read_text())
        genai["model"]["decoder"]["filename"] = manifest.model_file
        (folder / "genai_config.json").write_text(json.dumps(genai))
        for extra in ("tokenizer.json", "tokenizer_config.json", "qprompt-export.json"):
            shutil.copy(nf4_export / extra, folder / extra)
        shutil.rmtree(build)
    predictions = ExportedModel(folder, providers=["CPUExecutionProvider"]).classify(rows, truncate=True)
    return {**_metrics(classification_metrics(predictions, gold, sorted(set(gold)))), "file_mb": folder_mb(folder),
            "rows": len(rows)}


# ------------------------------------------------------------------------------------------------ main
@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qprompt-edge"),
              show_default=True, help="Where the export folders are made and kept.")
@click.option("--artifact", "artifact_specs", multiple=True,
              help="TASK:QUANT=FOLDER, QUANT nf4, int4 or adapted (e.g. sentiment:int4=runs/sentiment-int4); "
                   "repeatable.")
@click.option("--model", default="smollm2-135m", show_default=True, help="The base (for the builder's anchors).")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=ROOT.parent / "shared" / "data",
              show_default=True, help="Task data (TASK/test.jsonl).")
@click.option("--parts", default="exports,speed,rss,accuracy,floor", show_default=True,
              help="Comma-separated parts to run (see the docstring); 'schemes' is extra.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--rounds", type=int, default=7, show_default=True)
@click.option("--prompt-tokens", type=int, default=40, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--limit", type=int, default=0, help="Test rows per task (0: all).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench/results/edge.json",
              show_default=True)
@click.option("--rss-child", default=None, hidden=True)
@click.option("--rss-runtime", default="qprompt", hidden=True)
def main(work, artifact_specs, model, data, parts, threads, rounds, prompt_tokens, new_tokens, limit, out, rss_child,
         rss_runtime):
    if rss_child:
        return rss_child_main(rss_child, rss_runtime, threads)
    artifacts: dict[str, dict[str, Path]] = {}
    for spec in artifact_specs:
        task_quant, _, folder = spec.partition("=")
        task, _, quant = task_quant.partition(":")
        if task not in TASK_DATA or quant not in ("nf4", "int4", "adapted") or not folder:
            raise click.BadParameter(f"{spec!r}: use TASK:QUANT=FOLDER with TASK in {list(TASK_DATA)}, QUANT nf4, "
                                     "int4 or adapted")
        artifacts.setdefault(task, {})[quant] = Path(folder)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    work.mkdir(parents=True, exist_ok=True)
    results = load(out)
    wanted = parts.split(",")
    folders = make_exports(work, artifacts, model)
    results["folders"] = {name: str(f) for name, f in folders.items()}
    if "speed" in wanted:
        results["speed"] = measure_speed(folders, data, threads, rounds, prompt_tokens, new_tokens)
        save(out, results)
    if "rss" in wanted:
        results["rss"] = measure_rss(folders, threads)
        save(out, results)
    if "accuracy" in wanted:
        results["accuracy"] = measure_accuracy(folders, artifacts, data, limit, results)
        save(out, results)
    if "floor" in wanted:
        results["floor"] = measure_floor(folders, results.get("speed", {}))
        save(out, results)
    if "schemes" in wanted:
        results["schemes"] = measure_schemes(work, folders["sentiment-int4-ptq"], data, limit)
        save(out, results)
    save(out, results)
    print_table(results)


def rss_child_main(folder: str, runtime: str, threads: int) -> None:
    rss_child(folder, runtime, threads)


def print_table(results: dict) -> None:
    speed, rss, acc, floor = (results.get(k, {}) for k in ("speed", "rss", "accuracy", "floor"))
    print(f"{'graph':<26}{'file MB':>8}{'RSS genai':>10}{'TTFT g':>8}{'tok g':>7}{'TTFT q':>8}{'tok q':>7}"
          f"{'floor':>7}{'sent.':>7}{'spam':>7}")
    for name in speed:
        if name.startswith("_"):
            continue
        kind = name.removeprefix("sentiment-")
        s, r = speed[name], rss.get(name, {})
        cells = [r.get("file_mb"), r.get("genai"), s.get("genai_ttft"), s.get("genai_token"), s.get("qprompt_ttft"),
                 s.get("qprompt_token"), floor.get("graphs", {}).get(name, {}).get("floor_ms"),
                 acc.get(f"sentiment-{kind}", {}).get("accuracy"), acc.get(f"spam-{kind}", {}).get("accuracy")]
        print(f"{name:<26}" + "".join(f"{c:>8}" if c is not None else f"{'-':>8}" for c in cells))


if __name__ == "__main__":
    main()
