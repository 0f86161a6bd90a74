"""The training loop: AdamW on the soft prompt only, the base model frozen.

Warm-up then cosine decay, gradient accumulation, periodic evaluation that keeps the best prompt,
a metrics log and loss curve, and a checkpoint after every evaluation (written atomically) so an
interrupted run continues with `--resume` exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import owned
from .artifact import MANIFEST, manifest, read_checkpoint_state, write_json
from .config import RecipeConfig
from .data import Encoder, collate, template_fields
from .errors import QPromptError
from .evaluate import evaluate, main_metric
from .forward import target_logprobs
from .memory import (
    enable_gradient_checkpointing,
    glibc,
    grouped_query_sdpa,
    lean_gated_mlp,
    return_freed_memory_to_the_os,
)
from .methods import add_soft_prompt, trainable_parameters
from .models import ModelInfo

log = logging.getLogger("qprompt")
CHECKPOINT = "checkpoint"
CHECKPOINTS = (CHECKPOINT, CHECKPOINT + ".partial", CHECKPOINT + ".old")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT needs; not its README.md
METRICS = "metrics.jsonl"
# Every name training may create in --output, temporary ones included; nothing else there is ever touched.
RUN_NAMES = frozenset({*ADAPTER_FILES, MANIFEST, MANIFEST + ".partial", METRICS, METRICS + ".partial", "loss.png",
                       ".best.partial", *CHECKPOINTS})


def lr_lambda(cfg) -> callable:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def run_names(output: Path) -> set[str]:
    """The names in `output` that an earlier run wrote (per its record)."""
    if owned.has_record(output):
        return owned.owned(output) & RUN_NAMES
    # A run from before the record existed: it is recognised by its manifest or a checkpoint's state.pt.
    if not ((output / MANIFEST).is_file() or any((output / d / "state.pt").is_file() for d in CHECKPOINTS)):
        return set()
    found = {n for n in (*ADAPTER_FILES, MANIFEST, METRICS, "loss.png") if (output / n).is_file()}
    return found | {d for d in CHECKPOINTS if (output / d / "state.pt").is_file()}


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked, or to write over a name qprompt did not write; touches nothing."""
    if resume:
        if not _checkpoint_dir(output):
            raise QPromptError(f"nothing to resume in {output}: it holds no checkpoint; run without --resume to start")
        return
    mine = run_names(output)
    if any((output / n).exists() for n in mine) and not overwrite:
        raise QPromptError(
            f"{output} already holds a training run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output"
        )
    owned.refuse_foreign(output, set(RUN_NAMES), mine, "move it away or choose another --output")


def prepare_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Create `output`; with --overwrite, remove the earlier run's files (only those qprompt wrote).

    Called once every check on the data has passed, so a run that fails them leaves the old one whole."""
    output.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        owned.remove(output, run_names(output))


def _checkpoint_dir(output: Path) -> Path | None:
    # A kill between the two renames of save_checkpoint leaves only ".old": it is still complete.
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (output / name / "state.pt").is_file():
            return output / name
    return None


def rng_state() -> dict:
    """Every random stream training reads; each is a tuple of ints or a tensor, so weights_only loads it."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    python = rng["python"]  # (version, tuple of ints, gauss_next): the same tuple random.getstate() gave
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(model, optimizer, scheduler, state: dict, output: Path) -> None:
    partial, final, old = (output / f"{CHECKPOINT}{s}" for s in (".partial", "", ".old"))
    owned.claim(output, *CHECKPOINTS)
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "prompt_encoder": model.prompt_encoder.state_dict(), **state}, partial / "state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def save_best(model, output: Path) -> None:
    """Put the current prompt at the artifact's top level (file by file, each replace atomic)."""
    tmp = output / ".best.partial"
    owned.claim(output, tmp.name, *ADAPTER_FILES)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ADAPTER_FILES:  # PEFT also writes a model-card README.md: the user's README stays theirs
        os.replace(tmp / name, output / name)
    shutil.rmtree(tmp, ignore_errors=True)


def drop_lines_after(output: Path, step: int) -> None:
    """Drop metrics.jsonl lines past the checkpoint's step (they will be logged again), and a line a kill cut short."""
    path = output / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    tmp = output / (METRICS + ".partial")
    owned.claim(output, tmp.name)
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # a kill now leaves the old log or the new one


def plot_loss(output: Path) -> None:
    """loss.png from metrics.jsonl: training loss per step and the validation metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in lines if "eval" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="training loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="validation metric")
        ax2.set_ylabel("validation metric")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(output.name)
    fig.tight_layout()
    owned.claim(output, "loss.png")
    fig.savefig(output / "loss.png", dpi=100)
    plt.close(fig)


def train(recipe: RecipeConfig, model, tokenizer, info: ModelInfo, splits: dict[str, list[dict]], output: str | Path,
          resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train the recipe's soft prompt on `model`; writes the artifact to `output`, returns its manifest."""
    output = Path(output)
    check_output(output, resume, overwrite)
    cfg = recipe.train
    # Every check on the data runs before the output folder is touched: a bad row leaves the old run whole.
    encoder = Encoder(recipe, tokenizer, recipe.method.virtual_tokens)
    train_examples = encoder.encode_all(splits["train"], "training data")
    val_rows = splits["validation"][: cfg.eval_rows or None]
    encoder.check_rows(val_rows, "validation data")
    state = {"step": 0, "epoch": 0, "position": 0, "best": None, "best_step": 0, "tokens": 0, "seconds": 0.0,
             "wall_seconds": 0.0, "recipe_digest": recipe.digest(), "fingerprint": info.fingerprint}
    wall_start = time.perf_counter()
    if resume:
        saved = read_checkpoint_state(_checkpoint_dir(output) / "state.pt")  # weights_only: runs no code
        if saved["recipe_digest"] != recipe.digest():
            raise QPromptError(f"{output} was trained with different settings; resume with the same recipe and "
                               "options (only --max-steps may change), or train into a new --output")
        if saved["fingerprint"] != info.fingerprint:
            raise QPromptError(f"{output} was trained on another base model; resume with the same --model")
    else:
        saved = None
    prepare_output(output, resume, overwrite)
    model = add_soft_prompt(model, recipe, info.path, cfg.seed)
    if cfg.lean_memory and model.device.type == "cpu":
        return_freed_memory_to_the_os()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lean_gated_mlp(model)  # same outputs and gradients, a third fewer MLP activations kept for backward
    if saved is not None:
        # The adapter file holds only the encoder's *output*; training resumes from the encoder itself.
        model.prompt_encoder.load_state_dict(saved["prompt_encoder"])

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state.update({k: saved[k] for k in state})
        wall_start -= state["wall_seconds"]
        log.info("resuming at step %d of %d", state["step"], cfg.max_steps)
        drop_lines_after(output, state["step"])

    batch_size = min(cfg.batch_size, len(train_examples))
    metric_name = main_metric(recipe)
    owned.claim(output, METRICS)
    metrics_file = open(output / METRICS, "a")
    pad = tokenizer.pad_token_id

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> list[int]:
        """A shuffled order in which each run of batch_size rows has similar lengths (less padding)."""
        rng = random.Random(cfg.seed * 1000 + epoch)
        order = list(range(len(train_examples)))
        rng.shuffle(order)
        size, pool = batch_size, batch_size * 32
        groups = []
        for start in range(0, len(order), pool):  # sort within pools of 32 batches, then shuffle the batches
            chunk = sorted(order[start : start + pool], key=lambda i: len(train_examples[i].prompt_ids))
            groups += [chunk[j : j + size] for j in range(0, len(chunk) - size + 1, size)]
        rng.shuffle(groups)  # a last partial batch is dropped; the next epoch's shuffle covers its rows
        return [i for g in groups for i in g]

    def next_batch():
        order = epoch_order(state["epoch"])
        if state["position"] + batch_size > len(order):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            order = epoch_order(state["epoch"])
        picked = order[state["position"] : state["position"] + batch_size]
        state["position"] += batch_size
        return collate([train_examples[i] for i in picked], pad)

    def run_eval() -> float:
        model.eval()
        result = evaluate(model, tokenizer, recipe, val_rows, "validation data")
        model.train()
        value = float(result[metric_name])  # a plain float: state.pt must load with weights_only
        record = {"step": state["step"], "eval": value, "metric": metric_name, "rows": len(val_rows)}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if state["best"] is None or value > state["best"]:
            state["best"], state["best_step"] = value, state["step"]
            save_best(model, output)
        return value

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not progress, desc="train", unit="step")
    window_tokens, window_start, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
    resume_at = (state["epoch"], state["position"])
    scope = contextlib.ExitStack()  # settings that hold for the training loop only
    libc = None  # glibc, on CPU: its heap is trimmed after every step
    if model.device.type == "cpu":
        scope.enter_context(grouped_query_sdpa())
        libc = glibc()
    try:
        while state["step"] < cfg.max_steps:
            step_start = time.perf_counter()
            resume_at = (state["epoch"], state["position"])  # where an interrupted step restarts
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(model.device) for k, v in next_batch().items()}
                logp, counts = target_logprobs(model, batch)
                loss = -logp.sum() / counts.sum()
                (loss / cfg.grad_accum).backward()
                loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
                n_tokens = int(batch["attention_mask"].sum())  # real tokens; virtual ones are not data
                window_tokens += n_tokens
                state["tokens"] += n_tokens
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if libc is not None:
                # Hand the heap's free pages back to the OS: otherwise freed activations stay resident, and
                # batches of other lengths carve up the freed space so the resident size creeps above one
                # step's needs (SmolLM2-135M nf4, batch 16, 20 steps: peak RSS 4.97 GiB without, 4.42 with).
                libc.malloc_trim(0)
            state["step"] += 1
            state["seconds"] += time.perf_counter() - step_start
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": state["step"], "loss": round(loss_sum / loss_n, 5),
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(window_tokens / elapsed, 1),
                          "tokens": window_tokens, "seconds": round(elapsed, 3)}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_tokens, window_start, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
            at_eval = cfg.eval_every and state["step"] % cfg.eval_every == 0
            if at_eval or state["step"] == cfg.max_steps:
                value = run_eval()
                bar.write(f"step {state['step']}: validation {metric_name} {value:.4f} (best {state['best']:.4f})")
                state["wall_seconds"] = time.perf_counter() - wall_start
                save_checkpoint(model, optimizer, scheduler, state, output)
                window_start = time.perf_counter()  # evaluation time is not training throughput
    except KeyboardInterrupt:
        state["epoch"], state["position"] = resume_at
        optimizer.zero_grad(set_to_none=True)
        state["wall_seconds"] = time.perf_counter() - wall_start
        save_checkpoint(model, optimizer, scheduler, state, output)
        metrics_file.close()
        plot_loss(output)
        raise QPromptError(f"interrupted at step {state['step']}; checkpoint saved in {output}/{CHECKPOINT}: "
                           "continue with --resume") from None
    finally:
        bar.close()
        scope.close()
    metrics_file.close()
    plot_loss(output)

    training = {"steps": state["step"], "best_step": state["best_step"], "seconds": round(state["seconds"], 1),
                "wall_seconds": round(time.perf_counter() - wall_start, 1),
                "tokens": state["tokens"], "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
                "trainable_parameters": trainable_parameters(model), "train_rows": len(train_examples),
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    metrics = {f"validation_{metric_name}": state["best"], "validation_rows": len(val_rows)}
    fields = template_fields(recipe.template.prompt) + [recipe.data.label_field]
    samples = [{f: row[f] for f in fields} for row in splits["validation"][:4]]
    data = manifest(info, recipe, metrics, training, samples)
    owned.claim(output, MANIFEST, MANIFEST + ".partial")
    write_json(output / MANIFEST, data)
    return data
