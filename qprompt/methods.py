"""Soft-prompt methods, built on PEFT, and the one forward pass qprompt trains and scores with.

PEFT owns the prompt parameters, their initialisation and the adapter files, so every artifact
stays loadable with `PeftModel.from_pretrained`. What qprompt adds is the forward pass: it runs
the frozen decoder on [virtual tokens; real tokens] and applies the LM head only at the positions
whose next token is scored, instead of over the whole vocabulary at every position.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path

import torch
from peft import (
    PeftModel,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from transformers import DynamicCache

from .config import MethodConfig, RecipeConfig
from .errors import QPromptError
from .models import keep_4bit_layers_trainable

METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
# Peak learning rates that trained each method in 50 steps on SmolLM2-135M (docs/results.md): p-tuning's
# MLP encoder stays at chance at prompt tuning's 0.03 and reaches 79% sentiment accuracy at 0.003.
SUGGESTED_LR = {"prompt-tuning": 3e-2, "p-tuning": 3e-3, "prefix-tuning": 3e-2}


def learning_rate_for(method: str | None, recipe: RecipeConfig, lr: float | None) -> float | None:
    """--lr when given; for a --method other than the recipe's, the rate measured for that method
    (the recipe's rate was chosen for its own method); else None, keeping the recipe's."""
    if lr is None and method and method != recipe.method.name:
        return SUGGESTED_LR[method]
    return lr


def init_text(method: MethodConfig, recipe: RecipeConfig) -> str:
    """The text a prompt starts from: the label words for init=labels (class-label init, Lester et al.),
    else init_text or the template's instruction."""
    if method.init == "labels":
        return " ".join(recipe.labels.values())
    return method.init_text or recipe.template.instruction


def peft_config(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str):
    """The PEFT config for `method` (the recipe supplies the init text and label words)."""
    hidden = method.encoder_hidden_size or None  # None: PEFT uses the model's hidden size
    if method.name == "p-tuning":
        kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtual_tokens,
                                   encoder_reparameterization_type=kind[method.encoder],
                                   encoder_hidden_size=hidden)
    if method.name == "prefix-tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtual_tokens,
                                  prefix_projection=method.prefix_projection,
                                  encoder_hidden_size=hidden or 512)
    if method.name != "prompt-tuning":
        raise QPromptError(f"unknown method {method.name!r}: use one of {', '.join(METHODS)}")
    init = {"text": PromptTuningInit.TEXT, "labels": PromptTuningInit.TEXT,
            "vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}
    from_text = method.init in ("text", "labels")  # PEFT repeats the text's embeddings to fill the prompt
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.virtual_tokens,
        prompt_tuning_init=init[method.init],
        prompt_tuning_init_text=init_text(method, recipe) if from_text else None,
        tokenizer_name_or_path=tokenizer_path if from_text else None,
    )


def add_soft_prompt(model, recipe: RecipeConfig, tokenizer_path: str, seed: int = 0) -> PeftModel:
    """Wrap a frozen base model with a freshly initialised soft prompt."""
    keep_4bit_layers_trainable(model)  # also for a model loaded by the caller: the prefix init runs it below
    torch.manual_seed(seed)  # vocab and random init draw from torch's generator
    peft_model = get_peft_model(model, peft_config(recipe.method, recipe, tokenizer_path))
    method = recipe.method
    if method.name == "prefix-tuning" and not method.prefix_projection and method.init != "random":
        init_prefix_from_tokens(peft_model, init_token_ids(method, recipe, tokenizer_path, model.config.vocab_size,
                                                           seed))
    return peft_model


def init_token_ids(method: MethodConfig, recipe: RecipeConfig, tokenizer_path: str, vocab_size: int,
                   seed: int = 0) -> list[int]:
    """The tokens a prefix starts from: the instruction (text), the label words (labels) or random words."""
    if method.init == "vocab":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(vocab_size, (method.virtual_tokens,), generator=generator).tolist()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = tokenizer(init_text(method, recipe), add_special_tokens=False)["input_ids"]
    if not ids:
        raise QPromptError("method.init_text is empty and so is the template's instruction: give one, or init: random")
    return ids


@torch.no_grad()
def init_prefix_from_tokens(model: PeftModel, token_ids: list[int]) -> None:
    """Start a deep prefix from the keys/values the frozen model computes for real tokens (Li & Liang, 2021).

    PEFT starts prefix tuning from N(0, 1) noise, which is far from any key/value the layers produce and
    trains poorly in few steps. The tokens are repeated or cut to the prompt length and sit at positions
    0..n-1, where the virtual tokens are.
    """
    n = virtual_tokens(model)
    ids = (token_ids * (n // len(token_ids) + 1))[:n]
    base = model.get_base_model()
    device = next(base.parameters()).device
    layers = cache_of(base(input_ids=torch.tensor([ids], device=device), use_cache=True)).layers
    # PEFT reads the embedding row of virtual token t as (layers * 2, kv_heads, head_dim), key then value.
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # (L, 2, H, n, D)
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    weight.copy_(kv.flatten(0, 1).permute(2, 0, 1, 3).reshape(n, -1).to(weight.dtype))


def load_soft_prompt(model, folder: str | Path) -> PeftModel:
    """A saved soft prompt on `model`, for inference."""
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file, for direct callers
        raise QPromptError(f"could not load the soft prompt in {folder} ({str(exc).splitlines()[0]})") from exc



def virtual_tokens(model) -> int:
    return model.active_peft_config.num_virtual_tokens if isinstance(model, PeftModel) else 0


def is_prefix(model) -> bool:
    """Prefix tuning learns keys/values for every layer; the other methods learn input embeddings."""
    return isinstance(model, PeftModel) and model.active_peft_config.peft_type == PeftType.PREFIX_TUNING


def base_of(model):
    return model.get_base_model() if isinstance(model, PeftModel) else model


def cache_kwargs(module, cache: DynamicCache) -> dict:
    """`cache` as the keyword `module.forward` takes it: transformers 5.24 renamed `past_key_values` to `cache`
    (the old name still works there, with a FutureWarning); 5.23 knows only the old name and would silently
    drop a `cache=` keyword into its **kwargs."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(module_class: type) -> str:
    # Once per model class, not once per decoding step: the signature is the class's.
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned: `output.cache` from transformers 5.24 on, `past_key_values` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class FixedPrefix(DynamicCache):
    """A KV cache that holds the learned prefix and is never written: each layer reads prefix + its own
    keys/values. Because the forward does not mutate it, a checkpointed layer can be run twice."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant: the base stays frozen)."""
    base = base_of(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers drops a layer's cache under checkpointing, since a layer that writes it would write twice.
    # qprompt's forward passes only a FixedPrefix, which is read-only: tell the layers to keep it.
    for layer in base.get_decoder().layers:
        layer._can_checkpoint_with_cache = True


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up that keeps only gate and up for the backward pass.

    Autograd would also keep act(gate), a third of a gated MLP's saved activations; recomputing it
    in the backward pass is one elementwise op per layer.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if isinstance(ctx.act, torch.nn.SiLU):  # closed form: silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
            s = torch.sigmoid(gate)
            activated = gate * s
            grad_gate = grad * up * (s * (1 + gate * (1 - s)))
        else:
            with torch.enable_grad():
                g = gate.detach().requires_grad_()
                activated = ctx.act(g)
            (grad_gate,) = torch.autograd.grad(activated, g, grad * up)
            activated = activated.detach()
        return grad_gate, grad * activated, None


def _lean_gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_GatedActivation.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def lean_gated_mlp(model) -> int:
    """Make the base's gated MLPs (down(act(gate(x)) * up(x)): Llama, Mistral, Qwen, Gemma...) keep
    two tensors per layer for the backward pass instead of three. Same outputs and gradients; returns
    how many MLPs were changed (0 when the architecture's MLP has another form)."""
    base = base_of(model)
    mlps = [m for m in base.modules()
            if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not mlps:
        return 0
    # Only where the stock forward is exactly the gated form: check it on the first MLP. The input needs
    # grad, as in training: a no-grad eval-mode pass would let bitsandbytes repack a 4-bit layer for
    # inference on some CPUs (see keep_4bit_layers_trainable).
    first = mlps[0]
    width = first.gate_proj.in_features
    embeddings = base.get_input_embeddings().weight  # the MLPs see hidden states of this dtype
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    x = x.to(first.gate_proj.weight.device, embeddings.dtype).requires_grad_()
    with torch.enable_grad():
        stock, lean = first(x).detach(), _lean_gated_forward(first, x).detach()
    if not torch.allclose(stock, lean, rtol=1e-3, atol=1e-4):
        return 0
    for m in mlps:
        m.forward = _lean_gated_forward.__get__(m)
    return len(mlps)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch, read at every attention call


@contextlib.contextmanager
def grouped_query_sdpa():
    """Inside: SDPA attends with the key/value heads as they are (enable_gqa) instead of repeating
    them to every query head first. transformers does so only without a mask, because CUDA's fused
    kernels then fall back to the slow one; on CPU it keeps the backward pass from saving the repeated
    keys and values (8% of SmolLM2's saved activations) at the same speed and with the same result."""
    previous = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_GQA, None)
        else:
            os.environ[_FORCE_GQA] = previous


def _prompted_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The decoder's inputs for [soft prompt; real tokens]: (embeds, mask, positions, prefix, n_front).

    `prefix` holds prefix tuning's per-layer (keys, values), else None; `n_front` counts the virtual
    token embeddings put in front of the real ones (prompt tuning, p-tuning), else 0.
    """
    base = base_of(model)
    embeds = base.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    n_virtual = virtual_tokens(model)
    # Each real token's position counts only the real tokens before it, after the virtual ones: left
    # or right padding gives every row the positions it has alone (and that the ONNX export uses).
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + n_virtual
    mask = torch.cat([attention_mask.new_ones((batch, n_virtual)), attention_mask], dim=1)
    if is_prefix(model):  # the learned keys/values, read by every layer
        prefix = [(layer.keys, layer.values) for layer in model.get_prompt(batch_size=batch).layers]
        return embeds, mask, positions, prefix, 0
    if n_virtual:  # prompt tuning, p-tuning: virtual token embeddings in front, at positions 0..n-1
        prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
        embeds = torch.cat([prompts, embeds], dim=1)
        virtual_positions = torch.arange(n_virtual, device=input_ids.device).expand(batch, -1)
        positions = torch.cat([virtual_positions, positions], dim=1)
    return embeds, mask, positions, None, n_virtual


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the real tokens (B, L, H), with the soft prompt (if any) in front."""
    embeds, mask, positions, prefix, n_front = _prompted_inputs(model, input_ids, attention_mask)
    decoder = base_of(model).get_decoder()
    if prefix is not None:  # read, never extended: a checkpointed layer may run twice
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                      **cache_kwargs(decoder, FixedPrefix(ddp_cache_data=prefix)))
        return out.last_hidden_state
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state[:, n_front:]


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each cut after its first stop token.

    Positions follow the same rule as training and scoring (real tokens only, after the virtual
    ones), so a row gives the same tokens in any batch; PEFT's `generate` numbers left-padded rows
    differently for prefix tuning.
    """
    if attention_mask[:, -1].min() < 1:
        raise ValueError("greedy_generate needs left padding (every row's last column a real token)")
    base = base_of(model)
    decoder, head, embed = base.get_decoder(), base.get_output_embeddings(), base.get_input_embeddings()
    embeds, mask, positions, prefix, _ = _prompted_inputs(model, input_ids, attention_mask)
    cache = DynamicCache(ddp_cache_data=prefix) if prefix is not None else DynamicCache()
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                  **cache_kwargs(decoder, cache))
    batch = input_ids.shape[0]
    stops = torch.tensor(stop_ids, dtype=torch.long, device=input_ids.device)  # long even when empty
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    position = positions[:, -1:] + 1
    tokens = []
    for step in range(max_new_tokens):
        token = head(out.last_hidden_state[:, -1]).argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        out = decoder(inputs_embeds=embed(token[:, None]), attention_mask=mask, position_ids=position,
                      use_cache=True, **cache_kwargs(decoder, cache_of(out)))
        position = position + 1
    result = []
    for row in torch.stack(tokens, dim=1).tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[: cut + 1] if cut < len(row) else row)
    return result


def target_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens: (sum per row, number of target tokens per row)."""
    labels = batch["labels"]
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    # Position t predicts token t+1: score hidden[:, t] against labels[:, t+1], only where it is a target.
    wanted = labels[:, 1:] != -100
    head = base_of(model).get_output_embeddings()
    logits = head(hidden[:, :-1][wanted]).float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, labels[:, 1:][wanted].unsqueeze(1)).squeeze(1)
    per_row = torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device)
    row_index = wanted.nonzero()[:, 0]
    per_row = per_row.index_add(0, row_index, picked)
    return per_row, wanted.sum(dim=1)


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary of the token after each row's last real token (B, V)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)  # last real token, any padding
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return torch.log_softmax(base_of(model).get_output_embeddings()(h).float(), dim=-1)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
