"""Export a trained soft prompt *merged into* an ONNX decoder graph, and prove it matches PyTorch.

In a causal decoder the virtual tokens come first, so no real token can change their keys and
values: once training is over they are constants. We compute them once (a forward pass over the
soft prompt alone, on the full-precision base) and fold them into the graph as a constant KV
prefix. The graph takes the usual decoder-with-past inputs for real tokens only:

    input_ids (B, L), attention_mask (B, P + L), past_key_values.{i}.key/value (B, kv_heads, P, head_dim)
    -> logits (B, L, vocab), present.{i}.key/value (B, kv_heads, P + L, head_dim)

Positions of real tokens start after the virtual tokens (counted from the mask, so left padding
is exact), and a request never pays a prefill for the virtual tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from . import __version__, owned
from .artifact import load_artifact, write_json
from .data import template_of
from .errors import QPromptError
from .forward import cache_kwargs, cache_of, greedy_generate, is_multitask, is_prefix, soft_prompt, virtual_tokens
from .genai import GENAI_CONFIG, genai_config
from .manifest import EXPORT_MANIFEST, ExportManifest, TaskEntry
from .plan import kv_shape
from .runtime import QUANTIZATIONS, ExportedModel, Sampling
from .templates import Template, real_positions

log = logging.getLogger("qprompt")
BNB4 = ("nf4", "fp4")  # bitsandbytes 4-bit formats, reproduced exactly from the quantized base
# The fp32 graph must match PyTorch to max |logit diff| <= max(1e-4, 1e-5 x the largest |logit|). The
# relative part is float32 reassociation: on SmolLM2-135M (30 layers, |logits| up to ~45) PyTorch
# itself differs from PEFT's forward by ~5e-5 once the prompt's keys/values are computed separately.
PARITY_ABS, PARITY_REL = 1e-4, 1e-5


class MergedPromptDecoder(torch.nn.Module):
    """The base decoder with a constant KV prefix (the soft prompt) in front of every sequence.

    Traced only through `export_graph`, whose attention (`grouped_attention`) reads the prefix."""

    def __init__(self, base, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.base = base
        self.num_layers = base.config.num_hidden_layers
        self.num_virtual = prefix[0][0].shape[2] if prefix else 0
        for i, (k, v) in enumerate(prefix):
            # Keys stored transposed, (1, kv_heads, head_dim, virtual), the way attention multiplies by them:
            # a plain MatMul on a constant, with no per-step transpose.
            self.register_buffer(f"prefix_key_t_{i}", k.transpose(-1, -2).contiguous())
            self.register_buffer(f"prefix_value_{i}", v.contiguous())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        batch, length = input_ids.shape
        # A DynamicCache cannot be a graph input: build it here from plain tensors.
        layers = [PrefixedLayer(self.num_virtual, past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache()
        cache.layers = layers
        full_mask = torch.cat([attention_mask.new_ones((batch, self.num_virtual)), attention_mask], dim=1)
        positions = real_positions(attention_mask, self.num_virtual)[:, -length:]
        # The prefix goes to every attention call as a keyword (transformers passes extra keywords down).
        prefix = [(getattr(self, f"prefix_key_t_{i}"), getattr(self, f"prefix_value_{i}"))
                  for i in range(self.num_layers)] if self.num_virtual else None
        out = self.base(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                        use_cache=True, qprompt_prefix=prefix, **cache_kwargs(self.base, cache))
        presents = []
        for layer in layers:  # the real tokens' cache: past + this step, without the constant prefix
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


class TaskTableDecoder(torch.nn.Module):
    """The base decoder with one constant KV prefix per task, in a table of `slots` slots per task: each row of a
    batch reads its own task's prefix (`task_ids`, one per row), so one graph serves every task at once.

    A prefix shorter than `slots` is padded with masked slots. The tables are traced as inputs and then
    pinned into the graph as constants under their own names (`pin_tables`), so adding or removing a task
    changes only the tables' first dimension (`add_task`, `remove_task`): every other task runs the very
    same computation, and its outputs stay bit-identical."""

    def __init__(self, base, slots: int):
        super().__init__()
        self.base = base
        self.num_layers = base.config.num_hidden_layers
        self.num_virtual = slots

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor,
                *rest: torch.Tensor):
        from transformers import DynamicCache

        past, tables = rest[: 2 * self.num_layers], dict(zip(table_names(self.num_layers), rest[2 * self.num_layers :]))
        batch, length = input_ids.shape
        layers = [PrefixedLayer(self.num_virtual, past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache()
        cache.layers = layers
        full_mask = torch.cat([attention_mask.new_ones((batch, self.num_virtual)), attention_mask], dim=1)
        # Each row's real tokens start after its own task's virtual tokens.
        positions = real_positions(attention_mask, tables["task_virtual_tokens"][task_ids][:, None])[:, -length:]
        slot_mask = tables["task_slot_mask"][task_ids]  # (B, slots): False on a shorter prompt's padding slots
        prefix = [(tables[f"task_prefix_key_t_{i}"][task_ids], tables[f"task_prefix_value_{i}"][task_ids], slot_mask)
                  for i in range(self.num_layers)]
        out = self.base(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                        use_cache=True, qprompt_prefix=prefix, **cache_kwargs(self.base, cache))
        presents = []
        for layer in layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def table_names(num_layers: int) -> list[str]:
    return [*(f"task_prefix_{kind}_{i}" for i in range(num_layers) for kind in ("key_t", "value")),
            "task_slot_mask", "task_virtual_tokens"]


def prefix_tables(prefixes: list[list[tuple]], slots: int, num_layers: int, shape: tuple[int, int]) -> dict:
    """The constant tables of a task graph, as numpy arrays named like the graph's initializers: per layer, keys
    (tasks, kv_heads, head_dim, slots) stored transposed and values (tasks, kv_heads, slots, head_dim), padded
    with zeros; the slot mask (tasks, slots) and each task's virtual-token count (tasks,)."""
    heads, head_dim = shape
    tables = {}
    for i in range(num_layers):
        tables[f"task_prefix_key_t_{i}"] = np.zeros((len(prefixes), heads, head_dim, slots), dtype=np.float32)
        tables[f"task_prefix_value_{i}"] = np.zeros((len(prefixes), heads, slots, head_dim), dtype=np.float32)
    tables["task_slot_mask"] = np.zeros((len(prefixes), slots), dtype=bool)
    tables["task_virtual_tokens"] = np.zeros(len(prefixes), dtype=np.int64)
    for t, prefix in enumerate(prefixes):
        n = prefix[0][0].shape[2] if prefix else 0
        tables["task_slot_mask"][t, :n] = True
        tables["task_virtual_tokens"][t] = n
        for i, (k, v) in enumerate(prefix):
            tables[f"task_prefix_key_t_{i}"][t, :, :, :n] = k[0].transpose(-1, -2).float().numpy()
            tables[f"task_prefix_value_{i}"][t, :, :n] = v[0].float().numpy()
    return tables


def set_tables(path: Path, tables: dict[str, np.ndarray]) -> None:
    """Write `tables` into the graph at `path` as constants under their names: in place of the inputs they were
    traced as (after export), or of the constants they replace (a task added or removed)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept_inputs = [i for i in graph.input if i.name not in tables]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    kept = [t for t in graph.initializer if t.name not in tables]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(value, name) for name, value in tables.items()])
    external = path.with_name(path.name + ".data").exists()
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)


def read_tables(path: Path, num_layers: int) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    wanted = set(table_names(num_layers))
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}


class PrefixedLayer(DynamicLayer):
    """One layer's cache in the exported graph: the real tokens' keys/values, behind `virtual` constant ones.

    The prefix is never joined to the cache (attention reads it on its own), so presents need no
    slicing; it only counts in the length, so masks cover prefix + real tokens."""

    def __init__(self, virtual: int, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.virtual = virtual
        self.keys, self.values = keys, values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.virtual


@torch.no_grad()
def constant_prefix(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values of the virtual tokens: one forward pass over the soft prompt alone."""
    if not virtual_tokens(model):
        return []
    if is_prefix(model):  # prefix tuning learned these keys/values directly
        cache = soft_prompt(model, 1)
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    base = model.get_base_model()
    prompts = soft_prompt(model, 1).to(base.dtype)
    out = base.get_decoder()(inputs_embeds=prompts, use_cache=True)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache_of(out).layers]


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, qprompt_prefix=None,
                      **kwargs):
    """Export-time attention, written out: GQA read in place, and the constant prefix read apart from the cache.

    transformers' export path copies every key/value head `groups` times per step (repeat_kv), a copy
    that grows with the prefix; folding the query heads of a group into the sequence axis lets each
    key/value head serve its group directly. With a prefix (`qprompt_prefix`: one (transposed key,
    value) pair per layer, batch 1), the scores against it and against the real tokens come from two matmuls that
    broadcast over the batch and share one softmax, so no step expands or concatenates the prefix's
    keys/values. The bare base (no prefix) is exported through the same code, so the two graphs
    differ only by the prefix (measured: docs/benchmarks.md).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
        if qprompt_prefix is not None:
            raise QPromptError(f"{type(module).__name__} needs an attention variant the prompt export does not "
                               "support (softcap, sinks or dropout)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # Query head h = kv_head * groups + j; scaling q (a step's few rows) is cheaper than scaling the scores.
    q = query.reshape(batch, kv_heads, groups * length, dim) * (scaling if scaling is not None else dim**-0.5)
    prefix = qprompt_prefix[module.layer_idx] if qprompt_prefix is not None else None
    virtual = prefix[1].shape[-2] if prefix is not None else 0  # prefix slots (a task table pads some)
    # Boolean mask (B, 1, L, V + T) -> (B, 1, groups * L, T): the prefix is always attended, so only real keys
    # are masked; the same mask serves every head of a group.
    mask = attention_mask[..., virtual:]
    mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * length, -1)
    # A large negative rather than -inf: a padded query row that sees no key stays finite (it is ignored).
    scores = (q @ key.transpose(-1, -2)).masked_fill(~mask, torch.finfo(q.dtype).min)
    if prefix is None:
        out = torch.softmax(scores, dim=-1) @ value
    else:
        prefix_key_t, prefix_value = prefix[:2]
        prefix_scores = q @ prefix_key_t
        if len(prefix) == 3:  # a task table: each row's padding slots (B, slots) are never attended
            prefix_scores = prefix_scores.masked_fill(~prefix[2][:, None, None, :], torch.finfo(q.dtype).min)
        weights = torch.softmax(torch.cat([prefix_scores, scores], dim=-1), dim=-1)
        on_prefix, on_real = weights.split([virtual, weights.shape[-1] - virtual], dim=-1)  # one node, not two
        out = on_prefix @ prefix_value + on_real @ value
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def export_graph(module: MergedPromptDecoder, path: Path, opset: int) -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = module.base.config
    AttentionInterface.register("qprompt_grouped", grouped_attention)
    # Always a boolean mask (never None): grouped_attention has no is_causal shortcut to fall back on.
    AttentionMaskInterface.register("qprompt_grouped", partial(sdpa_mask, allow_is_causal_skip=False))
    previous = config._attn_implementation
    config._attn_implementation = "qprompt_grouped"  # export only: parity then checks it against the usual path
    try:
        _export_graph(module, path, opset)
    finally:
        config._attn_implementation = previous


def _export_graph(module: MergedPromptDecoder, path: Path, opset: int) -> None:
    config = module.base.config
    heads, head_dim = kv_shape(config)
    names = [f"past_key_values.{i}.{kind}" for i in range(module.num_layers) for kind in ("key", "value")]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.ones((2, 5), dtype=torch.long)
    past = tuple(torch.zeros((2, heads, 2, head_dim)) for _ in names)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total"))
    inputs, input_names = (ids, mask), ["input_ids", "attention_mask"]
    dynamic: list = [{0: batch, 1: seq}, {0: batch, 1: total}]
    tables: tuple = ()
    if isinstance(module, TaskTableDecoder):  # one task id per row; the tables traced as inputs, then pinned
        inputs, input_names = (*inputs, torch.zeros(2, dtype=torch.long)), [*input_names, "task_ids"]
        dynamic.append({0: batch})
        example = prefix_tables([[], []], module.num_virtual, module.num_layers, (heads, head_dim))
        tables = tuple(torch.from_numpy(example[n]) for n in table_names(module.num_layers))
        tasks = torch.export.Dim("tasks")  # the number of tasks is the tables' only free size
    # The trailing *past (and tables) are one varargs argument: one tuple of specs.
    dynamic.append(tuple({0: batch, 2: past_len} for _ in names) + tuple({0: tasks} for _ in tables))
    program = torch.onnx.export(
        module, (*inputs, *past, *tables), dynamo=True, opset_version=opset, dynamic_shapes=tuple(dynamic),
        input_names=[*input_names, *names, *table_names(module.num_layers)[: len(tables)]],
        output_names=["logits", *[n.replace("past_key_values", "present") for n in names]],
        verbose=False,
    )
    program.save(str(path))


def quantize_graph(source: Path, target: Path, kind: str) -> None:
    """Write `source` quantized as `kind` (see QUANTIZATIONS) to `target`."""
    import onnx

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's quantizers log generic advice on the root logger
    try:
        _quantize(onnx, source, target, kind)
    finally:
        root.setLevel(level)


def _quantize(onnx, source: Path, target: Path, kind: str) -> None:
    model = onnx.load(str(source))
    if kind == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Unsigned weights (U8U8): with signed weights, AVX2 CPUs without VNNI saturate in the int8 dot
        # product; on SmolLM2 that took next-token agreement with fp32 from 96% to 0%.
        # The prefix's keys/values (4-D constants read by attention) stay float: they are activations, not weights.
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        prefix_reads = [n.name for n in model.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1], 2) != 2]
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8, per_channel=True,
                         nodes_to_exclude=prefix_reads)
        return
    if kind in ("int8", "int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # Weight-only: activations stay float, which is what keeps int8 within a point of fp32 (the
        # dynamic form, which quantizes activations too, agreed with fp32 on 92.9% of SmolLM2's labels).
        quantizer = MatMulNBitsQuantizer(model, bits=int(kind[-1]), block_size=32, is_symmetric=True)
    elif kind in BNB4:
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        # bitsandbytes leaves the LM head unquantized; so do we. Blocks of 64 along the input dimension are
        # bitsandbytes' blocks too, so re-quantizing its dequantized weights gives back the same codes.
        head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
        quant_type = MatMulBnb4Quantizer.NF4 if kind == "nf4" else MatMulBnb4Quantizer.FP4
        quantizer = MatMulBnb4Quantizer(model, quant_type, 64, nodes_to_exclude=head)
    else:
        raise QPromptError(f"unknown quantization {kind!r}: use one of {', '.join(QUANTIZATIONS)}")
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


def _file_mb(folder: Path, name: str) -> float:
    files = [folder / name] + [p for p in folder.glob(name + ".data")]
    return round(sum(p.stat().st_size for p in files if p.exists()) / 1e6, 2)


@torch.no_grad()
def parity(model, exported: ExportedModel, prompts: list[list[int]], new_tokens: int, task: str | None = None) -> dict:
    """Compare the graph with the PyTorch PEFT model: logits on each prompt (PEFT's forward), and greedy tokens."""
    max_diff, max_logit = 0.0, 0.0
    greedy_equal = True
    onnx_tokens = exported.generate_ids(prompts, Sampling(max_new_tokens=new_tokens), task)
    task_ids = exported.task_ids(task, 1)
    for ids, onnx_new in zip(prompts, onnx_tokens):
        x = torch.tensor([ids])
        # A multitask prompt exports its first task's prompt (soft_prompt's default): PEFT must be asked for it.
        first_task = {"task_ids": torch.zeros(1, dtype=torch.long)} if is_multitask(model) else {}
        ref = model(input_ids=x, attention_mask=torch.ones_like(x), **first_task).logits
        if not is_prefix(model):  # PEFT returns logits for the virtual tokens too
            ref = ref[:, virtual_tokens(model):]
        logits, _ = exported.forward(x.numpy(), np.ones_like(x.numpy()), exported.empty_past(1), task_ids)
        max_diff = max(max_diff, float(np.abs(logits - ref.float().numpy()).max()))
        max_logit = max(max_logit, float(ref.abs().max()))
        # Not PEFT's `generate`: PEFT 0.21 looks for the cache under `past_key_values`, which transformers 5.24
        # renamed to `cache`, so its generate drops prefix tuning's prefix and re-inserts a prompt-tuning prompt
        # at every step. greedy_generate is the decoding qprompt's evaluation uses, and tests/test_methods.py
        # holds it to greedy decoding by PEFT's forward without a cache. One row, so pad_id never shows.
        eos = set(exported.eos_ids)
        torch_new = greedy_generate(model, x, torch.ones_like(x), new_tokens, sorted(eos), pad_id=0)[0]
        torch_new = torch_new[: next((i for i, t in enumerate(torch_new) if t in eos), len(torch_new))]
        greedy_equal &= torch_new == onnx_new
    tolerance = max(PARITY_ABS, PARITY_REL * max_logit)
    return {"max_abs_logit_diff": max_diff, "max_abs_logit": max_logit, "tolerance": tolerance,
            "greedy_tokens_equal": bool(greedy_equal), "prompts": len(prompts), "new_tokens": new_tokens}


def agreement(reference: ExportedModel, candidate: ExportedModel, prompts: list[tuple[str, list[int]]]) -> dict:
    """How close a quantized graph stays to the fp32 one: next-token logits and top-1 agreement."""
    diffs, same = [], 0
    for task, ids in prompts:
        x = np.array([ids], dtype=np.int64)
        task_ids = reference.task_ids(task, 1)
        a, _ = reference.forward(x, np.ones_like(x), reference.empty_past(1), task_ids)
        b, _ = candidate.forward(x, np.ones_like(x), candidate.empty_past(1), task_ids)
        diffs.append(float(np.abs(a[0, -1] - b[0, -1]).max()))
        same += int(a[0, -1].argmax() == b[0, -1].argmax())
    return {"max_abs_next_token_logit_diff": max(diffs), "next_token_top1_agreement": same / len(prompts)}


@dataclass
class TaskSource:
    """One task's soft prompt, loaded for export: its PEFT model (the parity reference) and constant prefix."""

    name: str
    model: Any
    tokenizer: Any
    recipe: Any
    artifact: dict  # the artifact's qprompt.json (or a stand-in for the bare base)
    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    base: Any  # the float32 base the prefix was computed on (bitsandbytes layers dequantized)

    def entry(self) -> TaskEntry:
        recipe = self.recipe
        template = (template_of(recipe, self.tokenizer) if recipe else Template("{text}"))
        labels = ({lab: template.target_text(word) for lab, word in recipe.labels.items()}
                  if recipe and recipe.task == "classification" else {})
        a = self.artifact
        return TaskEntry(self.name, recipe.task if recipe else "generation", template,
                         recipe.data.label_field if recipe else "label", labels, a["virtual_tokens"],
                         {"artifact": a.get("folder"), "base": portable_base(a["base"]), "method": a["method"],
                          "virtual_tokens": a["virtual_tokens"]})


def load_task(artifact: str | Path | None, weights: str, name: str | None = None, base_model: str | None = None,
              recipe=None) -> TaskSource:
    """An artifact (or, with `base_model`, a bare base: no soft prompt), ready to export on float32 weights."""
    if base_model is None:
        model, tokenizer, recipe, manifest = load_artifact(artifact, quant=weights, compute_dtype="float32",
                                                           device="cpu")
        manifest = {**manifest, "folder": Path(artifact).resolve().name}
    else:
        from .models import load_model

        model, tokenizer, info = load_model(base_model, weights, "float32", "cpu")
        manifest = {"base": info.to_dict(), "method": "none", "virtual_tokens": 0, "folder": None}
    model.eval()
    base = model.get_base_model() if virtual_tokens(model) else model
    if weights != "none":
        base.dequantize()  # swaps each Linear4bit for a float32 Linear holding the same values
    name = name or (Path(artifact).resolve().name if artifact else "base")
    return TaskSource(name, model, tokenizer, recipe, manifest, constant_prefix(model), base)


def export(artifact: str | Path | list | None, output: str | Path, quantize: str = "none", opset: int = 20,
           overwrite: bool = False, parity_tokens: int = 8, base_model: str | None = None, recipe=None,
           names: list[str] | None = None, multi_task: bool = False, prefix_slots: int | None = None) -> dict:
    """Write an export folder from `artifact` (or, with `base_model`, from a bare base: no soft prompt).

    Several artifacts (a list) trained on the same base make one graph of several tasks, named by `names`
    (default: the artifact folders' names); so does one with `multi_task`, ready for `add_task`. Such a graph
    holds `prefix_slots` prefix slots per task (default: the longest prompt's virtual tokens)."""
    output = Path(output)
    artifacts = [artifact] if isinstance(artifact, (str, Path)) or artifact is None else list(artifact)
    if quantize not in QUANTIZATIONS:
        raise QPromptError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    if names is not None and len(names) != len(artifacts):
        raise QPromptError(f"{len(names)} task names for {len(artifacts)} artifacts: give one name per artifact")
    for art in artifacts:
        check_export_output(output, art, overwrite)
    start = time.perf_counter()
    # bitsandbytes layers cannot be exported: export from float32 weights, either the full-precision base
    # or, for nf4/fp4, the bitsandbytes-quantized base dequantized (the exact weights it computes with).
    weights = quantize if quantize in BNB4 else "none"
    sources = [load_task(art, weights, names[i] if names else None, base_model, recipe)
               for i, art in enumerate(artifacts)]
    check_same_base(sources)
    first = sources[0]
    tables = multi_task or len(sources) > 1
    if tables:
        slots = prefix_slots or max(s.artifact["virtual_tokens"] for s in sources)
        check_slots(sources, slots)
        module = TaskTableDecoder(first.base, slots).eval()
    else:
        module = MergedPromptDecoder(first.base, first.prefix).eval()

    output.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, uniquely named folder beside the output (nothing of the user's shares its name), made with
    # mkdir so it gets the usual permissions, not mkdtemp's owner-only ones: the folder is meant to be shipped.
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        fp32 = tmp / "model.onnx"
        log.info("exporting %s to ONNX (opset %d)", first.artifact["base"]["name"], opset)
        try:
            export_graph(module, fp32, opset)
        except Exception as exc:  # torch.export raises many kinds; the user needs the first line
            raise QPromptError(f"ONNX export failed ({str(exc).splitlines()[0][:200]}); try another --opset") from exc
        if tables:
            shape = kv_shape(first.base.config)
            set_tables(fp32, prefix_tables([s.prefix for s in sources], slots, module.num_layers, shape))
        first.tokenizer.save_pretrained(tmp)
        config, tok = first.base.config, first.tokenizer
        heads, head_dim = kv_shape(config)
        data = ExportManifest(
            model_file="model.onnx", num_layers=module.num_layers, num_kv_heads=heads, head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_positions=getattr(config, "max_position_embeddings", 2048) - module.num_virtual,
            pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id] if tok.eos_token_id is not None else [],
            bos_token_id=tok.bos_token_id, opset=opset, quantization="none", tasks=[s.entry() for s in sources],
            task_ids_input=tables, prefix_slots=module.num_virtual, base=portable_base(first.artifact["base"]),
            fp32_weights="dequantized " + weights if weights != "none" else "full precision",
            qprompt_version=__version__)
        data.write(tmp)

        # Parity on real inputs: each artifact's stored validation rows, else a fixed sentence.
        fp32_runtime = ExportedModel(tmp, providers=["CPUExecutionProvider"])
        checked = []
        for source, task in zip(sources, data.tasks):
            samples = source.artifact.get("samples") or []
            prompts = ([fp32_runtime.prompt_ids(row, task=task.name) for row in samples] if samples
                       else [fp32_runtime.encode("The film opens on a quiet street, and then")])
            task.parity = report = parity(source.model, fp32_runtime, prompts, parity_tokens, task.name)
            checked += [(task.name, p) for p in prompts]
            if report["max_abs_logit_diff"] > report["tolerance"] or not report["greedy_tokens_equal"]:
                raise QPromptError(
                    f"the exported graph does not match PyTorch for {task.name} (max logit difference "
                    f"{report['max_abs_logit_diff']:.2e} > {report['tolerance']:.1e}, greedy tokens equal: "
                    f"{report['greedy_tokens_equal']}); nothing was written to {output}; try another --opset and "
                    "report the model")
        data.files["model.onnx"] = {"quantization": "none", "mb": _file_mb(tmp, "model.onnx")}

        if quantize != "none":
            name = f"model.{quantize}.onnx"
            log.info("quantizing to %s", quantize)
            quantize_graph(fp32, tmp / name, quantize)
            quantized = ExportedModel(tmp, name, providers=["CPUExecutionProvider"])
            data.files[name] = {"quantization": quantize, "mb": _file_mb(tmp, name),
                                **agreement(fp32_runtime, quantized, checked)}
            data.model_file, data.quantization = name, quantize
        data.seconds = round(time.perf_counter() - start, 1)
        if not tables:  # onnxruntime-genai runs the folder as it is (qprompt/genai.py); it cannot feed task_ids
            write_json(tmp / GENAI_CONFIG, genai_config(data, config.model_type, config.hidden_size,
                                                        config.num_attention_heads, tok.bos_token_id))
        data.write(tmp)
        install_export(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted export leaves nothing behind
        raise
    return data


def add_task(artifact: str | Path, folder: str | Path, name: str | None = None,
             parity_tokens: int = 8) -> ExportManifest:
    """Add an artifact's prompt to a task graph in `folder` as one more task, without re-exporting anything: only
    the prefix tables grow, so every earlier task's outputs stay bit-identical (checked before anything is
    replaced). The base must be the one the graph was made from."""
    folder = Path(folder)
    manifest = ExportManifest.read(folder)
    if not manifest.task_ids_input:
        raise QPromptError(f"{folder} is a single-task export (its graph has no task table): export it again with "
                           "--multi-task (and --prefix-slots N for room), then add tasks to it")
    weights = manifest.fp32_weights.removeprefix("dequantized ")  # nf4/fp4: the weights the graph was made from
    weights = "none" if weights == "full precision" else weights
    source = load_task(artifact, weights, name)
    if portable_base(source.artifact["base"]).get("fingerprint") != manifest.base.get("fingerprint") or \
            source.artifact["base"].get("quant") != manifest.base.get("quant"):
        raise QPromptError(f"{artifact} was trained on {source.artifact['base'].get('name')} "
                           f"({source.artifact['base'].get('quant')}), not on this export's base "
                           f"{manifest.base.get('name')} ({manifest.base.get('quant')}): export it on its own")
    if source.name in manifest.task_names:
        raise QPromptError(f"{folder} already has a task named {source.name!r}: pass --name for another name, or "
                           "--remove it first")
    check_slots([source], manifest.prefix_slots)
    shape = (manifest.num_kv_heads, manifest.head_dim)
    new_rows = prefix_tables([source.prefix], manifest.prefix_slots, manifest.num_layers, shape)
    entry = source.entry()

    def grow(tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.concatenate([tables[n], new_rows[n]]) for n in tables}

    return _rewrite_tables(folder, manifest, grow, [*manifest.tasks, entry],
                           check=lambda runtime: _check_new_task(source, entry, runtime, parity_tokens))


def remove_task(folder: str | Path, name: str) -> ExportManifest:
    """Remove task `name` from the task graph in `folder`; the others keep their outputs, bit for bit (their ids
    after it move down by one: route by name)."""
    folder = Path(folder)
    manifest = ExportManifest.read(folder)
    index = manifest.task_id(name)
    if not manifest.task_ids_input:
        raise QPromptError(f"{folder} is a single-task export: there is no task table to remove {name!r} from")
    if len(manifest.tasks) == 1:
        raise QPromptError(f"{name!r} is the last task of {folder}: a graph needs one; delete the folder instead")

    def shrink(tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.delete(tables[n], index, axis=0) for n in tables}

    return _rewrite_tables(folder, manifest, shrink, [t for t in manifest.tasks if t.name != name])


def _check_new_task(source: TaskSource, entry: TaskEntry, runtime: ExportedModel, parity_tokens: int) -> None:
    samples = source.artifact.get("samples") or []
    prompts = ([runtime.prompt_ids(row, task=entry.name) for row in samples] if samples
               else [runtime.encode("The film opens on a quiet street, and then")])
    entry.parity = report = parity(source.model, runtime, prompts, parity_tokens, entry.name)
    if report["max_abs_logit_diff"] > report["tolerance"] or not report["greedy_tokens_equal"]:
        raise QPromptError(f"the graph does not match PyTorch for {entry.name} (max logit difference "
                           f"{report['max_abs_logit_diff']:.2e}); nothing was changed")


def _rewrite_tables(folder: Path, manifest: ExportManifest, change, tasks: list[TaskEntry], check=None):
    """Copy the export beside itself with every graph's tables changed by `change`, check that every task kept
    from before gives bit-identical logits on a probe, run `check`, then put the copy in place."""
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for path in folder.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
        graphs = [name for name in manifest.files if (tmp / name).is_file()]
        for name in graphs:
            set_tables(tmp / name, change(read_tables(tmp / name, manifest.num_layers)))
        before = ExportedModel(folder, "model.onnx", providers=["CPUExecutionProvider"])
        manifest.tasks = tasks
        manifest.write(tmp)
        after = ExportedModel(tmp, "model.onnx", providers=["CPUExecutionProvider"])
        probe = after.encode("The film opens on a quiet street, and then")
        for task in before.tasks:
            if task not in after.tasks:
                continue
            x = np.array([probe], dtype=np.int64)
            a, _ = before.forward(x, np.ones_like(x), before.empty_past(1), before.task_ids(task, 1))
            b, _ = after.forward(x, np.ones_like(x), after.empty_past(1), after.task_ids(task, 1))
            if not np.array_equal(a, b):
                raise QPromptError(f"task {task!r} would change its outputs; nothing was changed (report this)")
        if check:
            check(after)
        manifest.write(tmp)  # with the new task's parity
        install_export(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def check_same_base(sources: list[TaskSource]) -> None:
    """One graph holds one base: every artifact must have been trained on the same one (and quantized alike)."""
    first = sources[0]
    for s in sources[1:]:
        a, b = first.artifact["base"], s.artifact["base"]
        if a.get("fingerprint") != b.get("fingerprint") or a.get("quant") != b.get("quant"):
            raise QPromptError(f"{s.name} was trained on {b.get('name')} ({b.get('quant')}) and {first.name} on "
                               f"{a.get('name')} ({a.get('quant')}); one graph holds one base: export them apart")
    seen = set()
    for s in sources:
        if s.name in seen:
            raise QPromptError(f"two tasks are named {s.name!r}: give each artifact its own --name")
        seen.add(s.name)


def check_slots(sources: list[TaskSource], slots: int) -> None:
    for s in sources:
        if s.artifact["virtual_tokens"] > slots:
            raise QPromptError(f"{s.name} has {s.artifact['virtual_tokens']} virtual tokens, more than the graph's "
                               f"{slots} prefix slots per task: export again with --prefix-slots "
                               f"{s.artifact['virtual_tokens']} or more")


def check_export_output(output: Path, artifact: str | Path | None, overwrite: bool) -> None:
    """Refuse an --output that holds more than an export (cwd, the artifact, a folder above either), or an
    earlier export without --overwrite; checked before any work is done."""
    out, cwd = output.resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise QPromptError(f"--output {output} is the current folder or one above it; export into a folder of its "
                           "own, e.g. --output export")
    if artifact is not None:
        art = Path(artifact).resolve()
        if out == art or out in art.parents:
            raise QPromptError(f"--output {output} is the artifact folder or one above it; export into a folder "
                               f"of its own, e.g. --output {art.name}-export")
    is_export = (output / EXPORT_MANIFEST).exists() or owned.has_record(output)
    if is_export and not overwrite:
        raise QPromptError(f"{output} already holds an export; pass --overwrite or choose another --output")
    if output.exists() and any(output.iterdir()) and not is_export:
        raise QPromptError(f"{output} exists and is not an export folder; choose an empty or new --output")


def portable_base(base: dict) -> dict:
    """The base model's identity without where it lay on this machine: a local folder is named, not located."""
    kept = {k: v for k, v in base.items() if k != "path"}
    name = str(kept.get("name", ""))
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        kept["name"] = Path(name).name
    return kept


def _earlier_export(output: Path, names: set[str]) -> set[str]:
    """The names an earlier export in `output` wrote: its record, or (written before records) its manifest's
    files plus the names this export writes that the old all-in-one export wrote too (not genai_config.json,
    which only exports with a record write: one in a folder without a record is the user's)."""
    if owned.has_record(output):
        return owned.owned(output)
    files = {EXPORT_MANIFEST, *(names - {GENAI_CONFIG})}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        old = json.loads((output / EXPORT_MANIFEST).read_text())
        files |= {f for name in old.get("files", {}) for f in (name, name + ".data")}
    return {f for f in files if "/" not in f}


def install_export(tmp: Path, output: Path) -> None:
    """Move the finished export from `tmp` into `output`, replacing only files an earlier export wrote."""
    names = {p.name for p in tmp.iterdir()}
    if not output.exists():
        owned.claim(tmp, *names)
        os.replace(tmp, output)  # one rename: the folder appears complete or not at all
        return
    mine = _earlier_export(output, names)
    owned.refuse_foreign(output, names, mine, "move it away or choose another --output")
    owned.claim(output, *names)
    owned.remove(output, mine - names - {owned.RECORD})  # e.g. an earlier export's other quantized graph
    for name in sorted(names - {EXPORT_MANIFEST}) + [EXPORT_MANIFEST]:  # the manifest last
        os.replace(tmp / name, output / name)
    tmp.rmdir()
