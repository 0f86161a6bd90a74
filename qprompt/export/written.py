"""The written-out graph: the base traced by torch's ONNX exporter, attention written node by node.

For a base whose family onnxruntime-genai's model builder does not know (GPT-2, OPT, GPT-NeoX, Falcon,
StableLM, OLMo-2, ...), or when asked for (`--graph written`). The soft prompt is a constant KV prefix.
Where the model hands its attention calls the keywords it is given (transformers' attention interface),
attention reads the prefix beside the cache (`grouped_attention`), never joined to it; a model whose
layers drop them, or that computes attention itself (StableLM, Falcon), gets the prefix joined in front
of its cache each call instead (`in_cache`), and sliced off what the graph returns:

    input_ids (B, L), attention_mask (B, L_past + L), past_key_values.{i}.key/value (B, kv_heads, L_past, head_dim)
    -> logits (B, L, vocab), present.{i}.key/value (B, kv_heads, L_past + L, head_dim)

The cache holds real tokens only; batches are left-padded; positions of real tokens start after the
virtual tokens, counted from the mask.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from ..errors import QPromptError
from ..forward import cache_kwargs
from ..templates import real_positions


class MergedPromptDecoder(torch.nn.Module):
    """The base decoder with a constant KV prefix (the soft prompt) in front of every sequence.

    Traced only through `export_graph`, whose attention (`grouped_attention`) reads the prefix; with `in_cache`, the
    prefix is joined in front of each layer's cache instead (for models whose attention never sees the keyword)."""

    def __init__(self, base, prefix: list[tuple[torch.Tensor, torch.Tensor]], in_cache: bool = False):
        super().__init__()
        self.base = base
        self.in_cache = in_cache
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
        prefix = [(getattr(self, f"prefix_key_t_{i}"), getattr(self, f"prefix_value_{i}"))
                  for i in range(self.num_layers)] if self.num_virtual else None
        if self.in_cache and prefix:
            front = [(k.transpose(-1, -2).expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]
            return _run_prefix_in_cache(self.base, input_ids, attention_mask, past, front, self.num_virtual,
                                        attention_mask.new_ones((batch, self.num_virtual)), self.num_virtual)
        # A DynamicCache cannot be a graph input: build it here from plain tensors.
        layers = [PrefixedLayer(self.num_virtual, past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache()
        cache.layers = layers
        full_mask = torch.cat([attention_mask.new_ones((batch, self.num_virtual)), attention_mask], dim=1)
        positions = real_positions(attention_mask, self.num_virtual)[:, -length:]
        # The prefix goes to every attention call as a keyword (transformers passes extra keywords down).
        out = self.base(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                        use_cache=True, qprompt_prefix=prefix, **cache_kwargs(self.base, cache))
        presents = []
        for layer in layers:  # the real tokens' cache: past + this step, without the constant prefix
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _run_prefix_in_cache(base, input_ids, attention_mask, past, front, slots: int, slot_mask, row_virtual):
    """The base with each layer's cache = [prefix (slots); past] and the mask covering both; returns logits and the
    caches without the prefix. `row_virtual`: each row's own virtual tokens (positions start there)."""
    from transformers import DynamicCache

    length = input_ids.shape[1]
    layers = [PrefixedLayer(0, torch.cat([k, past[2 * i]], dim=2), torch.cat([v, past[2 * i + 1]], dim=2))
              for i, (k, v) in enumerate(front)]
    cache = DynamicCache()
    cache.layers = layers
    full_mask = torch.cat([slot_mask.to(attention_mask.dtype), attention_mask], dim=1)
    positions = real_positions(attention_mask, row_virtual)[:, -length:]
    out = base(input_ids=input_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
               **cache_kwargs(base, cache))
    presents = []
    for layer in layers:
        presents += [layer.keys[:, :, slots:], layer.values[:, :, slots:]]
    return (out.logits, *presents)


class TaskTableDecoder(torch.nn.Module):
    """The base decoder with one constant KV prefix per task, in a table of `slots` slots per task: each row of a
    batch reads its own task's prefix (`task_ids`, one per row), so one graph serves every task at once.

    A prefix shorter than `slots` is padded with masked slots. The tables are traced as inputs and then
    pinned into the graph as constants under their own names (`pin_tables`), so adding or removing a task
    changes only the tables' first dimension (`add_task`, `remove_task`): every other task runs the very
    same computation, and its outputs stay bit-identical."""

    def __init__(self, base, slots: int, in_cache: bool = False):
        super().__init__()
        self.base = base
        self.in_cache = in_cache
        self.num_layers = base.config.num_hidden_layers
        self.num_virtual = slots

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor,
                *rest: torch.Tensor):
        from transformers import DynamicCache

        past, tables = rest[: 2 * self.num_layers], dict(zip(table_names(self.num_layers), rest[2 * self.num_layers :]))
        batch, length = input_ids.shape
        if self.in_cache:  # each row's prefix in front of its cache; a shorter prompt's padding slots masked
            front = [(tables[f"task_prefix_key_t_{i}"][task_ids].transpose(-1, -2),
                      tables[f"task_prefix_value_{i}"][task_ids]) for i in range(self.num_layers)]
            return _run_prefix_in_cache(self.base, input_ids, attention_mask, past, front, self.num_virtual,
                                        tables["task_slot_mask"][task_ids],
                                        tables["task_virtual_tokens"][task_ids][:, None])
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


def prefix_reaches_attention(base, shape: tuple[int, int]) -> bool:
    """Whether every layer's attention receives the `qprompt_prefix` keyword (transformers' attention interface
    passes extra keywords down); probed with an empty prefix on one token."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    seen = set()

    def spy(module, *args, qprompt_prefix=None, **kwargs):
        if qprompt_prefix is not None:
            seen.add(module.layer_idx)
        return grouped_attention(module, *args, qprompt_prefix=qprompt_prefix, **kwargs)

    heads, head_dim = shape
    empty = [(torch.zeros(1, heads, head_dim, 0), torch.zeros(1, heads, 0, head_dim))] * base.config.num_hidden_layers
    AttentionInterface.register("qprompt_probe", spy)
    AttentionMaskInterface.register("qprompt_probe", partial(sdpa_mask, allow_is_causal_skip=False))
    previous = base.config._attn_implementation
    base.config._attn_implementation = "qprompt_probe"
    try:
        with torch.no_grad():
            base(input_ids=torch.ones((1, 2), dtype=torch.long), qprompt_prefix=empty, use_cache=False)
    except Exception:  # noqa: BLE001  a model that trips over the keyword: it never reaches attention either
        return False
    finally:
        base.config._attn_implementation = previous
    return len(seen) == base.config.num_hidden_layers


def export_graph(module: MergedPromptDecoder, path: Path, opset: int, shape: tuple[int, int]) -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = module.base.config
    AttentionInterface.register("qprompt_grouped", grouped_attention)
    # Always a boolean mask (never None): grouped_attention has no is_causal shortcut to fall back on.
    AttentionMaskInterface.register("qprompt_grouped", partial(sdpa_mask, allow_is_causal_skip=False))
    previous = config._attn_implementation
    # Export only (parity then checks it against the usual path). A prefix joined to the cache needs no special
    # attention: the model's own eager one reads it.
    config._attn_implementation = "eager" if module.in_cache else "qprompt_grouped"
    try:
        _export_graph(module, path, opset, shape)
    finally:
        config._attn_implementation = previous


def _export_graph(module: MergedPromptDecoder, path: Path, opset: int, shape: tuple[int, int]) -> None:
    heads, head_dim = shape
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
        example = prefix_tables([[], []], module.num_virtual, module.num_layers, shape)
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
