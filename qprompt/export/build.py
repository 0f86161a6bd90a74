"""`qprompt export`: artifact(s) -> one checked export folder holding the graph it deploys.

The steps, top to bottom:
  1. load each artifact on the float weights the deployed graph will hold (prefix.py);
  2. make the graph: fused (onnxruntime-genai's builder + the prompt, fused.py) where the builder knows
     the base's family, else written out (torch's exporter, written.py); quantize what the builder does
     not (quantize.py);
  3. check it against PyTorch (parity.py) and record the result per task;
  4. write the manifest (and genai_config.json for onnxruntime-genai) and move the folder into place
     (folder.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

from .. import __version__
from ..deploy.genai import GENAI_CONFIG, fused_genai_config, genai_config
from ..deploy.manifest import ExportManifest
from ..deploy.runtime import QUANTIZATIONS, ExportedModel
from ..errors import ExportError, QPromptError
from ..forward import cache_shape
from ..int4 import Int4Scheme
from . import fused
from .folder import check_export_output, file_mb, install_export, portable_base
from .parity import PARITY_REL, PARITY_REL_FUSED, parity, passed
from .prefix import TaskSource, load_task
from .quantize import BNB4, quantize_graph
from .tasks import check_same_base, check_slots

log = logging.getLogger("qprompt")
GRAPHS = ("auto", "fused", "written")


def graph_file(quantize: str) -> str:
    return "model.onnx" if quantize == "none" else f"model.{quantize}.onnx"


def base_weights(quantize: str) -> str:
    """Which float weights the graph holds (and the PyTorch reference computes with): the int4 grid for int4, the
    bitsandbytes-quantized base dequantized for nf4/fp4, else the full-precision base."""
    return quantize if quantize in ("int4", *BNB4) else "none"


def export(artifact: str | Path | list | None, output: str | Path, quantize: str = "none", opset: int = 20,
           overwrite: bool = False, parity_tokens: int = 8, base_model: str | None = None, recipe=None,
           names: list[str] | None = None, multi_task: bool = False, prefix_slots: int | None = None,
           graph: str = "auto", keep_float: bool = False, accuracy_level: int | None = None,
           int4: Int4Scheme | None = None, ensemble: str | None = None) -> ExportManifest:
    """Write an export folder from `artifact` (or, with `base_model`, from a bare base: no soft prompt).

    Several artifacts (a list) trained on the same base make one graph of several tasks, named by `names`
    (default: the artifact folders' names); so does one with `multi_task`, ready for `add_task`. Such a graph
    holds `prefix_slots` prefix slots per task (default: the longest prompt's virtual tokens).

    graph: "fused" (onnxruntime-genai's model builder + the prompt), "written" (torch's exporter), or "auto"
    (fused where the builder knows the base). The folder holds the graph `quantize` names, and the float32
    graph too only with `keep_float`. accuracy_level: int4/int8 compute (default_accuracy_level). int4: the
    int4 scheme for an artifact not trained on int4 (one trained on int4 keeps its own). ensemble: a name under
    which the artifacts (two or more classification prompts of one task) classify together, by the mean of their
    label probabilities (Lester et al. 2021's prompt ensembles); each stays a task of its own too."""
    output = Path(output)
    artifacts = [artifact] if isinstance(artifact, (str, Path)) or artifact is None else list(artifact)
    if quantize not in QUANTIZATIONS:
        raise QPromptError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    if graph not in GRAPHS:
        raise QPromptError(f"unknown graph {graph!r}: use one of {', '.join(GRAPHS)}")
    if names is not None and len(names) != len(artifacts):
        raise QPromptError(f"{len(names)} task names for {len(artifacts)} artifacts: give one name per artifact")
    for art in artifacts:
        check_export_output(output, art, overwrite)
    start = time.perf_counter()
    weights = base_weights(quantize)
    scheme = int4_scheme(artifacts, int4) if weights == "int4" else Int4Scheme()
    sources = [load_task(art, weights, names[i] if names else None, base_model, recipe,
                         scheme.to_dict() if weights == "int4" else None)
               for i, art in enumerate(artifacts)]
    level = default_accuracy_level(sources) if accuracy_level is None else accuracy_level
    check_same_base(sources)
    if ensemble is not None and len(sources) < 2:
        raise QPromptError("--ensemble needs two or more artifacts (prompts for one task, e.g. trained from other "
                           "seeds or inits)")
    tables = multi_task or len(sources) > 1
    slots = prefix_slots or max(s.artifact["virtual_tokens"] for s in sources)
    if tables:
        check_slots(sources, slots)

    output.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, uniquely named folder beside the output (nothing of the user's shares its name), made with
    # mkdir so it gets the usual permissions, not mkdtemp's owner-only ones: the folder is meant to be shipped.
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        kinds = ["fused", "written"] if graph == "auto" else [graph]
        for kind in kinds:
            try:
                if kind == "fused":
                    made = _fused(sources, tmp, quantize, tables, slots, scheme, level, keep_float)
                else:
                    made = _written(sources, tmp, quantize, tables, slots, opset, scheme, level, keep_float)
                data = _manifest(sources, tmp, made, quantize, tables, slots, opset, weights, level, scheme)
                if ensemble is not None:
                    data.ensembles = {ensemble: data.task_names}
                    try:
                        data.check_ensembles("export prompts of one task together")
                    except ExportError as exc:
                        raise QPromptError(str(exc)) from None  # the artifacts', not the graph's: no retry
                data.write(tmp)  # the runtime that checks the graph reads it
                _check(sources, tmp, data, parity_tokens)
                break
            except (fused.BuilderUnavailable, QPromptError, ExportError) as exc:
                if kind == kinds[-1]:
                    if isinstance(exc, fused.BuilderUnavailable):
                        raise QPromptError(f"no fused graph for {sources[0].artifact['base'].get('name')}: {exc}; "
                                           "export with --graph written") from None
                    raise
                # auto: the builder does not know the family, or its graph failed the check; the written-out one
                log.warning("fused graph not used (%s): exporting the written-out graph", str(exc)[:300])
                for leftover in tmp.iterdir():
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        data.seconds = round(time.perf_counter() - start, 1)
        _write_genai_config(sources[0], tmp, data, made)
        data.write(tmp)
        install_export(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted export leaves nothing behind
        raise
    return data


def int4_scheme(artifacts: list, asked: Int4Scheme | None) -> Int4Scheme:
    """The int4 scheme of the graph and of its PyTorch reference: the grid the (first) artifact trained on, else
    `asked`, else the default."""
    from ..artifact import read_manifest

    trained = None
    if artifacts and artifacts[0] is not None:
        base = read_manifest(artifacts[0])["base"]
        trained = base.get("int4") if base.get("quant") == "int4" else None
    return Int4Scheme.from_dict(trained) if trained else (asked or Int4Scheme())


def default_accuracy_level(sources: list[TaskSource]) -> int:
    """MatMulNBits compute, by what the export serves (measured on SmolLM2, docs/benchmarks.md): generation
    decodes one token at a time, where int8 activations (level 4) are fastest; classification only prefills,
    where float32 compute (level 1) is faster on the CPUs measured, and exact: the graph gives the trained
    model's labels."""
    generates = any(s.recipe is None or s.recipe.task != "classification" for s in sources)
    return fused.DEFAULT_ACCURACY_LEVEL if generates else 1


def _fused(sources: list[TaskSource], tmp: Path, quantize: str, tables: bool, slots: int, scheme: Int4Scheme,
           level: int, keep_float: bool) -> dict:
    """Build the base's graph(s) with the model builder and put the prompt(s) in; returns what was made."""
    first = sources[0]
    config = first.base.config
    heads, head_dim = cache_shape(first.base)
    base_dir = tmp / ".base"
    first.base.save_pretrained(base_dir)  # the float weights the prompt was trained against
    first.tokenizer.save_pretrained(base_dir)
    precision = fused.BUILDER_PRECISION[quantize]
    kinds = [quantize] + (["none"] if keep_float and quantize != "none" else [])
    built = {}
    for kind in kinds:
        work = tmp / f".build-{kind}"
        fused.build_base_graph(base_dir, work, fused.BUILDER_PRECISION[kind], block_size=scheme.block_size,
                               symmetric=scheme.symmetric, accuracy_level=level)
        path = tmp / graph_file(kind)
        if kind in ("int8-dynamic", *BNB4):  # quantized from the builder's fp32 graph, before the prompt goes in
            quantize_graph(work / fused.GRAPH_FILE, path, kind)
        else:
            fused.move_graph(work / fused.GRAPH_FILE, path)
        built[kind] = work
    layers = fused.attention_layers(fused.load_proto(tmp / graph_file(quantize)).graph, config.num_hidden_layers,
                                    head_dim)
    cos, sin = fused.rotary_tables(tmp / graph_file(quantize))
    prompt = fused.prompt_tables([[(k.numpy(), v.numpy()) for k, v in s.prefix] or _no_prefix(layers, head_dim)
                                  for s in sources], layers, cos, sin, max(slots, 1) if tables else slots)
    eos = first.tokenizer.eos_token_id
    for kind in kinds:
        fused.add_prefix(tmp / graph_file(kind), prompt, head_dim, config.num_hidden_layers, eos, tables)
    genai = json.loads((built[quantize] / GENAI_CONFIG).read_text())
    for work in [base_dir, *built.values()]:
        shutil.rmtree(work)
    first.tokenizer.save_pretrained(tmp)
    return {"graph": "fused", "files": [graph_file(k) for k in kinds], "builder_genai_config": genai,
            "precision": precision, "heads": heads}


def _no_prefix(layers, head_dim: int) -> list:
    """A bare base exported as fused: zero virtual tokens per layer."""
    import numpy as np

    return [(np.zeros((1, layer.kv_heads, 0, head_dim), np.float32),) * 2 for layer in layers]


def _written(sources: list[TaskSource], tmp: Path, quantize: str, tables: bool, slots: int, opset: int,
             scheme: Int4Scheme, level: int, keep_float: bool) -> dict:
    """Export the written-out graph with torch's exporter, and quantize it if asked."""
    from .written import (
        MergedPromptDecoder,
        TaskTableDecoder,
        export_graph,
        prefix_reaches_attention,
        prefix_tables,
        set_tables,
    )

    first = sources[0]
    shape = cache_shape(first.base)
    in_cache = not prefix_reaches_attention(first.base, shape)
    module = (TaskTableDecoder(first.base, slots, in_cache) if tables
              else MergedPromptDecoder(first.base, first.prefix, in_cache)).eval()
    fp32 = tmp / "model.onnx"
    log.info("exporting %s to ONNX (opset %d)", first.artifact["base"]["name"], opset)
    try:
        export_graph(module, fp32, opset, shape)
    except Exception as exc:  # torch.export raises many kinds; the user needs its first line, and what to do
        raise QPromptError(written_failure(first.base.config, exc)) from exc
    if tables:
        set_tables(fp32, prefix_tables([s.prefix for s in sources], slots, module.num_layers, shape))
    files = ["model.onnx"]
    if quantize != "none":
        quantize_graph(fp32, tmp / graph_file(quantize), quantize, scheme, level)
        files = [graph_file(quantize)] + (["model.onnx"] if keep_float else [])
        if not keep_float:
            fp32.unlink()
    first.tokenizer.save_pretrained(tmp)
    return {"graph": "written", "files": files, "module_slots": module.num_virtual}


def written_failure(config, exc: Exception) -> str:
    """One line for a base torch's exporter cannot trace: the family, the first sentence of the error that stopped
    the exporter (torch wraps it in a page of generic advice), and why no other route exists."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split()) or type(exc).__name__
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) > 200:
        sentence = sentence[:200].rsplit(" ", 1)[0] + " [...]"
    family = getattr(config, "model_type", None) or type(config).__name__
    return (f"{family} cannot be exported: onnxruntime-genai's model builder does not know this family and torch's "
            f"ONNX exporter fails on it ({type(exc).__name__}: {sentence}); the prompt still trains and runs in "
            "PyTorch (qprompt eval, qprompt generate)")


def _manifest(sources: list[TaskSource], tmp: Path, made: dict, quantize: str, tables: bool, slots: int, opset: int,
              weights: str, level: int, scheme: Int4Scheme) -> ExportManifest:
    first = sources[0]
    config, tok = first.base.config, first.tokenizer
    heads, head_dim = cache_shape(first.base)
    fused_graph = made["graph"] == "fused"
    slots_in_graph = slots if (tables or fused_graph) else made.get("module_slots", slots)
    data = ExportManifest(
        model_file=graph_file(quantize), num_layers=config.num_hidden_layers, num_kv_heads=heads, head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", 2048) - slots_in_graph,
        pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id] if tok.eos_token_id is not None else [],
        bos_token_id=tok.bos_token_id, opset=opset, quantization=quantize, tasks=[s.entry() for s in sources],
        task_ids_input=tables, prefix_slots=slots_in_graph, base=portable_base(first.artifact["base"]),
        fp32_weights=f"dequantized {weights}" if weights != "none" else "full precision",
        qprompt_version=__version__, graph=made["graph"],
        weights={"quantization": quantize, **({"int4": scheme.to_dict()} if quantize == "int4" else {}),
                 **({"accuracy_level": level} if quantize in ("int4", "int8") else {})})
    for name in made["files"]:
        data.files[name] = {"quantization": "none" if name == "model.onnx" else quantize, "mb": file_mb(tmp, name)}
    return data


def _check(sources: list[TaskSource], tmp: Path, data: ExportManifest, parity_tokens: int) -> None:
    """Parity of every graph in the folder against each task's PyTorch model, on its stored validation rows.

    Exact graphs must pass: float32; nf4/fp4 (the reference's very weights); int4 at accuracy level 0/1 (float32
    compute on the reference's int4 weights). At level 4 an int4 graph rounds every layer's input to int8: a float
    difference of one ulp moves a value at half a level to the other side, so no reference can match it to float
    rounding. Its float32-compute twin (the same file at level 1) must pass instead, and the deployed graph's
    agreement with the reference is recorded; int8 and int8-dynamic quantize what the float reference does not:
    their agreement is recorded."""
    level = data.weights.get("accuracy_level", 0)
    for name in data.files:
        quant = data.files[name]["quantization"]
        # The builder's kernels, and MLAS's blocked dequantize-and-multiply in any graph, reassociate more.
        rel = PARITY_REL_FUSED if data.graph == "fused" or quant != "none" else PARITY_REL
        runtime = ExportedModel(tmp, name, providers=["CPUExecutionProvider"])
        exact = quant in ("none", "nf4", "fp4") or (quant == "int4" and level <= 1)
        twin = fused.float_compute_twin(tmp / name) if quant == "int4" and not exact else None
        for source, task in zip(sources, data.tasks):
            samples = source.artifact.get("samples") or []
            prompts = ([runtime.prompt_ids(row, task=task.name) for row in samples] if samples
                       else [runtime.encode("The film opens on a quiet street, and then")])
            report = parity(source.model, runtime, prompts, parity_tokens, task.name, rel)
            gate = report if exact else None
            if twin is not None:
                gate = report["float_compute_twin"] = parity(
                    source.model, ExportedModel(tmp, twin.name, providers=["CPUExecutionProvider"]), prompts,
                    parity_tokens, task.name, rel)
            if gate is not None and not passed(gate):
                which = f"{name}'s float32-compute twin" if twin is not None else name
                raise QPromptError(
                    f"the exported graph ({which}) does not match PyTorch for {task.name} (max logit difference "
                    f"{gate['max_abs_logit_diff']:.2e} > {gate['tolerance']:.1e}, greedy tokens equal: "
                    f"{gate['greedy_tokens_equal']}); nothing was written; export with --graph written, or report "
                    "the model")
            if name == data.model_file:
                task.parity = {**report, "exact": exact}
        if twin is not None:
            twin.unlink()


def _write_genai_config(first: TaskSource, tmp: Path, data: ExportManifest, made: dict) -> None:
    if data.task_ids_input:  # onnxruntime-genai cannot feed task_ids
        return
    config, tok = first.base.config, first.tokenizer
    if made["graph"] == "fused":
        genai = fused_genai_config(made["builder_genai_config"], data)
    else:
        genai = genai_config(data, config.model_type, config.hidden_size, config.num_attention_heads, tok.bos_token_id)
    (tmp / GENAI_CONFIG).write_text(json.dumps(genai, indent=1) + "\n")
