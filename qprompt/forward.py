"""The one forward pass qprompt trains, scores and generates with.

PEFT owns the soft prompt's parameters; what qprompt adds is this forward pass. It runs the frozen decoder
on [virtual tokens; real tokens] and applies the LM head only at the positions whose next token is
scored, instead of over the whole vocabulary at every position.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Iterator

import torch
from peft import PeftModel, PeftType
from transformers import DynamicCache

from .templates import real_positions


def virtual_tokens(model) -> int:
    """The soft prompt's length; 0 for a bare base or a PEFT adapter that is not a prompt (a LoRA baseline)."""
    return getattr(model.active_peft_config, "num_virtual_tokens", 0) if isinstance(model, PeftModel) else 0


def is_multitask(model) -> bool:
    """Whether the prompt is PEFT's multitask prompt tuning: a shared prompt times a per-task matrix, so every row
    needs its task's id."""
    return isinstance(model, PeftModel) and model.active_peft_config.peft_type == PeftType.MULTITASK_PROMPT_TUNING


def is_prefix(model) -> bool:
    """Whether the soft prompt is a KV prefix (keys/values for every layer, as prefix tuning learns) rather than
    input embeddings. PEFT's config type decides how its model runs; each registered method declares the same
    in `exports_as` (tests/test_registry.py holds them to agree)."""
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


@torch.no_grad()
def cache_shape(model) -> tuple[int, int]:
    """(key/value heads, head dim) of a model's KV cache, read off a one-token forward pass: configs do not say it
    the same way (Falcon's multi-query attention keeps one head whatever num_kv_heads says)."""
    base = base_of(model)
    out = base(input_ids=torch.ones((1, 1), dtype=torch.long, device=base.device), use_cache=True)
    keys = cache_of(out).layers[0].keys
    return int(keys.shape[1]), int(keys.shape[3])


class FixedPrefix(DynamicCache):
    """A KV cache that holds the learned prefix and is never written: each layer reads prefix + its own
    keys/values. Because the forward does not mutate it, a checkpointed layer can be run twice."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


# The model attribute `prompt_task` sets: the task id of a multitask prompt's rows.
_TASK = "_qprompt_task_id"


@contextlib.contextmanager
def prompt_task(model, task_id: int) -> Iterator[None]:
    """Within the block, a multitask prompt (`is_multitask`) gives every row task `task_id`'s prompt; a batch
    may also carry its own `task_ids`. Other prompts ignore it. Outside any block the task is 0."""
    before = getattr(model, _TASK, None)
    setattr(model, _TASK, task_id)
    try:
        yield
    finally:
        setattr(model, _TASK, before)


def soft_prompt(model, batch: int, task_ids: torch.Tensor | None = None):
    """PEFT's prompt for `batch` rows: embeddings (B, n, H), or prefix tuning's per-layer cache. A multitask
    prompt takes each row's task from `task_ids` (B,), else from `prompt_task`, else task 0."""
    if not is_multitask(model):
        return model.get_prompt(batch_size=batch)
    if task_ids is None:
        device = model.get_base_model().get_input_embeddings().weight.device
        task_ids = torch.full((batch,), getattr(model, _TASK, None) or 0, dtype=torch.long, device=device)
    return model.get_prompt(batch_size=batch, task_ids=task_ids)


# The model attribute `masked_virtual_tokens` sets: the virtual-token slots hidden from attention.
_MASKED_SLOTS = "_qprompt_masked_virtual_tokens"


@contextlib.contextmanager
def masked_virtual_tokens(model, slots: Iterable[int]) -> Iterator[None]:
    """Within the block, every forward pass here runs as if the virtual tokens in `slots` were dropped.

    Their columns of the attention mask are zeroed, so no token (real, or a later virtual one) attends to
    them, in any layer; every other token keeps its position. This is how `qprompt inspect` measures a
    virtual token's importance. Zeroing a token's embedding would not drop it: a zero vector still gets
    keys and values after the norm layers and takes a share of the attention. Outside such a block the
    forward pass is exactly the usual one (no mask edit happens at all).
    """
    slots = sorted(set(slots))
    n_virtual = virtual_tokens(model)
    if any(not 0 <= s < n_virtual for s in slots):
        raise ValueError(f"virtual token slots must lie in 0..{n_virtual - 1}, got {slots}")
    before = getattr(model, _MASKED_SLOTS, None)
    setattr(model, _MASKED_SLOTS, tuple(slots) or None)  # nothing masked: the plain path
    try:
        yield
    finally:
        setattr(model, _MASKED_SLOTS, before)


def _prompted_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     task_ids: torch.Tensor | None = None):
    """The decoder's inputs for [soft prompt; real tokens]: (embeds, mask, positions, prefix, n_front).

    `prefix` holds prefix tuning's per-layer (keys, values), else None; `n_front` counts the virtual
    token embeddings put in front of the real ones (prompt tuning, p-tuning), else 0. Inside
    `masked_virtual_tokens` the mask hides the chosen virtual tokens. `task_ids` (B,): each row's task, for a
    multitask prompt.
    """
    base = base_of(model)
    embeds = base.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    n_virtual = virtual_tokens(model)
    # Each real token's position counts only the real tokens before it, after the virtual ones: left
    # or right padding gives every row the positions it has alone (and that the ONNX export uses).
    positions = real_positions(attention_mask, n_virtual)
    mask = torch.cat([attention_mask.new_ones((batch, n_virtual)), attention_mask], dim=1)
    masked = getattr(model, _MASKED_SLOTS, None)
    if masked:  # the virtual tokens come first in the mask, whether embeddings or a KV prefix
        mask[:, list(masked)] = 0
    if is_prefix(model):  # the learned keys/values, read by every layer
        prefix = [(layer.keys, layer.values) for layer in soft_prompt(model, batch).layers]
        return embeds, mask, positions, prefix, 0
    if n_virtual:  # prompt tuning, p-tuning: virtual token embeddings in front, at positions 0..n-1
        prompts = soft_prompt(model, batch, task_ids).to(embeds.dtype)
        embeds = torch.cat([prompts, embeds], dim=1)
        virtual_positions = torch.arange(n_virtual, device=input_ids.device).expand(batch, -1)
        positions = torch.cat([virtual_positions, positions], dim=1)
    return embeds, mask, positions, None, n_virtual


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states of the real tokens (B, L, H), with the soft prompt (if any) in front."""
    embeds, mask, positions, prefix, n_front = _prompted_inputs(model, input_ids, attention_mask, task_ids)
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
    """Log-probabilities of the target tokens: (sum per row, number of target tokens per row). A batch of several
    tasks' rows carries their `task_ids` (a multitask prompt reads them)."""
    labels = batch["labels"]
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch.get("task_ids"))
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
