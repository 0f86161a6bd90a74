"""The training loop: AdamW on the soft prompt only, the base model frozen.

Warm-up then cosine decay, gradient accumulation, periodic evaluation that keeps the best prompt (the latest
within noise of the best), a metrics log and loss curve, and a checkpoint after every evaluation (written
atomically) so an interrupted run continues with `--resume` exactly where it stopped. `train` runs a `Trainer`
through its steps: setup, train (which evaluates and checkpoints), save.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import owned
from .artifact import MANIFEST, manifest, read_checkpoint_state, write_json
from .config import RecipeConfig
from .data import Encoder, collate, template_fields
from .deploy.manifest import EXPORT_MANIFEST
from .errors import Interrupted, QPromptError
from .evaluate import evaluate as evaluate_rows
from .evaluate import main_metric
from .forward import target_logprobs
from .memory import PeakMemory, enable_gradient_checkpointing, training_settings
from .methods import add_soft_prompt, trainable_parameters
from .models import ModelInfo
from .tracking import FILES as TRACKER_FILES
from .tracking import Report, Tracking
from .transfer import copy_prompt, start_prompt

log = logging.getLogger("qprompt")
CHECKPOINT = "checkpoint"
CHECKPOINTS = (CHECKPOINT, CHECKPOINT + ".partial", CHECKPOINT + ".old")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT needs; not its README.md
METRICS = "metrics.jsonl"
# Every name training may create in --output, temporary ones included; nothing else there is ever touched.
RUN_NAMES = frozenset({*ADAPTER_FILES, MANIFEST, MANIFEST + ".partial", METRICS, METRICS + ".partial", "loss.png",
                       ".best.partial", *CHECKPOINTS, *(n for names in TRACKER_FILES.values() for n in names),
                       "baselines"})  # `qprompt job --baselines lora,full`: their artifacts


def lr_lambda(cfg) -> callable:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The random stream that orders one epoch's rows."""
    return random.Random(seed * 1000 + epoch)


def shuffled_rows(count: int, rng: random.Random) -> list[int]:
    """Every row index once, in the random order an epoch visits them before grouping by length."""
    order = list(range(count))
    rng.shuffle(order)
    return order


def group_by_length(order: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[int]:
    """`order` regrouped so that each run of batch_size rows has similar lengths (less padding): sorted by length
    within pools of 32 batches, then the batches shuffled. A last partial batch is dropped; the next epoch's
    shuffle covers its rows."""
    pool, groups = batch_size * 32, []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        groups += [chunk[j : j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(groups)
    return [i for g in groups for i in g]


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
    owned.refuse_links(output, set(RUN_NAMES) | {owned.RECORD, owned.RECORD + ".partial"})
    if (output / EXPORT_MANIFEST).exists():
        raise QPromptError(f"{output} holds an export ({EXPORT_MANIFEST}), not a training run; train into a folder of "
                           "its own (qprompt never removes another kind's files)")
    mine = run_names(output)
    started = any((output / n).exists() for n in mine)
    if resume:
        if not _checkpoint_dir(output):
            raise QPromptError(f"nothing to resume in {output}: " + (
                "its run stopped before its first checkpoint; start it again with --overwrite" if started else
                "it holds no training run; run without --resume to start one"))
        return
    if started and not overwrite and not _checkpoint_dir(output) and not (output / MANIFEST).exists():
        raise QPromptError(f"{output} holds a run that stopped before its first checkpoint (nothing to resume); "
                           "pass --overwrite to start it again, or choose another --output")
    if started and not overwrite:
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


def read_metrics(output: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (training lines and evaluation lines)."""
    return [json.loads(x) for x in (output / METRICS).read_text().splitlines() if x.strip()]


def plot_loss(output: Path) -> None:
    """loss.png from metrics.jsonl: training loss per step and the validation metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(output)
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
          resume: bool = False, overwrite: bool = False, progress: bool = True, report: Report | None = None) -> dict:
    """Train the recipe's soft prompt on `model`; writes the artifact to `output`, returns its manifest."""
    trainer = Trainer(recipe, tokenizer, info, splits, Path(output), progress)
    trainer.setup(model, resume, overwrite, report)
    trainer.train()
    return trainer.save()


@dataclass
class LogWindow:
    """The steps since the last metrics line: their tokens, summed loss and when they began."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    loss_sum: float = 0.0
    losses: int = 0


class Trainer:
    """One training run in the steps of a torchtune recipe: setup (data, prompt, optimizer, or a checkpoint's),
    train (the step loop, which evaluates and checkpoints), evaluate, save (the manifest).

    `state` is what a checkpoint holds besides the prompt, optimizer, scheduler and random streams."""

    def __init__(self, recipe: RecipeConfig, tokenizer, info: ModelInfo, splits: dict[str, list[dict]], output: Path,
                 progress: bool = True):
        self.recipe, self.cfg, self.tokenizer, self.info = recipe, recipe.train, tokenizer, info
        self.splits, self.output, self.progress = splits, output, progress
        self.metric_name = main_metric(recipe)

    def setup(self, model, resume: bool = False, overwrite: bool = False, report: Report | None = None) -> None:
        """Check the output folder and the data, then put the prompt on `model` and build its optimizer, both
        restored from the last checkpoint when resuming; the output folder is touched only after every check.
        `report`: the experiment trackers the run also logs to."""
        check_output(self.output, resume, overwrite)
        self._encode_data()
        self.epoch_order = functools.lru_cache(maxsize=2)(self._epoch_order)
        self.state = {"step": 0, "epoch": 0, "position": 0, "best": None, "best_step": 0, "kept": None,
                      "kept_step": 0, "tokens": 0,
                      "seconds": 0.0, "wall_seconds": 0.0, "recipe_digest": self.digest(),
                      "fingerprint": self.info.fingerprint, "stale_evals": 0, "stopped": "", "tracking": {},
                      "peak_memory": 0}
        self.wall_start = time.perf_counter()
        saved = self._read_checkpoint() if resume else None
        method = self.recipe.method
        start = None  # resuming reads the checkpoint's prompt instead
        if method.init_from and saved is None:
            start = start_prompt(method.init_from, method.name, method.virtual_tokens, self.info.fingerprint)
        prepare_output(self.output, resume, overwrite)
        self._add_prompt(model, saved, start)
        self._build_optimizer(saved)
        owned.claim(self.output, METRICS)
        self.metrics_file = open(self.output / METRICS, "a")
        report = report or Report()
        owned.claim(self.output, *(name for tracker in report.to for name in TRACKER_FILES.get(tracker, ())))
        self.tracking = Tracking(report, self.output, self.output.name, self.recipe.to_dict(),
                                 self.state["step"] if saved is not None else None, self.state["tracking"])
        self.state["tracking"] = self.tracking.state()  # a resumed run goes on in the same MLflow run

    def _encode_data(self) -> None:
        encoder = Encoder(self.recipe, self.tokenizer, self.recipe.method.virtual_tokens)
        self.examples = encoder.encode_all(self.splits["train"], "training data")
        self.val_rows = self.splits["validation"][: self.cfg.eval_rows or None]
        encoder.check_rows(self.val_rows, "validation data")
        self.batch_size = min(self.cfg.batch_size, len(self.examples))

    def digest(self) -> str:
        """What a checkpoint must have been trained with to be resumed here."""
        return self.recipe.digest()

    def _read_checkpoint(self) -> dict:
        saved = read_checkpoint_state(_checkpoint_dir(self.output) / "state.pt")  # weights_only: runs no code
        if saved["recipe_digest"] != self.digest():
            raise QPromptError(f"{self.output} was trained with different settings; resume with the same recipe and "
                               "options (only --max-steps may change), or train into a new --output")
        if saved["fingerprint"] != self.info.fingerprint:
            raise QPromptError(f"{self.output} was trained on another base model; resume with the same --model")
        return saved

    def _add_prompt(self, model, saved: dict | None, start=None) -> None:
        self.model = model = add_soft_prompt(model, self.recipe, self.info.path, self.cfg.seed)
        if start is not None:
            copy_prompt(model, start)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if saved is not None:
            # The adapter file holds only the encoder's *output*; training resumes from the encoder itself.
            model.prompt_encoder.load_state_dict(saved["prompt_encoder"])

    def _build_optimizer(self, saved: dict | None) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))
        if saved is None:
            return
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        # A key newer than the checkpoint keeps its starting value.
        self.state.update({k: saved.get(k, v) for k, v in self.state.items()})
        if "kept" not in saved:  # a checkpoint from when the artifact always kept the best prompt
            self.state["kept"], self.state["kept_step"] = saved["best"], saved["best_step"]
        self.state["stopped"] = ""  # a stopped run resumed with a higher cap or patience goes on
        self.wall_start -= self.state["wall_seconds"]
        log.info("resuming at step %d of %d", self.state["step"], self.cfg.max_steps)
        drop_lines_after(self.output, self.state["step"])

    def train(self) -> None:
        """Steps up to max_steps, evaluating and checkpointing every eval_every steps and at the end, and stopping
        sooner when `patience` evaluations in a row bring no new best. Ctrl-C checkpoints at the start of the
        interrupted step and ends in a QPromptError that says how to resume."""
        cfg, state = self.cfg, self.state
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not self.progress, desc="train", unit="step")
        self.window = LogWindow()
        resume_at = (state["epoch"], state["position"])
        scope = contextlib.ExitStack()  # settings that hold for the training loop only
        after_step = scope.enter_context(training_settings(self.model, cfg.lean_memory))
        memory = scope.enter_context(PeakMemory(self.model.device))
        try:
            if state["step"] == 0 and state["best"] is None and self.recipe.method.init_from:
                # A prompt started from another artifact is already a candidate: training keeps it unless a step
                # does better (adapting an nf4 prompt to int4 with a high learning rate can first make it worse).
                value = self.evaluate()
                bar.write(f"step 0 (the prompt of {self.recipe.method.init_from}): validation {self.metric_name} "
                          f"{value:.4f}")
            while not self._stop_reason():
                resume_at = (state["epoch"], state["position"])  # where an interrupted step restarts
                self._step(after_step)
                bar.update(1)
                if state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps:
                    bar.set_postfix(self._log_window())
                if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or state["step"] == cfg.max_steps:
                    value = self.evaluate()
                    bar.write(f"step {state['step']}: validation {self.metric_name} {value:.4f} "
                              f"(best {state['best']:.4f}; keeping the prompt of step {state['kept_step']})")
                    if self._stop_reason() == "patience":
                        bar.write(f"step {state['step']}: no new best in {state['stale_evals']} evaluations "
                                  f"(patience {cfg.patience}); stopping with the prompt of step {state['kept_step']}")
                    self._checkpoint()
                    self.window.start = time.perf_counter()  # evaluation time is not training throughput
            state["stopped"] = self._stop_reason()
        except KeyboardInterrupt:
            state["epoch"], state["position"] = resume_at
            self.optimizer.zero_grad(set_to_none=True)
            self._checkpoint()
            self._close_log()
            raise Interrupted(f"interrupted at step {state['step']}; checkpoint saved in {self.output}/{CHECKPOINT}: "
                               "continue with --resume") from None
        finally:
            bar.close()
            scope.close()
            state["peak_memory"] = max(state["peak_memory"], memory.peak)  # the highest of the run's processes
        self._close_log()

    def _stop_reason(self) -> str:
        """Why the run stops now ("max_steps" or "patience"), or "" while it goes on."""
        state, cfg = self.state, self.cfg
        if state["step"] >= cfg.max_steps:
            return "max_steps"
        if cfg.patience and cfg.eval_every and state["stale_evals"] >= cfg.patience:
            return "patience"
        return ""

    def _step(self, after_step: Callable[[], None]) -> None:
        """One optimizer step: grad_accum micro-batches forward and backward, then clip and update."""
        cfg, state, window = self.cfg, self.state, self.window
        step_start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(self.model.device) for k, v in self._next_batch().items()}
            logp, counts = target_logprobs(self.model, batch)
            loss = -logp.sum() / counts.sum()
            (loss / cfg.grad_accum).backward()
            window.loss_sum, window.losses = window.loss_sum + loss.item(), window.losses + 1
            n_tokens = int(batch["attention_mask"].sum())  # real tokens; virtual ones are not data
            window.tokens += n_tokens
            state["tokens"] += n_tokens
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        after_step()
        state["step"] += 1
        state["seconds"] += time.perf_counter() - step_start

    def _epoch_order(self, epoch: int) -> list[int]:
        """A shuffled order in which each run of batch_size rows has similar lengths (less padding)."""
        rng = epoch_rng(self.cfg.seed, epoch)
        order = self._epoch_rows(epoch, rng)
        return group_by_length(order, [len(e.prompt_ids) for e in self.examples], self.batch_size, rng)

    def _epoch_rows(self, epoch: int, rng: random.Random) -> list[int]:
        """The training examples one epoch visits, shuffled: all of them."""
        return shuffled_rows(len(self.examples), rng)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self._next_rows()], self.tokenizer.pad_token_id)

    def _next_rows(self) -> list[int]:
        """The indices of the next batch's examples; the data order moves on."""
        state = self.state
        order = self.epoch_order(state["epoch"])
        if state["position"] + self.batch_size > len(order):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            order = self.epoch_order(state["epoch"])
        picked = order[state["position"] : state["position"] + self.batch_size]
        state["position"] += self.batch_size
        return picked

    def _log_window(self) -> dict[str, str]:
        """Write the metrics line of the steps since the last one; returns what the progress bar shows."""
        window = self.window
        elapsed = time.perf_counter() - window.start
        record = {"step": self.state["step"], "loss": round(window.loss_sum / window.losses, 5),
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(window.tokens / elapsed, 1),
                  "tokens": window.tokens, "seconds": round(elapsed, 3)}
        self._write_metrics(record)
        self.window = LogWindow()
        return {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:.0f}"}

    def _write_metrics(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        self.tracking.log_record(record)

    def evaluate(self) -> float:
        """The validation metric of the prompt now. A new best resets patience; the artifact takes this prompt when it
        is within keep_within_se standard errors of the best so far. Keeping the strictly best picks by noise: on 400
        rows one row is 0.25 points, and the top of several noisy scores is biased high, while a later prompt has
        trained longer on a decayed learning rate (spam: the prompt of step 165 led step 220's by one validation row
        and scored 0.8 points lower on 1000 test rows)."""
        self.model.eval()
        value, details = self._validate()
        self.model.train()
        state = self.state
        self._write_metrics({"step": state["step"], "eval": value, **details})
        new_best = state["best"] is None or value > state["best"]
        if new_best:
            state["best"], state["best_step"], state["stale_evals"] = value, state["step"], 0
        else:
            state["stale_evals"] += 1
        margin = self.cfg.keep_within_se * details.get("standard_error", 0.0)
        if new_best or (margin > 0 and value >= state["best"] - margin):
            state["kept"], state["kept_step"] = value, state["step"]
            save_best(self.model, self.output)
        return value

    def _validate(self) -> tuple[float, dict]:
        """(the validation metric, what its metrics line records besides)."""
        result = evaluate_rows(self.model, self.tokenizer, self.recipe, self.val_rows, "validation data")
        # Plain floats: state.pt must load with weights_only.
        return float(result[self.metric_name]), {"metric": self.metric_name, "rows": len(self.val_rows),
                                                 "standard_error": float(result[self.metric_name + "_se"])}

    def _manifest_extra(self) -> dict:
        """Keys a kind of run adds to its manifest (a multitask run: its tasks)."""
        return {}

    def _checkpoint(self) -> None:
        self.state["wall_seconds"] = time.perf_counter() - self.wall_start
        save_checkpoint(self.model, self.optimizer, self.scheduler, self.state, self.output)

    def _close_log(self) -> None:
        self.metrics_file.close()
        plot_loss(self.output)

    def save(self) -> dict:
        """Write the artifact's manifest (its prompt is the kept one, saved at evaluation) and return it."""
        cfg, state = self.cfg, self.state
        training = {"steps": state["step"], "best_step": state["best_step"], "kept_step": state["kept_step"],
                    "stopped": state["stopped"],
                    "peak_memory_gb": round(state["peak_memory"] / 1024**3, 3),
                    "seconds": round(state["seconds"], 1),
                    "wall_seconds": round(time.perf_counter() - self.wall_start, 1), "tokens": state["tokens"],
                    "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
                    "trainable_parameters": trainable_parameters(self.model), "train_rows": len(self.examples),
                    "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
        metrics = {f"validation_{self.metric_name}": state["kept"], "validation_rows": len(self.val_rows)}
        fields = template_fields(self.recipe.template.prompt) + [self.recipe.data.label_field]
        samples = [{f: row[f] for f in fields} for row in self.splits["validation"][:4]]
        data = {**manifest(self.info, self.recipe, metrics, training, samples), **self._manifest_extra()}
        owned.claim(self.output, MANIFEST, MANIFEST + ".partial")
        write_json(self.output / MANIFEST, data)
        self.tracking.finish(self.output)
        return data
