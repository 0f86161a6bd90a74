"""Benchmark: inference of a soft prompt, PyTorch + PEFT against the merged ONNX graph (the written-out graph,
as it was measured before the fused one; bench/edge.py measures every graph kind side by side).

Latency (median of --repeats, rows measured in turn) of one request — a real review in the sentiment template — for:
  (a) PEFT + PyTorch `generate` (float32, unquantized base)
  (b) the qprompt ONNX graph: fp32, int8 (weight-only), int8-dynamic, int4, nf4
  (c) the bare base exported the same way, with no soft prompt
Time to first token = prefill of the real tokens + the first token; per-token = mean decode step.
The latency prompt has --virtual-tokens (default 100) virtual tokens, trained for one step: speed
does not depend on the prompt's values.

Agreement: the trained sentiment artifact (--artifact, trained on nf4) exported in every quantization,
each classifying the shared test split; reports the accuracy of each, how often it agrees with the
full-precision fp32 graph, and how often with the nf4 weights the prompt was trained against (the
nf4 export's fp32 graph, which passes parity against the bitsandbytes PyTorch model).

ORT GenAI (--parts genai, alone): the same request through onnxruntime-genai, which runs the export folders
unchanged (genai_config.json): (i) the soft-prompt export against the bare one, both in ORT GenAI; (ii) ORT
GenAI against qprompt's runtime (ExportedModel.generate_ids) and PEFT + PyTorch (qprompt's cached greedy loop,
greedy_generate: PEFT's own generate mis-decodes soft prompts on transformers 5.24), each through its user-level
API; and label scoring of --genai-rows test rows, ORT GenAI's next-token logits against ExportedModel.classify.

    python bench/inference.py --artifact runs/bench-sentiment [--rows 2000]
    python bench/inference.py --parts genai --out bench/results/inference-genai.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"


GRAPHS = ("fp32", "int8", "int8-dynamic", "int4", "nf4")


def graph_file(quantization: str) -> str:
    return "model.onnx" if quantization == "fp32" else f"model.{quantization}.onnx"


def interleaved_medians(timers: dict[str, dict], repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of every timer, measured round-robin (row after row, `repeats` rounds) so that
    drift in this shared machine's speed hits all rows alike instead of whichever ran last."""
    for fns in timers.values():  # warm-up
        for fn in fns.values():
            fn()
    times: dict = {row: {name: [] for name in fns} for row, fns in timers.items()}
    for _ in range(repeats):
        for row, fns in timers.items():
            for name, fn in fns.items():
                time.sleep(0.2)  # let the previous session's worker threads stop spinning
                start = time.perf_counter()
                fn()
                times[row][name].append(time.perf_counter() - start)
    return {row: {name: statistics.median(t) for name, t in d.items()} for row, d in times.items()}


def torch_timers(model, tokenizer, prompt_ids, new_tokens) -> dict:
    import torch

    x = torch.tensor([prompt_ids])

    def gen(n):
        with torch.no_grad():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    return {"first": lambda: gen(1), "full": lambda: gen(new_tokens + 1)}


def onnx_timers(runtime, prompt_ids, new_tokens) -> dict:
    import numpy as np

    x = np.array([prompt_ids], dtype=np.int64)

    def prefill():
        return runtime.forward(x, np.ones_like(x), runtime.empty_past(1))

    logits, past = prefill()
    mask = np.ones((1, x.shape[1]), dtype=np.int64)

    def decode():
        p, m, tok = past, mask, np.array([[int(logits[0, -1].argmax())]])
        for _ in range(new_tokens):
            m = np.concatenate([m, np.ones((1, 1), dtype=np.int64)], axis=1)
            out, p = runtime.forward(tok, m, p)
            tok = np.array([[int(out[0, -1].argmax())]])

    return {"first": prefill, "decode": decode}


def genai_timers(model, prompt_ids, new_tokens) -> dict:
    """ORT GenAI as an application drives it: a generator per request, the prompt appended, tokens generated.
    min_length = max_length: exactly n tokens, whether or not EOS comes first."""
    import numpy as np
    import onnxruntime_genai as og

    x = np.array([prompt_ids], dtype=np.int32)

    def gen(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + n, min_length=len(prompt_ids) + n)
        generator = og.Generator(model, params)
        generator.append_tokens(x)
        while not generator.is_done():
            generator.generate_next_token()

    return {"first": lambda: gen(1), "full": lambda: gen(new_tokens + 1)}


def runtime_timers(runtime, prompt_ids, new_tokens) -> dict:
    """qprompt's runtime through its API (generate_ids: padding, cache, token choice), EOS off: exactly n tokens."""
    from qprompt.deploy.runtime import Sampling

    def gen(n):
        eos, runtime.eos_ids = runtime.eos_ids, set()
        try:
            runtime.generate_ids([prompt_ids], Sampling(max_new_tokens=n))
        finally:
            runtime.eos_ids = eos

    return {"first": lambda: gen(1), "full": lambda: gen(new_tokens + 1)}


def greedy_timers(model, prompt_ids, new_tokens) -> dict:
    """PEFT + PyTorch through qprompt's cached greedy loop; the virtual tokens run through the model on every
    request, as in PEFT's generate. No stop tokens: exactly n tokens."""
    import torch

    from qprompt.forward import greedy_generate

    x = torch.tensor([prompt_ids])

    def gen(n):
        greedy_generate(model, x, torch.ones_like(x), n, [], pad_id=0)

    return {"first": lambda: gen(1), "full": lambda: gen(new_tokens + 1)}


@click.command()
@click.option("--artifact", default="runs/bench-sentiment", show_default=True, help="Trained sentiment artifact.")
@click.option("--virtual-tokens", default=100, show_default=True)
@click.option("--new-tokens", default=32, show_default=True, help="Decode steps timed per request.")
@click.option("--repeats", default=5, show_default=True)
@click.option("--rows", default=2000, show_default=True, help="Test rows for the int8 agreement check.")
@click.option("--work", default="runs/bench-inference", show_default=True, help="Folder for exports.")
@click.option("--out", "json_out", default=str(ROOT / "bench" / "results" / "inference.json"), show_default=True)
@click.option("--reuse", is_flag=True, help="Latency: reuse the prompt and graphs already in --work.")
@click.option("--parts", default="latency,agreement", show_default=True,
              help="Which parts to run (latency, agreement, genai); results merge into an existing --out file.")
@click.option("--genai-rows", default=400, show_default=True, help="Test rows ORT GenAI and qprompt classify.")
@click.option("--data", default=str(DATA), show_default=True,
              help="Folder of the sentiment rows (validation.jsonl, test.jsonl).")
def main(artifact, virtual_tokens, new_tokens, repeats, rows, work, json_out, reuse, parts, genai_rows, data):
    global DATA
    DATA = Path(data)
    sys.path.insert(0, str(ROOT))
    from qprompt.cli import quiet_libraries

    quiet_libraries()
    work = Path(work)
    previous = json.loads(Path(json_out).read_text()) if Path(json_out).exists() else {}
    results: dict = {**previous, "virtual_tokens": virtual_tokens, "new_tokens": new_tokens}
    results.setdefault("commands", {})
    for part in parts.split(","):
        results["commands"][part] = " ".join(sys.argv)
    if "latency" in parts:
        latency_part(results, virtual_tokens, new_tokens, repeats, work, reuse)
    if "agreement" in parts:
        agreement_part(results, artifact, rows, work)
    if "genai" in parts:
        genai_part(results, virtual_tokens, new_tokens, repeats, genai_rows, work, reuse)
    show(results)
    from machine import describe

    results["machine"] = describe()
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=1) + "\n")
    click.echo(f"wrote {json_out}")


def latency_exports(virtual_tokens, work, reuse=False, graphs=GRAPHS) -> list[int]:
    """The latency prompt, its export (`graphs`) and the bare base's; kept with --reuse. Returns the request's ids."""
    from qprompt.config import load_recipe_file, override
    from qprompt.data import load_splits, read_rows
    from qprompt.deploy.genai import GENAI_CONFIG
    from qprompt.deploy.runtime import ExportedModel
    from qprompt.export import export, quantize_graph
    from qprompt.models import load_model
    from qprompt.train import train

    # A 100-virtual-token prompt for latency (one training step: values do not change speed).
    recipe = override(load_recipe_file(ROOT / "recipes" / "sentiment.yaml"), quant="none",
                      method__virtual_tokens=virtual_tokens, train__max_steps=1, train__eval_every=0,
                      train__eval_rows=4)
    if not (reuse and (work / "latency-artifact").exists()):
        splits = load_splits(recipe, str(DATA / "validation.jsonl"), str(DATA / "validation.jsonl"))
        splits["train"] = splits["train"][:64]
        model, tok, info = load_model(recipe.model, "none")
        train(recipe, model, tok, info, splits, work / "latency-artifact", overwrite=True, progress=False)

    # Exports older than genai_config.json are made again.
    needed = [work / "latency" / graph_file(q) for q in graphs] + [work / f / GENAI_CONFIG for f in ("latency", "bare")]
    if not (reuse and all(path.exists() for path in needed)):
        export(work / "latency-artifact", work / "latency", overwrite=True, graph="written")
        for q in graphs[1:]:
            quantize_graph(work / "latency" / "model.onnx", work / "latency" / f"model.{q}.onnx", q)
        export(None, work / "bare", overwrite=True, base_model=recipe.model, recipe=recipe, graph="written")
    text = read_rows(str(DATA / "test.jsonl"))[0]
    return ExportedModel(work / "latency", "model.onnx", providers=["CPUExecutionProvider"]).prompt_ids(text)


def latency_part(results, virtual_tokens, new_tokens, repeats, work, reuse=False):
    from qprompt.artifact import load_artifact
    from qprompt.deploy.runtime import ExportedModel

    prompt_ids = latency_exports(virtual_tokens, work, reuse)
    peft_model, tok, _, _ = load_artifact(work / "latency-artifact", quant="none")
    results["prompt_tokens"] = len(prompt_ids)
    # Rows that are compared with each other are timed in turn, and only they are loaded: every ONNX
    # Runtime session keeps its own thread pool, whose workers spin for a while after each run.
    medians = {}
    groups = [["fp32", "bare"], *[[q] for q in GRAPHS[1:]]]  # the soft prompt's cost: fp32 against bare
    for group in groups:
        timers = {}
        for q in group:
            folder, file, row = (work / "bare", "model.onnx", "(c) bare base ONNX fp32") if q == "bare" else \
                (work / "latency", graph_file(q), f"(b) qprompt ONNX {q}")
            runtime = ExportedModel(folder, file, providers=["CPUExecutionProvider"])
            timers[row] = onnx_timers(runtime, prompt_ids, new_tokens)
        medians.update(interleaved_medians(timers, repeats))
        del timers, runtime
    # PyTorch last: its OpenMP threads keep spinning after each call and would slow the graphs timed after.
    medians.update(interleaved_medians({"(a) PEFT + PyTorch generate": torch_timers(peft_model, tok, prompt_ids,
                                                                                    new_tokens)}, repeats))
    latency = {}
    order = ["(a) PEFT + PyTorch generate", *[f"(b) qprompt ONNX {q}" for q in GRAPHS], "(c) bare base ONNX fp32"]
    for row, m in sorted(medians.items(), key=lambda item: order.index(item[0])):
        per_token = (m["full"] - m["first"]) / new_tokens if "full" in m else m["decode"] / new_tokens
        latency[row] = {"ttft": round(m["first"] * 1e3, 2), "per_token": round(per_token * 1e3, 2)}
    results["latency_ms"] = latency
    for q in GRAPHS:
        results.setdefault("size_mb", {})[q] = round((work / "latency" / graph_file(q)).stat().st_size / 1e6, 1)


def agreement_part(results, artifact, rows, work):
    """Every quantized graph of the trained artifact against fp32 and against the trained-on nf4 weights."""
    from qprompt.data import read_rows
    from qprompt.deploy.runtime import ExportedModel
    from qprompt.export import export, quantize_graph
    from qprompt.metrics import classification_metrics

    export(artifact, work / "trained", overwrite=True, graph="written")
    for q in ("int8", "int8-dynamic", "int4"):
        quantize_graph(work / "trained" / "model.onnx", work / "trained" / graph_file(q), q)
    export(artifact, work / "trained-nf4", quantize="nf4", overwrite=True, graph="written", keep_float=True)
    graphs = {q: (work / "trained", graph_file(q)) for q in GRAPHS if q != "nf4"}
    graphs["nf4 weights in fp32"] = (work / "trained-nf4", "model.onnx")
    graphs["nf4"] = (work / "trained-nf4", "model.nf4.onnx")
    test_rows = read_rows(str(DATA / "test.jsonl"))[:rows]
    refs = [r["label"] for r in test_rows]
    preds, table = {}, {}
    for name, (folder, file) in graphs.items():
        runtime = ExportedModel(folder, file, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        preds[name] = runtime.classify(test_rows)
        table[name] = {**classification_metrics(preds[name], refs, ["positive", "negative"]),
                       "seconds": round(time.perf_counter() - start, 1),
                       "mb": round((folder / file).stat().st_size / 1e6, 1)}
    for name, row in table.items():
        for other, key in (("fp32", "agreement_with_fp32"), ("nf4 weights in fp32", "agreement_with_nf4_weights")):
            row[key] = sum(a == b for a, b in zip(preds[name], preds[other])) / len(refs)
    results["classification"] = table
    results.pop("int8_agreement_with_fp32", None)  # from the earlier, int8-dynamic-only version of this part


def genai_part(results, virtual_tokens, new_tokens, repeats, rows, work, reuse=False):
    """ORT GenAI on the latency exports: against the bare export, qprompt's runtime and PyTorch; label scoring."""
    import onnxruntime_genai as og
    import torch

    from qprompt.artifact import load_artifact
    from qprompt.data import read_rows
    from qprompt.deploy.runtime import ExportedModel, Sampling
    from qprompt.forward import greedy_generate

    prompt_ids = latency_exports(virtual_tokens, work, reuse, graphs=("fp32",))
    results["prompt_tokens"] = len(prompt_ids)
    others_before = other_processes_cpu()  # this machine is shared: did other work run beside the timings?
    soft, bare = og.Model(str(work / "latency")), og.Model(str(work / "bare"))
    # ORT GenAI's default thread pool is half the logical CPUs (1 on this 2-core VM); ORT's own default, which
    # qprompt's runtime keeps, is the physical cores (2 here). A third row gives ORT GenAI ORT's default (0).
    config = og.Config(str(work / "latency"))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 0}}}}))
    soft_ort_threads = og.Model(config)
    runtime = ExportedModel(work / "latency", "model.onnx", providers=["CPUExecutionProvider"])
    text = read_rows(str(DATA / "test.jsonl"))[0]
    checks = {"tokenizer_ids_equal": genai_ids(soft, runtime.task().template.prompt.format(**text))
              == prompt_ids}
    # The same greedy tokens from all three (EOS on), before anything is timed.
    peft_model, _, _, _ = load_artifact(work / "latency-artifact", quant="none")
    x = torch.tensor([prompt_ids])
    torch_new = greedy_generate(peft_model, x, torch.ones_like(x), new_tokens, sorted(runtime.eos_ids), 0)[0]
    runtime_new = runtime.generate_ids([prompt_ids], Sampling(max_new_tokens=new_tokens))[0]
    genai_new = genai_greedy(soft, prompt_ids, new_tokens)
    checks["greedy_tokens_equal"] = genai_new == runtime_new == [t for t in torch_new if t not in runtime.eos_ids]
    checks["greedy_tokens"] = len(genai_new)

    medians = interleaved_medians({
        "ORT GenAI, soft-prompt export": genai_timers(soft, prompt_ids, new_tokens),
        "ORT GenAI, bare export": genai_timers(bare, prompt_ids, new_tokens),
        "ORT GenAI, soft-prompt export, ORT's thread default": genai_timers(soft_ort_threads, prompt_ids, new_tokens),
        "qprompt runtime (ExportedModel)": runtime_timers(runtime, prompt_ids, new_tokens)}, repeats)
    # PyTorch last, alone: its OpenMP threads keep spinning after each call.
    medians.update(interleaved_medians({"PEFT + PyTorch (greedy_generate)": greedy_timers(peft_model, prompt_ids,
                                                                                         new_tokens)}, repeats))
    latency = {row: {"ttft": round(m["first"] * 1e3, 2),
                     "per_token": round((m["full"] - m["first"]) / new_tokens * 1e3, 2)} for row, m in medians.items()}
    results["genai"] = {"latency_ms": latency, "checks": checks,
                        "genai_default_threads": min(16, max(1, (os.cpu_count() or 2) // 2)),
                        "other_processes_cores": other_processes_cores(others_before),
                        "classification": genai_classification(soft, runtime, rows, repeats)}


def other_processes_cpu() -> tuple[float, float] | None:
    """(CPU seconds all processes but this one have used since boot, wall clock), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields[:3]) + sum(fields[5:8])  # user, nice, system, irq, softirq, steal (not idle, iowait)
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - own.user - own.system, time.time()


def other_processes_cores(before: tuple[float, float] | None) -> float | None:
    """How many cores other processes kept busy, on average, since `before`: 0 is a quiet machine."""
    after = other_processes_cpu()
    if before is None or after is None:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def genai_ids(model, text: str) -> list[int]:
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # as qprompt encodes (a no-op for SmolLM2: no BOS)
    return [int(t) for t in tokenizer.encode(text)]


def genai_greedy(model, prompt_ids, new_tokens) -> list[int]:
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    eos = set(og.Tokenizer(model).eos_token_ids)
    new = [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]]
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def genai_label_batch(model, prompts, label_ids) -> list[int]:
    """ORT GenAI has no scoring call, but a generator exposes the next-token logits after the prompt: enough
    for labels of one token each. Right-padded, as ORT GenAI batches."""
    import numpy as np
    import onnxruntime_genai as og

    width = max(map(len, prompts))
    batch = np.full((len(prompts), width), og.Tokenizer(model).pad_token_id, dtype=np.int32)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=len(prompts), max_length=width + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    logits = np.asarray(generator.get_logits()).reshape(len(prompts), -1)
    return logits[:, label_ids].argmax(axis=1).tolist()


def genai_classification(model, runtime, rows, repeats, batch_size=16) -> dict:
    """Label scoring of `rows` test rows in batches of 16: ORT GenAI's logits against ExportedModel.classify."""
    from qprompt.data import read_rows

    test_rows = read_rows(str(DATA / "test.jsonl"))[:rows]
    labels = list(runtime.label_ids())
    if any(len(runtime.label_ids()[lab]) != 1 for lab in labels):
        return {"skipped": "a label has more than one token: ORT GenAI exposes only the next token's logits"}
    label_ids = [runtime.label_ids()[lab][0] for lab in labels]
    prompts = [runtime.prompt_ids(r) for r in test_rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as classify batches: similar lengths
    prompts = [prompts[i] for i in order]
    predictions = {}

    def genai():
        picks = []
        for start in range(0, len(prompts), batch_size):
            picks += genai_label_batch(model, prompts[start : start + batch_size], label_ids)
        predictions["genai"] = [labels[k] for k in picks]

    def qprompt():
        predictions["qprompt"] = runtime.classify([test_rows[i] for i in order], batch_size=batch_size)

    seconds = interleaved_medians({"classify": {"ORT GenAI": genai, "qprompt runtime": qprompt}}, repeats)["classify"]
    same = sum(a == b for a, b in zip(predictions["genai"], predictions["qprompt"]))
    return {"rows": len(prompts), "batch_size": batch_size, "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "labels_equal": same / len(prompts)}


def show_genai(g):
    lat = g["latency_ms"]
    click.echo(f"\n{'ORT GenAI':<54}{'TTFT ms':>10}{'per token ms':>14}")
    for k, v in lat.items():
        click.echo(f"{k:<54}{v['ttft']:>10.1f}{v['per_token']:>14.1f}")
    soft, bare = lat["ORT GenAI, soft-prompt export"], lat["ORT GenAI, bare export"]
    click.echo(f"soft prompt over bare base in ORT GenAI: TTFT {soft['ttft'] / bare['ttft'] - 1:+.1%}, "
               f"per token {soft['per_token'] / bare['per_token'] - 1:+.1%}")
    click.echo(f"checks: {g['checks']}; classification: {g['classification']}")


def show_latency(lat):
    bare_ms = lat["(c) bare base ONNX fp32"]
    click.echo(f"{'':<34}{'TTFT ms':>10}{'per token ms':>14}")
    for k, v in lat.items():
        click.echo(f"{k:<34}{v['ttft']:>10.1f}{v['per_token']:>14.1f}")
    fp32 = lat["(b) qprompt ONNX fp32"]
    click.echo(f"soft prompt over bare base: TTFT {fp32['ttft'] / bare_ms['ttft'] - 1:+.1%}, "
               f"per token {fp32['per_token'] / bare_ms['per_token'] - 1:+.1%}")
    click.echo(f"ONNX fp32 TTFT speed-up over PEFT: {lat['(a) PEFT + PyTorch generate']['ttft'] / fp32['ttft']:.2f}x")


def show(results):
    lat = results.get("latency_ms", {})
    if "(b) qprompt ONNX fp32" in lat:  # absent until the latency part has run with this version
        show_latency(lat)
    if "genai" in results:
        show_genai(results["genai"])
    if not results.get("classification"):
        return
    click.echo(f"\n{'graph':<22}{'MB':>7}{'accuracy':>10}{'= fp32':>9}{'= nf4 w':>9}{'seconds':>9}")
    for name, m in results.get("classification", {}).items():
        click.echo(f"{name:<22}{m['mb']:>7.0f}{m['accuracy']:>10.4f}{m['agreement_with_fp32']:>9.2%}"
                   f"{m['agreement_with_nf4_weights']:>9.2%}{m['seconds']:>9.0f}  ({m['rows']} test rows)")


if __name__ == "__main__":
    main()
