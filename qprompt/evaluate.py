"""Scoring a model (with or without a soft prompt) on rows of a task, and the task metrics.

Classification never generates: each label's verbalized tokens are scored by log-likelihood and
the best label wins, so a prediction is always a valid label. Generation decodes greedily.
"""

from __future__ import annotations

import time

import torch

from .config import RecipeConfig
from .data import Encoder, Example, collate
from .forward import base_of, greedy_generate, next_token_logprobs, target_logprobs, virtual_tokens
from .metrics import task_metrics


@torch.no_grad()
def classify(model, encoder: Encoder, examples: list[Example], batch_size: int = 32,
             single_pass: bool | None = None) -> list[str]:
    """The most likely label for each example (sum of its tokens' log-probabilities)."""
    labels = list(encoder.label_ids)
    candidates = [encoder.label_ids[lab] for lab in labels]
    pad = encoder.tokenizer.pad_token_id
    # Shortest first: batches of similar length waste little compute on padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    scores = torch.empty(len(examples), len(labels))
    single_token = all(len(c) == 1 for c in candidates) if single_pass is None else single_pass
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [examples[i] for i in idx]
        if single_token:  # one pass scores every label at once
            batch = collate(chunk, pad, with_target=False)
            logprobs = next_token_logprobs(model, batch["input_ids"].to(model.device),
                                           batch["attention_mask"].to(model.device))
            chunk_scores = logprobs[:, [c[0] for c in candidates]].cpu()
        else:  # each (example, label) pair is its own row
            pairs = [Example(e.prompt_ids, c, None) for e in chunk for c in candidates]
            batch = {k: v.to(model.device) for k, v in collate(pairs, pad).items()}
            chunk_scores = target_logprobs(model, batch)[0].view(len(chunk), len(labels)).cpu()
        scores[idx] = chunk_scores.float()
    return [labels[i] for i in scores.argmax(dim=1).tolist()]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: the model's generation config's EOS ids, else the tokenizer's."""
    eos = getattr(getattr(base_of(model), "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted({eos} if isinstance(eos, int) else set(eos or []))


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64,
                   batch_size: int = 8) -> list[str]:
    """Greedy continuation of each prompt, in left-padded batches of similar length.

    Positions count real tokens only (forward.greedy_generate), so a row's text does not depend on
    what it was batched with.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([Example(prompts[i], [], None) for i in idx], pad, with_target=False, pad_left=True)
        generated = greedy_generate(model, batch["input_ids"].to(model.device),
                                    batch["attention_mask"].to(model.device), max_new_tokens, stops, pad)
        for i, ids in zip(idx, generated):
            out[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return out


def main_metric(recipe: RecipeConfig) -> str:
    return "accuracy" if recipe.task == "classification" else "rouge_l"


def evaluate(model, tokenizer, recipe: RecipeConfig, rows: list[dict], where: str = "data",
             hard_prompt: bool = False, batch_size: int = 32, shots: list[dict] | None = None) -> dict:
    """Task metrics of `model` on `rows`; `hard_prompt` puts the recipe's instruction (and the k-shot
    demonstrations in `shots`) in front of each input."""
    encoder = Encoder(recipe, tokenizer, virtual_tokens(model), shots)
    examples = encoder.encode_all(rows, where, hard_prompt=hard_prompt)
    start = time.perf_counter()
    if recipe.task == "classification":
        predictions = classify(model, encoder, examples, batch_size)
    else:
        predictions = generate_texts(model, tokenizer, [e.prompt_ids for e in examples])
    metrics = task_metrics(recipe.task, predictions, [e.label for e in examples], list(recipe.labels))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics["predictions"] = predictions
    return metrics
