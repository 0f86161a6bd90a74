"""The fused edge graph: the base as onnxruntime-genai's model builder makes it, with the prompt put inside.

The builder writes what ONNX Runtime runs fastest: GroupQueryAttention (rotary inside), fused q/k/v,
SkipSimplifiedLayerNormalization, int4 weights computed with int8 activations (accuracy_level 4), the LM
head and a tied embedding quantized too, and a KV cache shared between past and present (one buffer
per layer, written in place). qprompt does not rebuild any of that: `build_base_graph` runs the builder
on the float weights the prompt was trained against, and `add_prefix` adds the prompt, which the
builder has no notion of.

How the prompt gets in. The virtual tokens' keys and values are constants (export/prefix.py). They live
in the KV cache itself, in its first P slots: on a request's first call (no past yet: the mask is as
wide as input_ids) each attention layer gets the prefix rows in front of the new tokens, and GQA writes
them into the cache with the real tokens after them; every later call finds them there and only adds P
to each row's length. So positions of real tokens start at P, as in training, a decode step costs what
the bare graph's does plus P more keys to read, and the cache stays the builder's shared buffer (no
copies per step). GQA rotates the keys it is given, so the prefix's keys are stored un-rotated (the
graph's own cos/sin tables, applied in reverse). A graph of several tasks holds one prefix per task
and a `task_ids` input; a row whose task has fewer virtual tokens than the table's slots gets its
prefix, then its tokens, then filler (the slots are gathered per row), so no slot is ever masked.

What this asks of a runtime: the cache is a buffer of capacity >= prefix + tokens, bound as both past
and present (onnxruntime-genai does this with `past_present_share_buffer`; so does qprompt's runtime),
and batches are right-padded. onnxruntime-genai sizes the buffer to `max_length`, so the virtual tokens
count toward it, as prompt tokens would: when the next step would not fit, the graph makes EOS the only
choice and generation ends (without this guard a `while not is_done()` loop would fail P tokens before
max_length).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError

log = logging.getLogger("qprompt")

GRAPH_FILE = "model.onnx"
# export --quantize -> the builder's precision; the other kinds are made from its fp32 graph (export/quantize.py).
BUILDER_PRECISION = {"none": "fp32", "int4": "int4", "int8": "int8", "int8-dynamic": "fp32", "nf4": "fp32",
                     "fp4": "fp32"}
# int4/int8 MatMulNBits compute: 4 quantizes activations to int8 per block (the builder's CPU default, and the
# fastest per decoded token: docs/benchmarks.md), 1 computes in float32 (exact to the dequantized weights).
DEFAULT_ACCURACY_LEVEL = 4
EOS_PENALTY = -1.0e4  # added to every logit but EOS's when the cache is full: finite, so fp16 graphs stay finite


TABLE = "qprompt.prefix"  # (tasks, slots, width): every task's prefix rows (prefix_rows)
TASK_TOKENS = "qprompt.virtual_tokens"  # (tasks,) int32: each task's virtual tokens (the rest of its slots is filler)


class BuilderUnavailable(ExportError):
    """The model builder cannot make this base's graph (its family, or a feature the prompt needs)."""


@dataclass(frozen=True)
class LayerAttention:
    """One GroupQueryAttention node of the builder's graph, and what the prefix must match."""

    index: int  # the layer (from its present.{i}.key output)
    node_name: str
    heads: int
    kv_heads: int
    head_dim: int
    packed: bool  # q, k and v arrive as one tensor (input 0), else as three
    interleaved: bool


def builder_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def build_base_graph(model_folder: Path, out: Path, precision: str, *, block_size: int = 32, symmetric: bool = True,
                     accuracy_level: int = DEFAULT_ACCURACY_LEVEL, target: str = "cpu",
                     extra_options: tuple[str, ...] = ()) -> None:
    """Run onnxruntime-genai's model builder on a float model folder: `out` gets model.onnx (+ .data) and
    genai_config.json. In a subprocess: the builder loads the model again, and its memory goes with it.
    `extra_options`: more of the builder's KEY=VALUE options (bench/edge.py tries other int4 schemes)."""
    if not builder_available():
        raise BuilderUnavailable("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    # windowed_kv_cache=false: sliding-window layers (Gemma-2/3, Mistral) keep a full-length buffer like the others
    # (their window still applies), so one buffer capacity serves every layer.
    options = [f"accuracy_level={accuracy_level}", f"block_size={block_size}", f"is_symmetric={str(symmetric).lower()}",
               "hf_remote=false", "hf_token=false", "windowed_kv_cache=false", *extra_options]
    with tempfile.TemporaryDirectory(prefix="qprompt-builder-") as cache:  # a fresh cache: never a stale tensor
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", model_folder.name, "-i",
               str(model_folder), "-o", str(out), "-p", precision, "-e", target, "-c", cache,
               "--extra_options", *options]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out / GRAPH_FILE).is_file():
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "not supported" in ln.lower()),
                      lines[-1] if lines else f"exit code {done.returncode}")
        raise BuilderUnavailable(f"onnxruntime-genai's model builder could not build it: {reason[:300]}")


def attention_layers(graph, num_layers: int, head_dim: int) -> list[LayerAttention]:
    """The GQA nodes of a builder graph, one per layer in layer order; BuilderUnavailable if the graph has another
    form than the one `add_prefix` knows (rotary inside GQA, q/k norms outside it, no position_ids input)."""
    from onnx import helper

    if any(i.name == "position_ids" for i in graph.input):
        raise BuilderUnavailable("its graph takes position_ids (rotary outside attention)")
    layers = {}
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not attrs.get("do_rotary", 0):
            raise BuilderUnavailable("its attention applies no rotary embedding inside GroupQueryAttention")
        if len(node.input) > 12 and any(node.input[12:]):
            raise BuilderUnavailable("its attention fuses q/k norms or KV-cache scales into GroupQueryAttention")
        present = node.output[1]
        index = int(present.split(".")[1]) if present.startswith("present.") else -1
        packed = not node.input[1]
        layers[index] = LayerAttention(index, node.name, attrs["num_heads"], attrs["kv_num_heads"], head_dim, packed,
                                       bool(attrs.get("rotary_interleaved", 0)))
    if sorted(layers) != list(range(num_layers)):
        raise BuilderUnavailable(f"its graph has GroupQueryAttention for layers {sorted(layers)[:4]}..., not one for "
                                 f"each of the {num_layers} layers")
    return [layers[i] for i in range(num_layers)]


def unrotate(keys: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Keys (kv_heads, P, head_dim) as the model cached them (rotated at positions 0..P-1), rotated back: GQA
    rotates what it is given with these same tables, which gives the cached keys again (to float rounding)."""
    virtual = keys.shape[1]
    half = cos.shape[1]
    c = cos[:virtual][None].astype(np.float64)
    s = sin[:virtual][None].astype(np.float64)
    k = keys.astype(np.float64).copy()
    if interleaved:
        x1, x2 = k[..., 0 : 2 * half : 2].copy(), k[..., 1 : 2 * half : 2].copy()
        k[..., 0 : 2 * half : 2], k[..., 1 : 2 * half : 2] = x1 * c + x2 * s, x2 * c - x1 * s
    else:
        x1, x2 = k[..., :half].copy(), k[..., half : 2 * half].copy()
        k[..., :half], k[..., half : 2 * half] = x1 * c + x2 * s, x2 * c - x1 * s
    return k.astype(np.float32)


def prefix_rows(prefix: list[tuple[np.ndarray, np.ndarray]], layers: list[LayerAttention], cos: np.ndarray,
                sin: np.ndarray, slots: int) -> np.ndarray:
    """One task's prefix as the rows GQA is given: (slots, sum over layers of 2 x kv_heads x head_dim), per layer
    the un-rotated keys then the values, heads side by side; zero rows pad a shorter prefix to `slots`."""
    parts = []
    for layer, (k, v) in zip(layers, prefix):
        virtual = k.shape[-2]
        keys = unrotate(np.asarray(k, dtype=np.float32).reshape(k.shape[-3:]), cos, sin, layer.interleaved)
        values = np.asarray(v, dtype=np.float32).reshape(v.shape[-3:])
        width = keys.shape[0] * keys.shape[2]
        rows = np.concatenate([keys.transpose(1, 0, 2).reshape(virtual, width),
                               values.transpose(1, 0, 2).reshape(virtual, width)], axis=1)
        parts.append(np.pad(rows, ((0, slots - virtual), (0, 0))))
    return np.concatenate(parts, axis=1)


def prompt_tables(prefixes: list[list[tuple[np.ndarray, np.ndarray]]], layers: list[LayerAttention],
                  cos: np.ndarray, sin: np.ndarray, slots: int) -> dict[str, np.ndarray]:
    """The constants add_prefix reads: every task's prefix rows (tasks, slots, width) and virtual tokens (tasks,)."""
    return {TABLE: np.stack([prefix_rows(p, layers, cos, sin, slots) for p in prefixes]),
            TASK_TOKENS: np.array([p[0][0].shape[-2] for p in prefixes], dtype=np.int32)}


class _Graph:
    """A small builder for the nodes add_prefix inserts (plain onnx protos)."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        from onnx import helper

        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"/qprompt/{outputs[0]}", **attrs))
        return output


def add_prefix(path: Path, tables: dict[str, np.ndarray], head_dim: int, num_layers: int, eos_id: int | None,
               task_ids: bool) -> None:
    """Rewrite the builder's graph at `path` in place so that it carries the prompt(s) in `tables` (TABLE,
    TASK_TOKENS; see `prompt_tables`). `task_ids`: a graph of several tasks, with a task_ids input (B,)."""
    import onnx
    from onnx import TensorProto as T

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    layers = attention_layers(graph, num_layers, head_dim)
    nodes = {n.name: n for n in graph.node}
    gqa = [nodes[layer.node_name] for layer in layers]
    seqlens, total = gqa[0].input[5], gqa[0].input[6]
    if any(n.input[5] != seqlens or n.input[6] != total for n in gqa):
        raise BuilderUnavailable("its attention layers do not share one sequence-length input")
    slots = int(tables[TABLE].shape[1])
    widths = [2 * layer.kv_heads * layer.head_dim for layer in layers]
    g = _Graph()
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    # First call of a request <=> no past: the mask is exactly as wide as input_ids.
    g.op("Shape", ["input_ids"], "q.ids_shape")
    g.op("Shape", ["attention_mask"], "q.mask_shape")
    g.op("Gather", ["q.ids_shape", g.const("q.i1", i64(1))], "q.new_tokens")
    g.op("Gather", ["q.mask_shape", "q.i1"], "q.mask_width")
    g.op("Slice", ["q.ids_shape", g.const("q.i0", i64(0)), "q.i1"], "q.batch")
    g.op("Cast", [g.op("Equal", ["q.mask_width", "q.new_tokens"], "q.first_bool")], "q.first", to=T.INT64)
    g.op("Mul", ["q.first", g.const("q.slots", i64(slots))], "q.prefix_rows")  # (1,): slots, or 0 after the first
    # Each row's own virtual tokens count in its length; the table's slots in the total.
    row_tokens = (g.op("Gather", [g.const(TASK_TOKENS, tables[TASK_TOKENS]), "task_ids"], "q.row_tokens")
                  if task_ids else g.const("q.row_tokens", np.int32(tables[TASK_TOKENS][0])))
    g.op("Add", [seqlens, row_tokens], "q.seqlens_k")
    g.op("Add", [total, g.const("q.slots32", np.int32(slots))], "q.total_sequence_length")
    # The rows to put in front (first call only): the task's prefix, zero query rows padded in per layer.
    table = g.const(TABLE, tables[TABLE])
    if task_ids:
        g.op("Slice", [g.op("Gather", [table, "task_ids"], "q.task_rows"), "q.i0", "q.prefix_rows", "q.i1"],
             "q.rows")
    else:
        g.op("Slice", [table, "q.i0", "q.prefix_rows", "q.i1"], "q.rows_1")
        g.op("Expand", ["q.rows_1", g.op("Concat", ["q.batch", "q.prefix_rows", g.const("q.width", i64(sum(widths)))],
                                           "q.rows_shape", axis=0)], "q.rows")
    g.op("Split", ["q.rows", g.const("q.widths", np.array(widths, dtype=np.int64))],
         [f"q.kv{i}" for i in range(num_layers)], axis=2)
    if task_ids:  # per row: prefix (its own length), tokens, filler; and back to the tokens after attention
        _row_order(g)
    for layer, node in zip(layers, gqa):
        _prefix_layer(g, layer, node, task_ids)
        node.input[5], node.input[6] = "q.seqlens_k", "q.total_sequence_length"
    if eos_id is not None:
        _eos_guard(g, graph, slots, eos_id)
    if task_ids:
        from onnx import helper

        graph.input.append(helper.make_tensor_value_info("task_ids", T.INT64, ["batch_size"]))
    _insert(graph, g)
    onnx.save(model, str(path))


def read_prompt_tables(path: Path) -> dict[str, np.ndarray]:
    """The prompt tables of a fused graph: the prefix table and each task's virtual-token count."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.name in (TABLE, TASK_TOKENS, "q.row_tokens")}
    single = found.pop("q.row_tokens", None)  # a single-task graph holds its one count as a scalar constant
    if TASK_TOKENS not in found and single is not None:
        found[TASK_TOKENS] = np.array([int(single)], dtype=np.int32)
    return found


def write_prompt_tables(path: Path, tables: dict[str, np.ndarray]) -> None:
    """Replace the prompt tables of a fused graph (a task added or removed); nothing else in the file changes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    kept = [t for t in model.graph.initializer if t.name not in tables]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [numpy_helper.from_array(v, k) for k, v in tables.items()])
    onnx.save(model, str(path))


def _row_order(g: _Graph) -> None:
    """Index tensors for a graph of several tasks. Row b's first-call input is [its task's `n_b` prefix rows, its
    S tokens, filler]; the concatenation holds [all `slots` table rows, S tokens], so position j of the input
    takes row j below n_b, else slot-row `slots + (j - n_b)` (clamped: filler repeats the last token)."""
    from onnx import TensorProto as T

    g.op("Mul", [g.op("Cast", ["q.row_tokens"], "q.row_tokens64", to=T.INT64), "q.first"], "q.n")  # (B,)
    g.op("Add", ["q.prefix_rows", "q.new_tokens"], "q.in_len")  # (1,)
    g.op("Range", [g.const("q.s0", np.int64(0)), g.op("Squeeze", ["q.in_len", "q.i0"], "q.in_len_s"),
                   g.const("q.s1", np.int64(1))], "q.j")  # (L,)
    g.op("Unsqueeze", ["q.n", "q.i1"], "q.n_col")  # (B, 1)
    g.op("Add", [g.op("Sub", ["q.j", "q.n_col"], "q.j_minus_n"), "q.prefix_rows"], "q.token_src")
    g.op("Min", ["q.token_src", g.op("Sub", ["q.in_len", "q.i1"], "q.last")], "q.token_src_c")
    g.op("Where", [g.op("Less", ["q.j", "q.n_col"], "q.is_prefix"), "q.j", "q.token_src_c"], "q.src")  # (B, L)
    g.op("Unsqueeze", ["q.src", g.const("q.i2", np.array([2], dtype=np.int64))], "q.src_idx")
    g.op("Range", ["q.s0", g.op("Squeeze", ["q.new_tokens", "q.i0"], "q.new_s"), "q.s1"], "q.t")  # (S,)
    g.op("Unsqueeze", [g.op("Add", ["q.t", "q.n_col"], "q.dst"), "q.i2"], "q.dst_idx")  # (B, S, 1)


def _prefix_layer(g: _Graph, layer: LayerAttention, node, task_ids: bool) -> None:
    i = layer.index
    q_width = layer.heads * layer.head_dim
    zeros_q = g.const(f"q.pad{i}", np.array([0, 0, q_width, 0, 0, 0], dtype=np.int64))
    rows = g.op("Pad", [f"q.kv{i}", zeros_q], f"q.pre{i}")  # (B, P', q + k + v): zero query rows
    if layer.packed:
        node.input[0] = g.op("Concat", [rows, node.input[0]], f"q.qkv{i}", axis=1)
        if task_ids:
            node.input[0] = g.op("GatherND", [f"q.qkv{i}", "q.src_idx"], f"q.qkv{i}_rows", batch_dims=1)
    else:
        kv = layer.kv_heads * layer.head_dim
        parts = g.op("Split", [rows, g.const(f"q.qkv_widths{i}", np.array([q_width, kv, kv], dtype=np.int64))],
                     [f"q.pre{i}_q", f"q.pre{i}_k", f"q.pre{i}_v"], axis=2)
        for slot, part in zip((0, 1, 2), parts):
            joined = g.op("Concat", [part, node.input[slot]], f"{part}_in", axis=1)
            node.input[slot] = (g.op("GatherND", [joined, "q.src_idx"], f"{part}_rows", batch_dims=1) if task_ids
                                else joined)
    out = node.output[0]
    node.output[0] = f"q.attn{i}"
    if task_ids:
        g.op("GatherND", [f"q.attn{i}", "q.dst_idx"], out, batch_dims=1)
    else:
        g.op("Slice", [f"q.attn{i}", "q.prefix_rows", g.const(f"q.end{i}", np.array([2**62], dtype=np.int64)),
                       "q.i1"], out)


def _eos_guard(g: _Graph, graph, slots: int, eos_id: int) -> None:
    """When the next call would not fit the cache buffer (prefix + tokens > its capacity), and the runtime would
    still make one, every token but EOS gets EOS_PENALTY: generation ends instead of failing."""
    from onnx import TensorProto as T

    head = next(n for n in graph.node if "logits" in n.output)
    vocab = next(int(a.i) for a in head.attribute if a.name == "N") if head.op_type == "MatMulNBits" else None
    if vocab is None:
        out = next(o for o in graph.output if o.name == "logits")
        vocab = out.type.tensor_type.shape.dim[-1].dim_value
    past = next(i.name for i in graph.input if i.name.startswith("past_key_values."))
    g.op("Gather", [g.op("Shape", [past], "q.past_shape"), g.const("q.i2s", np.int64(2))], "q.capacity")
    g.op("Add", ["q.mask_width", g.const("q.one", np.int64(1))], "q.next_width")
    full = g.op("Greater", [g.op("Add", ["q.next_width", g.const("q.slots_s", np.int64(slots))], "q.need"),
                            "q.capacity"], "q.full")
    going = g.op("Less", ["q.next_width", "q.capacity"], "q.going")  # the runtime stops by itself at capacity
    limit = g.op("Cast", [g.op("And", [full, going], "q.limit_bool")], "q.limit", to=T.FLOAT)
    penalty = np.full((vocab,), EOS_PENALTY, dtype=np.float32)
    penalty[eos_id] = 0.0
    bias = g.op("Mul", [limit, g.const("q.eos_penalty", penalty)], "q.eos_bias")
    logits_type = next(o for o in graph.output if o.name == "logits").type.tensor_type.elem_type
    if logits_type != T.FLOAT:  # an fp16/bf16 graph (CUDA target)
        bias = g.op("Cast", [bias], "q.eos_bias_cast", to=logits_type)
    if head.op_type == "MatMulNBits":  # the bias input: added inside the LM head's kernel, no extra pass
        while len(head.input) < 5:
            head.input.append("")
        head.input.append(bias)
    else:
        raw = "q.logits_raw"
        head.output[list(head.output).index("logits")] = raw
        g.op("Add", [raw, bias], "logits")


def _insert(graph, g: _Graph) -> None:
    """Add g's nodes and constants to `graph`, every node after what it reads."""
    graph.initializer.extend(g.inits)
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node) + g.nodes, []
    while pending:
        rest = [n for n in pending if not all(i in known for i in n.input)]
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            missing = sorted({i for n in rest for i in n.input if i not in known})[:3]
            raise ExportError(f"the prompt could not be put into the graph (unresolved inputs {missing}); report this")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def rotary_tables(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin tables the graph's attention rotates with."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    inits = {t.name: t for t in model.graph.initializer}
    return tuple(numpy_helper.to_array(inits[name], str(path.parent)) for name in node.input[7:9])


def load_proto(path: Path):
    """The graph at `path` without its external weights (they stay where they are)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def move_graph(source: Path, target: Path) -> None:
    """Move a graph file and its external data file, naming the data after the new file (`target`.data)."""
    import onnx

    model = load_proto(source)
    data = target.with_name(target.name + ".data")
    moved = False
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                old = source.parent / entry.value
                if not moved:
                    shutil.move(old, data)
                    moved = True
                entry.value = data.name
    onnx.save(model, str(target))
    source.unlink()


def float_compute_twin(path: Path) -> Path:
    """A copy of the int4/int8 graph at `path` whose MatMulNBits compute in float32 (accuracy level 1), reading the
    same weight file: equal to the PyTorch model on the same weights up to float rounding."""
    import onnx

    model = load_proto(path)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1
    twin = path.with_name(f".{path.stem}.float-compute.onnx")
    onnx.save(model, str(twin))
    return twin
