"""The baselines `qprompt job --baselines` scores beside the soft prompt, on the same test rows.

    hard    the base with the recipe's hand-written instruction (0-shot)
    kshot   the same, with K demonstrations drawn from the training rows in front of each input
    lora    LoRA (PEFT) on every linear layer of the recipe's quantized base (QLoRA with nf4/fp4/int8; an int4
            recipe's LoRA trains on nf4, as PEFT's LoRA does not wrap qprompt's int4 layers)
    full    full fine-tuning of the unquantized base

The fine-tuning baselines train on the soft prompt's training rows with its batch size, its learning-rate schedule
(warm-up then cosine) and, at the learning rate usual for each kind, either as many optimizer steps as the soft
prompt took (budget "steps") or as many as fit in the soft prompt's training time (budget "time": the step count
is estimated from the mean time of the steps after the first, again after every step, so the schedule still ends
where training ends); each row records its metric, trainable parameters, steps, training wall time, peak memory and
artifact size.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QPromptError

if TYPE_CHECKING:
    from .config import RecipeConfig
# torch and the training modules are imported where used: the CLI reads BASELINES at start-up, torch-free.

log = logging.getLogger("qprompt")

BASELINES = ("hard", "kshot", "lora", "full")
DEFAULT_BASELINES = ("hard",)  # the fine-tuning ones each cost a training run: asked for by name
KSHOT = 4  # demonstrations in front of each kshot input
# Peak learning rates: LoRA's is the usual order for a few hundred steps on a small model (the QLoRA paper used
# 1e-4 to 2e-4 for far larger models and longer runs); full fine-tuning's is the usual 2e-5 to 1e-4 band's middle.
# No dropout: PEFT drops out each adapted layer's input separately, a copy per layer kept for the backward pass. On
# spam's longest rows (SmolLM2-135M nf4, batch 16; bench/lora_memory.py) dropout 0.05 took peak memory from 10.5 to
# 14.0 GB and each step 1.4-1.6x as long (two runs): at equal training time, fewer LoRA steps (spam 112 against 133).
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lr": 5e-4}
FULL_LR = 5e-5
BUDGETS = ("steps", "time")
TIMED_STEPS = 3  # steps timed, after the first (slower: allocation), before a "time" budget sets the step count


def parse_baselines(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise QPromptError(f"--baselines: unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    return names


def soft_prompt_batches(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """The soft prompt trainer's batches, in its order (train.py: each epoch shuffled, then grouped by length), so a
    baseline trains on the same rows with the same padding (random batches of spam's long and short messages pad every
    row to the batch's longest)."""
    from .train import epoch_rng, group_by_length, shuffled_rows

    for epoch in itertools.count():
        rng = epoch_rng(seed, epoch)
        order = group_by_length(shuffled_rows(len(lengths), rng), lengths, batch_size, rng)
        yield from (order[j : j + batch_size] for j in range(0, len(order), batch_size))


def score_kshot(model, tokenizer, recipe: RecipeConfig, train_rows: list[dict], test: list[dict], where: str,
                k: int = KSHOT) -> dict:
    """The hand-written prompt with `k` demonstrations from the training rows (the same ones for every input)."""
    from .data import demonstrations
    from .evaluate import evaluate

    shots = demonstrations(train_rows, k, seed=recipe.train.seed, label_field=recipe.data.label_field)
    return evaluate(model, tokenizer, recipe, test, where, hard_prompt=True, shots=shots)


def finetune(kind: str, recipe: RecipeConfig, splits: dict[str, list[dict]], test: list[dict], where: str,
             steps: int, output: Path, compute_dtype: str | None = None, device: str | None = None,
             seconds: float | None = None) -> dict:
    """Train the `kind` ("lora" or "full") baseline for `steps` steps — or, given `seconds`, for as many steps as
    fit in that training time — then score it on `test`; returns its row."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .data import Encoder, collate
    from .evaluate import evaluate
    from .forward import target_logprobs
    from .memory import PeakMemory, training_settings
    from .models import load_model
    from .train import lr_lambda

    quant = "none" if kind == "full" else ("nf4" if recipe.quant == "int4" else recipe.quant)
    model, tokenizer, info = load_model(recipe.model, quant, compute_dtype, device)
    if kind == "lora":
        config = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                            target_modules="all-linear", task_type="CAUSAL_LM")
        model, lr = get_peft_model(model, config), LORA["lr"]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        lr = FULL_LR
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = recipe.train
    encoder = Encoder(recipe, tokenizer, 0)
    examples = encoder.encode_all(splits["train"], "training data")
    batch_size = min(cfg.batch_size, len(examples))
    batches = soft_prompt_batches([len(e.prompt_ids) for e in examples], batch_size, cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    schedule_cfg = type(cfg)(**{**cfg.__dict__, "max_steps": steps})  # the schedule ends where training ends
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_cfg))
    torch.manual_seed(cfg.seed)
    model.train()
    log.info("%s baseline: %d steps of batch %d at lr %g (%s base)", kind, steps, batch_size, lr, quant)
    start = now = time.perf_counter()
    step, timed_at = 0, min(1 + TIMED_STEPS, steps) if seconds is not None else None
    # The soft prompt trainer's memory settings, so the rows' peak memory compares the methods, not the settings.
    with training_settings(model, cfg.lean_memory) as after_step, PeakMemory(model.device) as memory:
        while step < steps:
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in next(batches)],
                                                                   tokenizer.pad_token_id).items()}
                logp, counts = target_logprobs(model, batch)
                (-logp.sum() / counts.sum() / cfg.grad_accum).backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            after_step()
            step += 1
            if seconds is None:
                continue
            now = time.perf_counter()
            if step == 1:
                first = now
            if step >= timed_at:  # the step count the time budget holds, re-estimated after every step: later
                # steps can run slower than the first few (the machine's load, the optimizer's state growing)
                per_step = (now - first) / (step - 1) if step > 1 else first - start
                steps = schedule_cfg.max_steps = step + max(0, round((seconds - (now - start)) / per_step))
                if step == timed_at:
                    log.info("%s baseline: %.1f s per step; about %d steps fit in %.0f s", kind, per_step, steps,
                             seconds)
    elapsed = (now if seconds is not None else time.perf_counter()) - start
    model.eval()
    metrics = evaluate(model, tokenizer, recipe, test, where)
    if kind == "lora":  # the artifact a user keeps: the adapter, and what `qprompt export` needs to deploy it
        from .export.lora import write_record

        model.save_pretrained(output)
        write_record(output, recipe, quant, info.to_dict())
        size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    else:  # the whole model, as safetensors would hold it (not written: it is the base's size)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
    del optimizer
    return {**metrics, "trainable_parameters": sum(p.numel() for p in params), "train_seconds": round(elapsed, 1),
            "peak_memory_gb": round(memory.peak / 1024**3, 3), "artifact_bytes": size, "steps": steps, "lr": lr,
            "base_quant": quant}
