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
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from . import __version__, owned
from .artifact import load_artifact, write_json
from .errors import QPromptError
from .forward import cache_kwargs, cache_of, greedy_generate, is_prefix, virtual_tokens
from .genai import GENAI_CONFIG, genai_config
from .plan import kv_shape
from .runtime import EXPORT_FORMAT, EXPORT_MANIFEST, QUANTIZATIONS, ExportedModel, Sampling
from .templates import real_positions

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
        cache = model.get_prompt(batch_size=1)
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    base = model.get_base_model()
    prompts = model.get_prompt(batch_size=1).to(base.dtype)
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
    virtual = prefix[1].shape[-2] if prefix is not None else 0
    # Boolean mask (B, 1, L, V + T) -> (B, 1, groups * L, T): the prefix is always attended, so only real keys
    # are masked; the same mask serves every head of a group.
    mask = attention_mask[..., virtual:]
    mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * length, -1)
    # A large negative rather than -inf: a padded query row that sees no key stays finite (it is ignored).
    scores = (q @ key.transpose(-1, -2)).masked_fill(~mask, torch.finfo(q.dtype).min)
    if prefix is None:
        out = torch.softmax(scores, dim=-1) @ value
    else:
        prefix_key_t, prefix_value = prefix
        weights = torch.softmax(torch.cat([q @ prefix_key_t, scores], dim=-1), dim=-1)
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
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in names))
    program = torch.onnx.export(
        module, (ids, mask, *past), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
        input_names=["input_ids", "attention_mask", *names],
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
def parity(model, tokenizer, exported: ExportedModel, prompts: list[list[int]], new_tokens: int) -> dict:
    """Compare the graph with the PyTorch PEFT model: logits on each prompt (PEFT's forward), and greedy tokens."""
    max_diff, max_logit = 0.0, 0.0
    greedy_equal = True
    onnx_tokens = exported.generate_ids(prompts, Sampling(max_new_tokens=new_tokens))
    for ids, onnx_new in zip(prompts, onnx_tokens):
        x = torch.tensor([ids])
        ref = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        if not is_prefix(model):  # PEFT returns logits for the virtual tokens too
            ref = ref[:, virtual_tokens(model):]
        logits, _ = exported.forward(x.numpy(), np.ones_like(x.numpy()), exported.empty_past(1))
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


def agreement(reference: ExportedModel, candidate: ExportedModel, prompts: list[list[int]]) -> dict:
    """How close a quantized graph stays to the fp32 one: next-token logits and top-1 agreement."""
    diffs, same = [], 0
    for ids in prompts:
        x = np.array([ids], dtype=np.int64)
        a, _ = reference.forward(x, np.ones_like(x), reference.empty_past(1))
        b, _ = candidate.forward(x, np.ones_like(x), candidate.empty_past(1))
        diffs.append(float(np.abs(a[0, -1] - b[0, -1]).max()))
        same += int(a[0, -1].argmax() == b[0, -1].argmax())
    return {"max_abs_next_token_logit_diff": max(diffs), "next_token_top1_agreement": same / len(prompts)}


def export(artifact: str | Path | None, output: str | Path, quantize: str = "none", opset: int = 20,
           overwrite: bool = False, parity_tokens: int = 8, base_model: str | None = None,
           recipe=None) -> dict:
    """Write an export folder from `artifact` (or, with `base_model`, from a bare base: no soft prompt)."""
    output = Path(output)
    if quantize not in QUANTIZATIONS:
        raise QPromptError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    check_export_output(output, artifact, overwrite)
    start = time.perf_counter()
    # bitsandbytes layers cannot be exported: export from float32 weights, either the full-precision base
    # or, for nf4/fp4, the bitsandbytes-quantized base dequantized (the exact weights it computes with).
    weights = quantize if quantize in BNB4 else "none"
    if base_model is None:
        model, tokenizer, recipe, manifest = load_artifact(artifact, quant=weights, compute_dtype="float32",
                                                           device="cpu")
        samples = manifest.get("samples") or []
    else:
        from .models import load_model

        model, tokenizer, info = load_model(base_model, weights, "float32", "cpu")
        manifest = {"base": info.to_dict(), "method": "none", "virtual_tokens": 0}
        samples = []
    model.eval()
    base = model.get_base_model() if virtual_tokens(model) else model
    if weights != "none":
        base.dequantize()  # swaps each Linear4bit for a float32 Linear holding the same values
    module = MergedPromptDecoder(base, constant_prefix(model)).eval()

    output.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, uniquely named folder beside the output (nothing of the user's shares its name), made with
    # mkdir so it gets the usual permissions, not mkdtemp's owner-only ones: the folder is meant to be shipped.
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        fp32 = tmp / "model.onnx"
        log.info("exporting %s to ONNX (opset %d)", manifest["base"]["name"], opset)
        try:
            export_graph(module, fp32, opset)
        except Exception as exc:  # torch.export raises many kinds; the user needs the first line
            raise QPromptError(f"ONNX export failed ({str(exc).splitlines()[0][:200]}); try another --opset") from exc
        tokenizer.save_pretrained(tmp)

        heads, head_dim = kv_shape(base.config)
        template = recipe.to_dict()["template"] if recipe else {"prompt": "{text}", "instruction": ""}
        chat_wrap = None
        if recipe and recipe.template.chat and getattr(tokenizer, "chat_template", None):
            marker = "\u0000BODY\u0000"
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                     add_generation_prompt=True)
            chat_wrap = rendered.split(marker)
        eos = tokenizer.eos_token_id
        data = {
            "format": EXPORT_FORMAT, "qprompt_version": __version__, "model_file": "model.onnx",
            # Shipped with the graph: names that identify the source, never paths on the trainer's disk.
            "source": {"artifact": Path(artifact).resolve().name if artifact else None,
                       "base": portable_base(manifest["base"]),
                       "method": manifest["method"], "virtual_tokens": manifest["virtual_tokens"]},
            "task": recipe.task if recipe else "generation",
            "template": template, "chat_wrap": chat_wrap, "label_field": recipe.data.label_field if recipe else "label",
            "label_targets": {lab: recipe.template.target.format(label=word) for lab, word in recipe.labels.items()}
            if recipe and recipe.task == "classification" else {},
            "num_layers": module.num_layers, "num_kv_heads": heads, "head_dim": head_dim,
            "vocab_size": base.config.vocab_size, "num_virtual_tokens": module.num_virtual,
            "max_positions": getattr(base.config, "max_position_embeddings", 2048) - module.num_virtual,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_ids": [eos] if eos is not None else [],
            "opset": opset, "quantization": "none", "files": {},
            "fp32_weights": "dequantized " + weights if weights != "none" else "full precision",
        }
        write_json(tmp / EXPORT_MANIFEST, data)

        # Parity on real inputs: the artifact's stored validation rows, else a fixed sentence.
        fp32_runtime = ExportedModel(tmp, providers=["CPUExecutionProvider"])
        if samples:
            prompts = [fp32_runtime.prompt_ids(row) for row in samples]
        else:
            prompts = [fp32_runtime.encode("The film opens on a quiet street, and then")]
        report = parity(model, tokenizer, fp32_runtime, prompts, parity_tokens)
        data["parity"] = report
        data["files"]["model.onnx"] = {"quantization": "none", "mb": _file_mb(tmp, "model.onnx")}
        if report["max_abs_logit_diff"] > report["tolerance"] or not report["greedy_tokens_equal"]:
            raise QPromptError(
                f"the exported graph does not match PyTorch (max logit difference {report['max_abs_logit_diff']:.2e} "
                f"> {report['tolerance']:.1e}, "
                f"greedy tokens equal: {report['greedy_tokens_equal']}); nothing was written to {output}; "
                "try another --opset and report the model"
            )

        if quantize != "none":
            name = f"model.{quantize}.onnx"
            log.info("quantizing to %s", quantize)
            quantize_graph(fp32, tmp / name, quantize)
            quantized = ExportedModel(tmp, name, providers=["CPUExecutionProvider"])
            data["files"][name] = {"quantization": quantize, "mb": _file_mb(tmp, name),
                                   **agreement(fp32_runtime, quantized, prompts)}
            data["model_file"], data["quantization"] = name, quantize
        data["seconds"] = round(time.perf_counter() - start, 1)
        # onnxruntime-genai runs the folder as it is (qprompt/genai.py): its config names the final model_file.
        write_json(tmp / GENAI_CONFIG, genai_config(data, base.config.model_type, base.config.hidden_size,
                                                    base.config.num_attention_heads, tokenizer.bos_token_id))
        write_json(tmp / EXPORT_MANIFEST, data)
        install_export(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted export leaves nothing behind
        raise
    return data


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
