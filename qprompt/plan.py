"""Predict the peak memory of a soft-prompt training run from the model's config alone (no weights).

The base is frozen, so the bill is: the (quantized) weights, the prompt's parameters with their
gradients and AdamW moments, the activations autograd keeps for the backward pass, the logits at
the scored positions, and the working set of the backward pass. Activations dominate at long
sequences; gradient checkpointing keeps one tensor per layer instead of ~a dozen, and `plan` says
when a run needs it. The per-layer inventory below was read off autograd's saved tensors for a
Llama-style decoder (tests/test_plan.py checks it against them):

    two RMSNorms       their float32 input                      2 x hidden x 4 bytes
    attention (SDPA)   q and output per query token             2 x heads x head_dim x b
                       k and v per key token: repeated to every query head on CUDA (2 x heads x head_dim
                       x b), grouped on CPU, where training runs SDPA with enable_gqa (2 x kv_heads ...)
    MLP                gate and up projections                  2 x intermediate x b
                       (qprompt recomputes act(gate) in the backward pass; stock autograd keeps it too)

Frozen Linear and bitsandbytes layers save no input (only their weight, which is resident anyway).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .methods import KV_PREFIX, get_method

GIB = 1024**3
# Llama-3-8B's architecture (its published config), for random-weight speed and memory runs.
ARCHITECTURES = {
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001},
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per quantized Linear weight: int4 (ONNX Runtime's blocks): 4-bit codes and a float32 scale per 32.
# nf4/fp4: 4-bit codes plus absmax per 64 (double quant: 8-bit absmax, and an
# fp32 scale per 256 of those); LLM.int8: one byte plus an fp32 scale per output row (left out: tiny).
WEIGHT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0,
                "int4": 0.5 + 4 / 32}
CPU_RUNTIME_GB = 0.45  # resident size of Python + torch + transformers + peft + bitsandbytes once imported (measured)
CUDA_CONTEXT_GIB = 0.5  # CUDA context and kernels: on the GPU but outside PyTorch's allocator
# CPU: the forward pass's temporaries are freed between the activations it keeps, and glibc cannot hand
# that interleaved space back until the step ends, so the resident size grows by about 1.75x the saved
# activations (SmolLM2-135M nf4, resident size sampled every 2 ms over a step: 1.65x at 8 x 85 tokens,
# 1.85x at 16 x 24, 1.76x at 16 x 85; prompt tuning, 100 virtual tokens, no checkpointing).
CPU_HEAP_OVERHEAD = 0.75


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a decoder config; configs without GQA fields have one per query head."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> Shape:
        kv_heads, head_dim = kv_shape(config)
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads, kv_heads=kv_heads,
                   head_dim=head_dim, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


def load_config(model: str):
    """A model's config without its weights: an architecture preset, an alias, a folder or a hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if model in ARCHITECTURES:
        data = dict(ARCHITECTURES[model])
        return AutoConfig.for_model(data.pop("model_type"), **data)
    from .models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    assert isinstance(config, PretrainedConfig)
    return config


def prompt_parameters(shape: Shape, method: str, virtual_tokens: int, **options) -> int:
    """Trainable parameters of a method, as PEFT builds them (options: encoder, encoder_hidden, prefix_projection)."""
    return get_method(method).trainable_parameters(shape, virtual_tokens, **options)


def activation_bytes(shape: Shape, batch: int, query_len: int, key_len: int, b: int,
                     grouped_kv: bool = False) -> tuple[int, int]:
    """(bytes one decoder layer keeps for backward, bytes of the final norm and the attention mask).

    `grouped_kv`: attention keeps keys and values at their own head count (CPU training), not repeated."""
    tq, tk = batch * query_len, batch * key_len
    qo = shape.heads * shape.head_dim
    kv = (shape.kv_heads if grouped_kv else shape.heads) * shape.head_dim
    per_layer = (tq * (2 * shape.hidden * 4 + 2 * 4 + 2 * qo * b + shape.heads * 4 + 2 * shape.intermediate * b)
                 + tk * 2 * kv * b)
    once = tq * (shape.hidden * 4 + 4) + batch * query_len * key_len * b
    return per_layer, once


@dataclass
class MemoryPlan:
    weights: float
    prompt: float
    activations: float
    logits: float
    backward_working_set: float
    runtime: float
    heap_overhead: float
    total: float
    device: str
    checkpointing: bool

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(shape: Shape, quant: str, method: str, virtual_tokens: int, batch: int, seq_len: int,
                compute_dtype: str = "float32", device: str = "cpu", checkpointing: bool = False,
                target_tokens: int = 2, **method_options) -> MemoryPlan:
    """Predicted peak memory in GiB: allocator peak on CUDA, resident size (RSS) on CPU."""
    b = DTYPE_BYTES[compute_dtype]
    h, i, n = shape.hidden, shape.intermediate, shape.layers
    linear = n * (h * shape.heads * shape.head_dim * 2 + 2 * h * shape.kv_heads * shape.head_dim + 3 * h * i)
    other = shape.vocab * h * (1 if shape.tied else 2) + (2 * n + 1) * h
    weights = linear * WEIGHT_BYTES.get(quant, b) + other * b
    prompt = prompt_parameters(shape, method, virtual_tokens, **method_options) * 16  # fp32 param, grad, 2 moments

    # Virtual tokens are query positions when they are input embeddings; a KV prefix only adds keys.
    prefix = get_method(method).exports_as == KV_PREFIX
    query_len = seq_len if prefix else seq_len + virtual_tokens
    key_len = seq_len + virtual_tokens
    per_layer, once = activation_bytes(shape, batch, query_len, key_len, b, grouped_kv=device == "cpu")
    if checkpointing:  # each layer keeps its input; one layer's activations live again during its backward
        activations = n * batch * query_len * h * b + per_layer + once
    else:
        activations = n * per_layer + once
    # The LM head runs only at the scored positions: its output, a float32 copy, log-softmax and its gradient.
    logits = batch * target_tokens * shape.vocab * (b + 12)
    # Gradients flowing through one layer, plus one Linear weight dequantized at a time by bitsandbytes.
    working = batch * query_len * (2 * i + 2 * h) * b + (h * i * b if quant != "none" else 0)
    runtime = CPU_RUNTIME_GB * 1e9 if device == "cpu" else 0
    heap = CPU_HEAP_OVERHEAD * activations if device == "cpu" else 0
    parts = [x / GIB for x in (weights, prompt, activations, logits, working, runtime, heap)]
    return MemoryPlan(*parts, total=sum(parts), device=device, checkpointing=checkpointing)


def advise(shape: Shape, gpu_gib: float, quant: str, method: str, virtual_tokens: int, batch: int, seq_len: int,
           compute_dtype: str, checkpointing: bool, **method_options) -> tuple[MemoryPlan, list[str]]:
    """The plan as asked, and what to change (in order of least cost to the run) when it does not fit."""
    usable = gpu_gib - CUDA_CONTEXT_GIB

    def plan(**change):
        args = dict(quant=quant, batch=batch, seq_len=seq_len, checkpointing=checkpointing) | change
        return plan_memory(shape, method=method, virtual_tokens=virtual_tokens, compute_dtype=compute_dtype,
                           device="cuda", **args, **method_options)

    asked = plan()
    if asked.total <= usable:
        return asked, []
    advice = []
    if not checkpointing and plan(checkpointing=True).total <= usable:
        return asked, ["add --gradient-checkpointing (about 30% slower, same result)"]
    ckpt = True
    for smaller in range(batch - 1, 0, -1):
        if batch % smaller == 0 and plan(checkpointing=ckpt, batch=smaller).total <= usable:
            advice.append(f"add --gradient-checkpointing and use --batch-size {smaller} --grad-accum "
                          f"{batch // smaller} (same effective batch)")
            return asked, advice
    if quant in ("none", "int8") and plan(checkpointing=ckpt, quant="nf4", batch=1).total <= usable:
        return asked, ["quantize the base with --quant nf4, add --gradient-checkpointing, and lower --batch-size"]
    return asked, [f"does not fit in {gpu_gib:g} GiB even with nf4, checkpointing and batch 1: shorten the "
                   "sequences (--max-length) or use a bigger GPU"]
