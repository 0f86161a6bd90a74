"""The `qprompt` command line: a thin layer over the package's functions.

Every problem the user can fix arrives as a QPromptError and is printed as one `error:` line with
exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from .baselines import BUDGETS, DEFAULT_BASELINES
from .deploy.runtime import QUANTIZATIONS
from .errors import QPromptError
from .methods import METHODS, method_names, option_choices
from .models import ALIASES, DEFAULT_MODEL, QUANTS

log = logging.getLogger("qprompt")


# What `pip install qprompt[train]` adds to the plain (deploy) install: training, artifacts, export.
TRAIN_PACKAGES = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub", "safetensors",
                  "onnx", "onnxscript", "gguf", "matplotlib", "tqdm"}


class _FriendlyErrors:
    """Print a QPromptError as one `error:` line (exit 2) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QPromptError as exc:  # ExportError too: one family
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in TRAIN_PACKAGES:
                raise
            # The deploy-only install runs exports; everything that loads a PyTorch model needs the extra.
            what = f"qprompt {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "this command"
            click.echo(f"error: `{what}` needs the training packages ({exc.name} is not installed): "
                       "pip install 'qprompt[train]'", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


class QPromptGroup(_FriendlyErrors, click.Group):
    pass


class QPromptCommand(_FriendlyErrors, click.Command):
    pass


def check_output_file(path: str | None, option: str) -> None:
    """Fail before the work, not after it, when a file option points into a folder that is not there."""
    if path is None:
        return
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise QPromptError(f"{option} {path}: folder {parent} {what}; create the folder or choose another path")


def check_output_folder(path: str | Path, option: str) -> None:
    """A folder option whose path runs through a file cannot be created: say so before the work."""
    blocker = next((p for p in Path(path).absolute().parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise QPromptError(f"{option} {path}: {blocker} is a file, not a folder; choose another path")


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="qprompt: %(message)s")
    log.setLevel(logging.INFO)
    # PEFT calls a transformers method that warns about its own deprecation on every load.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # PEFT 0.21 hands prefix tuning's prefix to transformers under its old name, which 5.24 still takes.
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated.*", category=FutureWarning)
    # torch's ONNX exporter notes about its own internals (pytree's LeafSpec, merged dynamic axis names).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used.*", category=UserWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes


@click.group(cls=QPromptGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qprompt")
def main() -> None:
    """Train soft prompts on 4/8-bit LLMs, evaluate them, and ship them to the edge."""
    terminate_like_ctrl_c(click.get_current_context())


def terminate_like_ctrl_c(ctx: click.Context) -> None:
    """`kill PID` (SIGTERM: what job schedulers, `docker stop` and systemd send) ends a command the way Ctrl-C
    does: training saves its checkpoint, a tune ends its study cleanly. Background jobs of a non-interactive shell
    ignore SIGINT, so SIGTERM is often the only polite signal they get. The previous handler comes back when the
    command ends (tests invoke the CLI in-process)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


class MethodChoice(click.Choice):
    """--method: one of the registered methods, read when the option is parsed (a method registered after
    this module was imported is a choice too)."""

    def __init__(self):
        super().__init__(method_names())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(method_names())

    @choices.setter
    def choices(self, _value) -> None:
        pass  # click.Choice.__init__ sets it; the registry stays the source


def _suggested_rates() -> str:
    return ", ".join(f"{m.name} {m.suggested_lr:g}" for m in METHODS.values())


# Options shared by the commands that load a base model.
def model_options(fn):
    fn = click.option("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available).")(fn)
    fn = click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                      show_default=True, help="Dtype of the computation (auto: float32 on CPU, bfloat16 on CUDA).")(fn)
    fn = click.option("--quant", type=click.Choice(QUANTS), default=None,
                      help="Quantize the base with bitsandbytes: nf4/fp4 (4-bit, double quant), int8, none "
                      "[default: the recipe's, or the artifact's].")(fn)
    return fn


# Experiment trackers a training run also logs to (qprompt/tracking.py).
report_option = click.option("--report-to", type=click.Choice(["tensorboard", "mlflow"]), multiple=True,
                             help="Also log the run to TensorBoard (OUTPUT/tensorboard) or MLflow (OUTPUT/mlflow.db, "
                                  "or MLFLOW_TRACKING_URI); repeatable. Needs the `track` extra.")


# Any recipe key from the command line, after the options: `qprompt job sentiment train.patience=5 method.init=labels`.
settings_argument = click.argument("settings", nargs=-1, metavar="[SECTION.KEY=VALUE]...")


# The main job's options (`qprompt job` and every recipe script): the recipe's YAML gives the defaults.
def job_options(default_output: str):
    def apply(fn):
        options = [
            click.option("--model", type=str, default=None, help="Base model [default: the recipe's]."),
            model_options,
            click.option("--method", type=MethodChoice(), default=None, help="Soft-prompt method [default: the "
                         "recipe's]."),
            click.option("--data", type=str, default=None, help="Training rows [default: the recipe's source]."),
            click.option("--eval-data", type=str, default=None, help="Validation rows [default: held out]."),
            click.option("--test-data", type=str, default=None,
                         help="Test rows [default: held out from the source]."),
            click.option("--test-limit", type=click.IntRange(1), default=None,
                         help="Score only the first N test rows."),
            click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps."),
            click.option("--virtual-tokens", type=click.IntRange(1), default=None, help="Number of virtual tokens."),
            click.option("--init-from", type=click.Path(file_okay=False), default=None,
                         help="Start from this artifact's learned prompt (e.g. a `qprompt multitask` one)."),
            click.option("--lr", type=float, default=None, help="Peak learning rate [default: the recipe's; for "
                         f"another --method, the rate measured for it: {_suggested_rates()}]."),
            click.option("--output", type=click.Path(file_okay=False), default=default_output, show_default=True,
                         help="Artifact folder."),
            click.option("--resume", is_flag=True, help="Continue an interrupted run in --output."),
            click.option("--overwrite", is_flag=True, help="Train again even if --output holds a trained prompt."),
            click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
                         help="Write the results."),
            click.option("--baselines", type=str, default=",".join(DEFAULT_BASELINES), show_default=True,
                         help="What the soft prompt is compared with, comma-separated: hard (the hand-written "
                              "prompt), kshot (with 4 demonstrations), lora (LoRA on the same quantized base) and "
                              "full (full fine-tuning, unquantized); the last two each cost a training run."),
            click.option("--baseline-budget", type=click.Choice(BUDGETS), default="steps", show_default=True,
                         help="lora/full train as many steps as the soft prompt took, or as long as it trained "
                              "(time: the comparison at equal training wall time)."),
            report_option,
            settings_argument,
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _job(recipe, model, quant, compute_dtype, device, method, data, eval_data, test_data, test_limit, max_steps,
         virtual_tokens, init_from, lr, output, resume, overwrite, json_out, baselines, baseline_budget, report_to,
         settings):
    """The recipe with the options' overrides and the settings (SECTION.KEY=VALUE, applied last), and the job's
    options; both checked before any work."""
    from .baselines import parse_baselines
    from .config import apply_settings, override
    from .methods import learning_rate_for
    from .pipeline import JobOptions

    quiet_libraries()
    check_output_file(json_out, "--json")
    check_output_folder(output, "--output")
    recipe = override(recipe, model=model, quant=quant, method__name=method, train__max_steps=max_steps,
                      method__virtual_tokens=virtual_tokens, method__init_from=init_from,
                      train__lr=learning_rate_for(method, recipe, lr))
    recipe = apply_settings(recipe, settings)
    return recipe, JobOptions(output, data, eval_data, test_data, test_limit, resume, overwrite, compute_dtype,
                              device, json_out, tuple(report_to), parse_baselines(baselines), baseline_budget)


def recipe_script(config_path: Path):
    """Turn a recipe script's `main(recipe, job) -> result` into its command line: the YAML at `config_path` gives
    the defaults, the job options override them, and the result's comparison table is printed."""

    def wrap(steps):
        @click.command(cls=QPromptCommand, help=f"Train the {config_path.stem} soft prompt and compare it with the "
                       "hand-written prompt on the test rows.")
        @job_options(f"runs/{config_path.stem}")
        def command(**options):
            from .config import load_recipe_file
            from .pipeline import report_lines

            recipe, job = _job(load_recipe_file(config_path), **options)
            click.echo("\n".join(report_lines(steps(recipe, job))))

        return command

    return wrap


@main.command()
@click.argument("recipe_name", metavar="RECIPE")
@job_options("runs/job")
def job(recipe_name, **options):
    """The main job: train RECIPE's soft prompt (a name from `qprompt recipes` or a YAML file), then compare it with
    the hand-written prompt on the same test rows. `python recipes/NAME.py` runs the same steps. Any recipe key can
    be set after the options as SECTION.KEY=VALUE (the YAML's names, read as YAML; applied last):
    train.patience=5 method.init=labels."""
    from .config import load_recipe
    from .pipeline import report_lines, train_and_compare

    recipe, job_ = _job(load_recipe(recipe_name), **options)
    click.echo("\n".join(report_lines(train_and_compare(recipe, job_))))


@main.command()
@click.argument("recipe_name", metavar="RECIPE")
@click.option("--trials", type=click.IntRange(1), default=20, show_default=True,
              help="Finished trials the study should hold, earlier runs' included (a resumed tune runs the rest).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Tune folder: trials/, best/, trials.csv, tune.png, study.db [default: runs/tune-RECIPE].")
@click.option("--storage", type=str, default=None,
              help="The study's database as a SQLAlchemy URL, to share one study between terminals or machines "
                   "(e.g. postgresql://host/db) [default: sqlite:///OUTPUT/study.db].")
@click.option("--study-name", type=str, default=None, help="The study's name in the database [default: RECIPE].")
@click.option("--budget-minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="Start no trial after this many minutes (the running one finishes).")
@click.option("--methods", type=str, default=None,
              help="Comma-separated methods to search [default: every single-task method].")
@click.option("--model", "model_name", type=str, default=None, help="Base model [default: the recipe's].")
@model_options
@click.option("--data", type=str, default=None, help="Training rows [default: the recipe's source].")
@click.option("--eval-data", type=str, default=None, help="Validation rows the trials are scored on "
              "[default: held out from the training rows].")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Each trial's step cap [default: the "
              "recipe's].")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="The sampler's seed.")
@report_option
@settings_argument
def tune(recipe_name, trials, output, storage, study_name, budget_minutes, methods, model_name, quant, compute_dtype,
         device, data, eval_data, max_steps, seed, report_to, settings):
    """Search RECIPE's soft-prompt settings with Optuna (method, learning rate, virtual tokens, init, the method's
    options), pruning trials that fall behind; the best trial's artifact is copied to OUTPUT/best. The study lives in
    a database, so a killed tune resumes and several terminals can share it (`optuna-dashboard` shows it)."""
    from .config import apply_settings, load_recipe, override
    from .data import check_splits, load_splits
    from .models import load_model
    from .tune import TUNED_METHODS, TuneOptions
    from .tune import tune as run_tune

    quiet_libraries()
    recipe = apply_settings(override(load_recipe(recipe_name), model=model_name, quant=quant,
                                     train__max_steps=max_steps), settings)
    output = Path(output or f"runs/tune-{recipe.name}")
    check_output_folder(output, "--output")
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else TUNED_METHODS
    options = TuneOptions(output, trials, storage, study_name, budget_minutes, chosen, seed=seed,
                          report_to=tuple(report_to))
    splits = load_splits(recipe, data, eval_data)
    check_splits(recipe, splits, data, eval_data)
    summary = run_tune(recipe, splits, options,
                       lambda cfg: load_model(cfg.model, cfg.quant, compute_dtype, device))
    metric = summary["metric"]
    click.echo(f"{'trial':>5}  {'state':<8} {metric:>8}  {'method':<15} {'lr':>8} {'tokens':>6}  {'init':<7} "
               f"{'steps':>5}  stopped")
    for r in summary["trials"]:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        click.echo(f"{r['trial']:>5}  {r['state']:<8} {value:>8}  {r['method'] or '':<15} {r['lr'] or '':>8} "
                   f"{r['virtual_tokens'] or '':>6}  {r['init']:<7} {r['steps'] or '':>5}  {r['stopped']}")
    best = summary["best"]
    if best is None:
        raise QPromptError(f"no trial of study {summary['study']} finished; see the warnings above")
    click.echo(f"best: trial {best['trial']}, validation {metric} {best['value']:.4f} ({best['params']}); "
               f"artifact {best['artifact']}; table {output}/trials.csv, plot {output}/tune.png")


@main.command()
@click.option("--model", "model_name", type=str, default=None,
              help=f"Base model: alias ({', '.join(ALIASES)}), hub id or local folder [default: the recipe's].")
@click.option("--recipe", type=str, default=None, help="Recipe name (see `qprompt recipes`) [default: sentiment].")
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="A recipe YAML file instead of --recipe.")
@click.option("--data", type=str, default=None,
              help="Training rows: .jsonl/.csv/.tsv file or hf:NAME[:SPLIT] [default: the recipe's source].")
@click.option("--eval-data", type=str, default=None,
              help="Validation rows [default: held out from the training rows].")
@model_options
@click.option("--method", type=MethodChoice(), default=None,
              help=f"Soft-prompt method: {', '.join(m.help for m in METHODS.values())}.")
@click.option("--encoder", type=click.Choice(option_choices("encoder")), default=None, help="P-tuning prompt encoder.")
@click.option("--prefix-projection/--no-prefix-projection", default=None,
              help="Prefix tuning: learn the prefix through an MLP, or directly (deep prompts).")
@click.option("--virtual-tokens", type=click.IntRange(1), default=None, help="Number of virtual tokens.")
@click.option("--init", type=click.Choice(["text", "labels", "vocab", "random"]), default=None,
              help="Initialisation (prompt tuning, and prefix tuning without projection: keys/values of the tokens): "
                   "instruction text, label words, random words, random.")
@click.option("--init-from", type=click.Path(file_okay=False), default=None,
              help="Start from this artifact's learned prompt (e.g. a `qprompt multitask` one) instead of --init.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Examples per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(1), default=None, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate [default: the recipe's; with a --method other than the recipe's, the rate "
                   f"measured to work for that method: {_suggested_rates()}].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward pass: much less memory, ~30% slower (see `qprompt plan`).")
@click.option("--lean-memory/--no-lean-memory", default=None,
              help="CPU: return freed activation memory to the OS at once (peak RSS -40%, ~30% slower).")
@click.option("--eval-every", type=click.IntRange(0), default=None, help="Evaluate every N steps (0: at the end).")
@click.option("--max-length", type=click.IntRange(8), default=None, help="Most tokens in one example.")
@click.option("--on-long", type=click.Choice(["truncate", "error"]), default=None,
              help="Over-long examples: truncate the prompt (with a warning) or stop with an error.")
@click.option("--seed", type=int, default=None, help="Seed for initialisation and data order.")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Artifact folder [default: runs/RECIPE-METHOD-QUANT].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --output from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --output.")
@report_option
@settings_argument
def train(model_name, recipe, config, data, eval_data, quant, compute_dtype, device, method, encoder,
          prefix_projection, virtual_tokens, init, init_from,
          max_steps, batch_size, grad_accum, lr, gradient_checkpointing, lean_memory, eval_every, max_length, on_long,
          seed, output, resume, overwrite, report_to, settings):
    """Train a soft prompt; the base model stays frozen. Any recipe key can be set after the options as
    SECTION.KEY=VALUE (the YAML's names, read as YAML; applied last): train.patience=5 method.init=labels."""
    from .config import apply_settings, load_recipe, override
    from .data import check_splits, load_splits
    from .methods import learning_rate_for
    from .models import load_model
    from .tracking import Report
    from .train import train as run_training

    quiet_libraries()
    if recipe and config:
        raise QPromptError("pass either --recipe or --config, not both")
    cfg = load_recipe(config or recipe or "sentiment")
    lr = learning_rate_for(method, cfg, lr)
    cfg = override(cfg, model=model_name, quant=quant, method__name=method, method__encoder=encoder,
                   method__prefix_projection=prefix_projection, method__virtual_tokens=virtual_tokens,
                   method__init=init, method__init_from=init_from, train__max_steps=max_steps,
                   train__batch_size=batch_size,
                   train__grad_accum=grad_accum, train__lr=lr, train__eval_every=eval_every, train__seed=seed,
                   train__gradient_checkpointing=gradient_checkpointing, train__lean_memory=lean_memory,
                   data__max_length=max_length, data__on_long=on_long)
    cfg = apply_settings(cfg, settings)
    output = Path(output or f"runs/{cfg.name}-{cfg.method.name}-{cfg.quant}")
    check_output_folder(output, "--output")
    splits = load_splits(cfg, data, eval_data)
    check_splits(cfg, splits, data, eval_data)  # bad rows fail now, not after the model load
    model, tokenizer, info = load_model(cfg.model, cfg.quant, compute_dtype, device)
    log.info("training %s on %s (%s, %s): %d training rows, %d validation rows", cfg.method.name, cfg.model,
             cfg.quant, info.device, len(splits["train"]), len(splits["validation"]))
    result = run_training(cfg, model, tokenizer, info, splits, output, resume=resume, overwrite=overwrite,
                          report=Report(tuple(report_to)))
    t, m = result["training"], result["metrics"]
    metric = next(k for k in m if k.startswith("validation_") and k != "validation_rows")
    click.echo(f"saved soft prompt to {output} ({metric.removeprefix('validation_')} {m[metric]:.4f} on "
               f"{m['validation_rows']} validation rows, prompt of step {t['kept_step']}; {t['steps']} steps in "
               f"{t['wall_seconds']:.0f} s, {t['tokens_per_s']:.0f} tokens/s)")


@main.command()
@click.argument("recipe_names", metavar="RECIPE...", nargs=-1, required=True)
@click.option("--output", type=click.Path(file_okay=False), required=True, help="Artifact folder.")
@click.option("--model", "model_name", type=str, default=None, help="Base model [default: the first recipe's].")
@model_options
@click.option("--data", "data", multiple=True, metavar="RECIPE=FILE",
              help="A recipe's training rows instead of its source (repeatable).")
@click.option("--method", type=click.Choice(["prompt-tuning", "multitask-prompt-tuning"]),
              default="multitask-prompt-tuning", show_default=True,
              help="The shared prompt times a per-task part (MPT), or one prompt shared by every task (SPoT); "
              "MPT scored higher on the source tasks and started a new task faster (docs/results.md).")
@click.option("--virtual-tokens", type=click.IntRange(1), default=20, show_default=True)
@click.option("--init", type=click.Choice(["text", "vocab", "random"]), default="vocab", show_default=True,
              help="Start from --init-text's tokens, random vocabulary words, or noise.")
@click.option("--init-text", type=str, default="", help="Text for --init text.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps [default: the first "
              "recipe's].")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Examples per micro-batch (tasks mixed).")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: the first recipe's].")
@click.option("--eval-every", type=click.IntRange(0), default=None, help="Evaluate every N steps (0: at the end).")
@click.option("--seed", type=int, default=None, help="Seed for initialisation and data order.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --output.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --output.")
@report_option
def multitask(recipe_names, output, model_name, quant, compute_dtype, device, data, method, virtual_tokens, init,
              init_text, max_steps, batch_size, lr, eval_every, seed, resume, overwrite, report_to):
    """Train one prompt on several recipes' rows at once; start a new task from it with `train --init-from`."""
    from .config import MethodConfig, load_recipe, override
    from .multitask import train_multitask
    from .tracking import Report

    quiet_libraries()
    check_output_folder(output, "--output")
    recipes = [override(load_recipe(name), model=model_name, quant=quant) for name in recipe_names]
    files = {}
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise QPromptError(f"--data {item!r}: write it as RECIPE=FILE, e.g. spam=sms.jsonl")
        files[name] = path
    shared = override(recipes[0], train__max_steps=max_steps, train__batch_size=batch_size, train__lr=lr,
                      train__eval_every=eval_every, train__seed=seed).train
    if init == "text" and not init_text:
        raise QPromptError("--init text needs --init-text (the tasks have no one instruction); or use --init vocab")
    spec = MethodConfig(name=method, virtual_tokens=virtual_tokens, init=init, init_text=init_text)
    result = train_multitask(recipes, spec, shared, output, files, resume, overwrite, compute_dtype, device,
                             report=Report(tuple(report_to)))
    tasks = ", ".join(f"{t['name']} {t['metric']} {t['validation']:.4f}" for t in result["multitask"]["tasks"]
                      if t["validation"] is not None)
    click.echo(f"saved multitask prompt to {output} (prompt of step {result['training']['kept_step']}: {tasks}); "
               f"start a task from it with `qprompt train --init-from {output}`")


@main.command("eval")
@click.argument("artifact", type=click.Path(), required=False)
@click.option("--data", type=str, default=None,
              help="Rows to score: .jsonl/.csv/.tsv or hf:NAME[:SPLIT] [default: the recipe's test split].")
@click.option("--baseline", type=click.Choice(["hard-prompt"]), default=None,
              help="Score the base model with the recipe's hand-written instruction instead of a soft prompt.")
@click.option("--model", "model_name", type=str, default=None, help="Base model [default: the artifact's/recipe's].")
@click.option("--recipe", type=str, default=None, help="Recipe name or YAML file (with --baseline).")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="A recipe YAML file instead of --recipe (with --baseline), as for `qprompt train`.")
@model_options
@click.option("--shots", type=click.IntRange(0), default=0, show_default=True,
              help="With --baseline: K demonstrations from the training rows before each input (k-shot).")
@click.option("--train-data", type=str, default=None,
              help="Where --shots draws demonstrations [default: the recipe's training split].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N rows.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Rows per forward pass.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the metrics and predictions to this JSON file.")
@click.option("--task", type=str, default=None, help="With an export of several tasks: which one to score.")
def eval_command(artifact, data, baseline, model_name, recipe, config, quant, compute_dtype, device, shots,
                 train_data, limit, batch_size, json_out, task):
    """Score a soft prompt (ARTIFACT) or the hard-prompt baseline on labelled rows."""
    check_output_file(json_out, "--json")
    if artifact and (Path(artifact) / "qprompt-export.json").is_file():
        if baseline or model_name or quant or recipe or config:
            raise QPromptError("an export folder carries its own model, prompt and recipe: drop "
                               "--baseline/--model/--quant/--recipe/--config")
        # ONNX Runtime only: torch is not imported
        return _eval_export(artifact, data, limit, batch_size, json_out, task)
    from .artifact import load_artifact, read_manifest, recipe_of
    from .config import load_recipe
    from .data import check_recipe_rows, demonstrations, load_splits, read_rows
    from .evaluate import evaluate
    from .models import load_model

    quiet_libraries()
    if (artifact is None) == (baseline is None):
        raise QPromptError("pass an ARTIFACT folder to score a soft prompt, or --baseline hard-prompt --recipe NAME")
    if shots and not baseline:
        raise QPromptError("--shots applies to the hard-prompt baseline: add --baseline hard-prompt")
    if (recipe or config) and not baseline:
        raise QPromptError("an artifact carries its own recipe: drop --recipe/--config (they apply to --baseline)")
    if recipe and config:
        raise QPromptError("pass either --recipe or --config, not both")
    # Read and check every input before loading a model, so a bad file fails in a second, not after a load.
    cfg = load_recipe(config or recipe or "sentiment") if baseline else recipe_of(read_manifest(artifact))
    rows = read_rows(data) if data else load_splits(cfg)["test"]
    rows = rows[:limit] if limit else rows
    check_recipe_rows(cfg, rows, data or f"{cfg.name} test split")
    demos = None
    if shots:
        pool = read_rows(train_data) if train_data else load_splits(cfg)["train"]
        demos = demonstrations(pool, shots, label_field=cfg.data.label_field)
        check_recipe_rows(cfg, demos, f"{train_data or cfg.name + ' training split'} (--shots demonstrations)")
    if baseline:
        model, tokenizer, _ = load_model(model_name or cfg.model, quant or cfg.quant, compute_dtype, device)
        what = f"hard-prompt {shots}-shot baseline ({model_name or cfg.model}, {quant or cfg.quant})"
    else:
        model, tokenizer, cfg, _ = load_artifact(artifact, model_name, quant, compute_dtype, device)
        what = f"soft prompt {artifact}"
    metrics = evaluate(model, tokenizer, cfg, rows, data or f"{cfg.name} test split", hard_prompt=bool(baseline),
                       batch_size=batch_size, shots=demos)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
    click.echo(f"{what}: {shown}  ({metrics['rows']} rows, {metrics['seconds']:.0f} s)")
    if json_out:
        Path(json_out).write_text(json.dumps({"what": what, **metrics}, indent=1) + "\n")


def _eval_export(folder, data, limit, batch_size, json_out, task=None):
    """`qprompt eval EXPORT_DIR`: the same report, computed by ONNX Runtime."""
    import time

    from .data import check_rows, read_rows
    from .deploy.manifest import ExportManifest
    from .deploy.runtime import Sampling
    from .metrics import task_metrics

    if data is None:
        raise QPromptError("scoring an export needs --data FILE with the recipe's fields and labels")
    m = ExportManifest.read(folder)
    t = m.task(task)
    rows = read_rows(data)[:limit]
    labels = t.label_targets if t.kind == "classification" else ()
    check_rows(rows, data, t.template.fields, t.label_field, labels)
    model = _open_export(folder)
    refs = [str(r[t.label_field]) for r in rows]
    start = time.perf_counter()
    # Over-long rows cut as the recipe's own evaluation cuts them: the same metric as `qprompt eval ARTIFACT`.
    if t.kind == "classification":
        preds = model.classify(rows, batch_size=batch_size, task=t.name, truncate=True)
    else:
        preds = model.generate(rows, Sampling(max_new_tokens=64), task=t.name, truncate=True)
    metrics = task_metrics(t.kind, preds, refs, list(t.label_targets))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    what = f"export {folder}{' task ' + t.name if len(m.tasks) > 1 else ''} ({m.quantization})"
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
    click.echo(f"{what}: {shown}  ({metrics['rows']} rows, {metrics['seconds']:.0f} s)")
    if json_out:
        Path(json_out).write_text(json.dumps({"what": what, **metrics, "predictions": preds}, indent=1) + "\n")


def _open_export(folder, model_file=None, providers=None):
    from .deploy.runtime import ExportedModel

    return ExportedModel(folder, model_file, providers)  # its ExportError is one `error:` line too


@main.command("export")
@click.argument("artifacts", nargs=-1, type=click.Path())
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Export folder to write (with one or more ARTIFACTS).")
@click.option("--name", "names", multiple=True,
              help="Task name, once per artifact in order [default: each artifact folder's name].")
@click.option("--multi-task", is_flag=True,
              help="A task graph (task_ids input) even for one artifact, so that tasks can be added later.")
@click.option("--prefix-slots", type=click.IntRange(1), default=None,
              help="Prefix slots per task in a task graph: the most virtual tokens a task added later may have "
                   "[default: the longest prompt's].")
@click.option("--add", "add", type=click.Path(), default=None,
              help="Add this artifact as one more task to the task graph in --to (earlier tasks unchanged).")
@click.option("--remove", "remove", type=str, default=None, help="Remove this task from the task graph in --to.")
@click.option("--ensemble", type=str, default=None,
              help="Also classify with the ARTIFACTS together under this name (prompts for one task, e.g. from "
                   "other seeds): the mean of their label probabilities; with --add, the new task joins it.")
@click.option("--to", "to", type=click.Path(file_okay=False), default=None, help="The export --add/--remove change.")
@click.option("--quantize", type=click.Choice(list(QUANTIZATIONS)), default="none", show_default=True,
              help="The graph's weights. int4/int8: weight-only blocks (MatMulNBits), int4 with the LM head and a tied "
                   "embedding too (train with --quant int4 so the prompt learns these very weights); int8-dynamic: "
                   "activations too; nf4/fp4: bitsandbytes' 4-bit weights (MatMulBnb4), identical to those an "
                   "nf4/fp4-trained prompt saw. The folder holds this graph only (see --keep-float).")
@click.option("--graph", type=click.Choice(["auto", "fused", "written"]), default="auto", show_default=True,
              help="fused: onnxruntime-genai's model builder makes the base's graph (GroupQueryAttention, fused q/k/v "
                   "and norms, quantized LM head) and the prompt goes into its KV cache; written: torch's exporter, "
                   "attention written out; auto: fused where the builder knows the model's family.")
@click.option("--keep-float", is_flag=True, help="With --quantize: also keep the float32 graph (model.onnx).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="int4/int8 compute: 4 = int8 activations (fastest on CPU), 1 = float32 (exact to the weights) "
                   "[default: 4].")
@click.option("--opset", type=click.IntRange(18), default=20, show_default=True,
              help="ONNX opset of the written-out graph.")
@click.option("--parity-tokens", type=click.IntRange(1), default=8, show_default=True,
              help="Greedy tokens that must match PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --output.")
def export_command(artifacts, output, names, multi_task, prefix_slots, add, remove, ensemble, to, quantize, graph,
                   keep_float, accuracy_level, opset, parity_tokens, overwrite):
    """Merge soft prompts into an ONNX graph (constant KV prefix) and check it against PyTorch.

    One artifact: a graph for its task (a LoRA adapter from `qprompt job --baselines lora`: merged into its
    base, exported the same way). Several (trained on the same base): one graph serving all of
    them, each row of a batch with its own task. --add/--remove change such a graph in place."""
    from .export import add_task, export, remove_task

    quiet_libraries()
    if add or remove:
        if artifacts or output or not to or (add and remove):
            raise QPromptError("use --add ARTIFACT --to EXPORT or --remove NAME --to EXPORT, without ARTIFACTS or "
                               "--output")
        if remove and ensemble:
            raise QPromptError("--ensemble goes with ARTIFACTS or --add; --remove takes a task out of its ensembles")
        data = add_task(add, to, names[0] if names else None, parity_tokens, ensemble) if add else \
            remove_task(to, remove)
        click.echo(f"{'added ' + data.tasks[-1].name + ' to' if add else 'removed ' + remove + ' from'} {to}: "
                   f"tasks {', '.join(data.task_names)}")
        return
    if not artifacts or not output:
        raise QPromptError("give ARTIFACTS and --output DIR (or --add/--remove with --to)")
    from .export.lora import export_lora, is_lora

    if any(is_lora(a) for a in artifacts):
        if len(artifacts) > 1 or multi_task or ensemble:
            raise QPromptError("a LoRA adapter is merged into its base and exports alone: give it as the only "
                               "ARTIFACT, without --multi-task or --ensemble")
        data = export_lora(artifacts[0], output, quantize, overwrite, parity_tokens, graph=graph,
                           keep_float=keep_float, accuracy_level=accuracy_level, opset=opset)
    else:
        data = export(list(artifacts), output, quantize, opset, overwrite, parity_tokens, names=list(names) or None,
                      multi_task=multi_task, prefix_slots=prefix_slots, graph=graph, keep_float=keep_float,
                      accuracy_level=accuracy_level, ensemble=ensemble)
    for task in data.tasks:
        p = task.parity
        twin = p.get("float_compute_twin")
        check = (f"float32-compute twin max |logit diff| {twin['max_abs_logit_diff']:.2e}, greedy tokens equal: "
                 f"{twin['greedy_tokens_equal']}; deployed graph: next token as PyTorch's on "
                 f"{p['next_token_agreement']:.0%}" if twin else
                 f"max |logit diff| {p['max_abs_logit_diff']:.2e}, greedy tokens equal: {p['greedy_tokens_equal']}"
                 + ("" if p["exact"] else f", next token as PyTorch's on {p['next_token_agreement']:.0%}"))
        click.echo(f"exported {task.source.get('artifact')} to {output}"
                   f"{' as task ' + task.name if data.task_ids_input else ''} ({data.graph} graph): {check} "
                   f"({p['prompts']} prompts)")
    for name, members in data.ensembles.items():
        click.echo(f"  ensemble {name}: {', '.join(members)} (the mean of their label probabilities)")
    total = sum(info["mb"] for info in data.files.values())
    for name, info in data.files.items():
        click.echo(f"  {name}: {info['quantization']}, {info['mb']:.1f} MB")
    click.echo(f"  {output}: {folder_mb(Path(output)):.1f} MB in all ({total:.1f} MB of graphs)")


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


@main.command("run")
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", type=str, default=None, help="One input (the recipe's template is applied).")
@click.option("--input", "input_file", type=click.Path(dir_okay=False), default=None,
              help="A .jsonl/.csv of rows with the template's fields, run as batches.")
@click.option("--raw", is_flag=True,
              help="Generate from --prompt as the full text, without the template (not with --input or --classify).")
@click.option("--classify", is_flag=True, help="Print the most likely label instead of generating.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 switches it off.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Sample from the most likely tokens whose probabilities sum to P; the most likely token is "
                   "always kept, so 0 is greedy.")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed for sampling (0 or more).")
@click.option("--stop", multiple=True, help="Stop a row's output at this string (repeatable).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--model-file", type=str, default=None, help="Which graph in the folder [default: the manifest's].")
@click.option("--task", type=str, default=None, help="With an export of several tasks: which one runs.")
def run_command(export_dir, prompt, input_file, raw, classify, max_new_tokens, temperature, top_k, top_p, seed,
                stop, batch_size, model_file, task):
    """Run an exported graph with ONNX Runtime (CUDA when onnxruntime-gpu is installed, else CPU)."""
    from .deploy.runtime import Sampling

    if prompt is not None and input_file is not None:
        raise QPromptError("pass --prompt TEXT or --input FILE, not both")
    if prompt is None and input_file is None:
        raise QPromptError("pass --prompt TEXT or --input FILE")
    if raw and (input_file or classify):
        # Rows of a file have fields, not one text; labels are scored after the template's prompt.
        raise QPromptError("--raw takes the text of --prompt as it is; it does not apply to --input or --classify: "
                           "drop --raw (the template is applied)")
    if raw and not prompt:
        raise QPromptError("--prompt is empty: with --raw give some text to continue")
    model = _open_export(export_dir, model_file)
    model.task(task)  # an unknown name, or none for an export of several tasks: one clear line now
    if input_file:
        from .data import check_rows, read_rows

        inputs = read_rows(input_file)
        check_rows(inputs, input_file, model.fields(task))
    else:
        inputs = [prompt]
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop))
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        outputs = model.classify(chunk, task=task) if classify else model.generate(chunk, sampling, raw=raw, task=task)
        for out in outputs:
            click.echo(json.dumps(out) if input_file else out)


@main.command()
@click.argument("export_dir", type=click.Path())
@click.option("--host", type=str, default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; there is no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=click.IntRange(1), default=16, show_default=True,
              help="Rows in one forward pass; 1 serves one request at a time.")
@click.option("--batch-window-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long an idle server waits for more requests to share the first forward pass.")
@click.option("--max-tokens-limit", type=click.IntRange(1), default=1024, show_default=True,
              help="The largest max_tokens a request may ask for.")
@click.option("--model-file", type=str, default=None, help="Which graph in the folder [default: the manifest's].")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime threads [default: all cores].")
@click.option("--log-level", type=click.Choice(["warning", "info", "debug"]), default="info", show_default=True,
              help="uvicorn's log level (info logs every request).")
def serve(export_dir, host, port, max_batch, batch_window_ms, max_tokens_limit, model_file, threads, log_level):
    """Serve an export over HTTP: POST /v1/completions (OpenAI-style, streaming), POST /v1/classify,
    GET /health, GET /metrics. Concurrent requests are batched."""
    from .deploy.runtime import ExportedModel
    from .deploy.serve import ServeOptions, bind, serve

    if not Path(export_dir).is_dir():
        raise QPromptError(f"{export_dir} does not exist; pass the folder `qprompt export --output` wrote")
    sock = bind(host, port)  # before the model loads: a port in use is reported at once
    try:
        model = ExportedModel(export_dir, model_file, threads=threads)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()
    tasks = ", ".join(f"{t.name}: {t.kind}" for t in model.manifest.tasks)
    click.echo(f"serving {export_dir} ({tasks}; {model.manifest.quantization}) on "
               f"http://{host}:{bound[1]}  (POST /v1/completions, /v1/classify; GET /health, /metrics)", err=True)
    options = ServeOptions(max_batch=max_batch, batch_window_ms=batch_window_ms, max_tokens_limit=max_tokens_limit)
    serve(model, sock, options, log_level)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", type=str, required=True, help="The input; the recipe's template is applied to it.")
@click.option("--raw", is_flag=True, help="Use --prompt as the full text, without the recipe's template.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens to generate.")
@model_options
def generate(artifact, prompt, raw, max_new_tokens, quant, compute_dtype, device):
    """Continue a prompt with a trained soft prompt (greedy); classification recipes also print the label."""
    from .artifact import load_artifact
    from .data import Encoder, Example, template_fields
    from .evaluate import classify, generate_texts
    from .forward import virtual_tokens

    quiet_libraries()
    if raw and not prompt:
        raise QPromptError("--prompt is empty: with --raw give some text to continue")
    model, tokenizer, cfg, _ = load_artifact(artifact, None, quant, compute_dtype, device)
    encoder = Encoder(cfg, tokenizer, virtual_tokens(model))
    fields = template_fields(cfg.template.prompt)
    templated = not raw and len(fields) == 1
    ids = encoder.prompt_ids({fields[0]: prompt}) if templated else tokenizer(prompt)["input_ids"]
    if cfg.task == "classification" and templated:
        click.echo(f"label: {classify(model, encoder, [Example(ids, [], None)])[0]}")
    click.echo(generate_texts(model, tokenizer, [ids], max_new_tokens)[0])


@main.command("inspect")
@click.argument("artifact", type=click.Path())
@click.option("--data", type=str, default=None,
              help="Validation rows to measure importance on [default: the recipe's validation split].")
@click.option("--rows", "n_rows", type=click.IntRange(1), default=64, show_default=True,
              help="Rows scored per importance evaluation (the first N of --data).")
@click.option("--top", type=click.IntRange(1), default=3, show_default=True,
              help="Nearest vocabulary tokens shown per virtual token.")
@click.option("--no-importance", is_flag=True,
              help="Skip the importance evaluations (one per virtual token) and reading rows.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Also draw a heat map to this PNG file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write everything to this JSON file.")
@model_options
def inspect_command(artifact, data, n_rows, top, no_importance, png, json_out, quant, compute_dtype, device):
    """Make a trained soft prompt readable: per virtual token, the nearest vocabulary tokens (cosine), its norm
    next to the vocabulary's typical norm, and its importance: the validation metric with that token dropped
    (hidden from attention) minus the full prompt's. Prefix tuning shows per-layer key/value norms instead of
    nearest tokens. Importance costs one evaluation of --rows rows per virtual token (plus one for the full
    prompt); --no-importance skips it."""
    from .artifact import load_artifact, read_manifest, recipe_of
    from .data import check_recipe_rows, load_splits, read_rows
    from .forward import virtual_tokens
    from .inspect import draw_png, format_table, inspect_prompt

    quiet_libraries()
    if data and no_importance:
        raise QPromptError("--data gives the rows importance is measured on: drop --no-importance or --data")
    check_output_file(png, "--png")
    check_output_file(json_out, "--json")
    # Read and check the rows before loading a model, so a bad file fails in a second, not after a load.
    cfg = recipe_of(read_manifest(artifact))
    rows, where = None, data or f"{cfg.name} validation split"
    if not no_importance:
        rows = (read_rows(data) if data else load_splits(cfg)["validation"])[:n_rows]
        check_recipe_rows(cfg, rows, where)
    model, tokenizer, cfg, _ = load_artifact(artifact, None, quant, compute_dtype, device)
    if rows is not None:
        click.echo(f"measuring importance: {virtual_tokens(model) + 1} evaluations of {len(rows)} rows", err=True)
    report = {"artifact": str(artifact), **inspect_prompt(model, tokenizer, cfg, rows, top, where)}
    for line in format_table(report):
        click.echo(line)
    if png:
        draw_png(report, png)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1) + "\n")


@main.command()
@click.argument("name", required=False)
def recipes(name):
    """List the recipes, or show one recipe's config."""
    from .config import list_recipes, load_recipe, recipes_dir

    if name:
        cfg = load_recipe(name)
        path = recipes_dir() / f"{cfg.name}.yaml"
        click.echo(path.read_text() if path.is_file() else json.dumps(cfg.to_dict(), indent=2))
        return
    for cfg in list_recipes():
        click.echo(f"{cfg.name:<12} {cfg.task:<15} {cfg.description}")
    click.echo(f"\ndefault model: {DEFAULT_MODEL}; show one with `qprompt recipes NAME`")


@main.command()
@click.option("--model", "model_name", type=str, default=DEFAULT_MODEL, show_default=True,
              help="Alias, local folder, hub id (only its config.json is read) or an architecture preset "
                   "(llama-3-8b).")
@click.option("--quant", type=click.Choice(QUANTS), default="nf4", show_default=True, help="Base quantization.")
@click.option("--method", type=MethodChoice(), default="prompt-tuning", show_default=True, help="Soft-prompt method.")
@click.option("--virtual-tokens", type=click.IntRange(1), default=100, show_default=True, help="Virtual tokens.")
@click.option("--batch", type=click.IntRange(1), default=4, show_default=True, help="Examples per micro-batch.")
@click.option("--seq-len", type=click.IntRange(1), default=512, show_default=True,
              help="Tokens in the longest example (prompt + target, without the virtual tokens).")
@click.option("--target-tokens", type=click.IntRange(1), default=2, show_default=True,
              help="Scored tokens per example (the label words; longer for generation).")
@click.option("--gpu-gib", type=float, default=8.0, show_default=True, help="GPU memory to fit in, GiB.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cuda: peak allocated memory, bfloat16 compute; cpu: peak resident memory, float32 compute.")
@click.option("--gradient-checkpointing", is_flag=True, help="Plan with activation recomputation on.")
def plan(model_name, quant, method, virtual_tokens, batch, seq_len, target_tokens, gpu_gib, device,
         gradient_checkpointing):
    """Predict peak training memory from the model's config alone, and say whether it fits the GPU."""
    from .plan import CUDA_CONTEXT_GIB, Shape, advise, load_config, plan_memory

    quiet_libraries()
    try:
        shape = Shape.of(load_config(model_name))
    except OSError as exc:
        raise QPromptError(f"could not read the config of {model_name} ({str(exc).splitlines()[0]})") from exc
    dtype = "bfloat16" if device == "cuda" else "float32"
    options = dict(quant=quant, method=method, virtual_tokens=virtual_tokens, batch=batch, seq_len=seq_len,
                   compute_dtype=dtype, checkpointing=gradient_checkpointing, target_tokens=target_tokens)
    if device == "cuda":
        p, advice = advise(shape, gpu_gib, **options)
    else:
        p, advice = plan_memory(shape, device="cpu", **options), []
    click.echo(f"{model_name}: {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; {method} "
               f"({virtual_tokens} virtual tokens), {quant}, batch {batch} x {seq_len} tokens, {dtype}"
               f"{', gradient checkpointing' if gradient_checkpointing else ''}")
    for name in ("weights", "prompt", "activations", "logits", "backward_working_set", "runtime", "heap_overhead"):
        value = getattr(p, name)
        if value:
            click.echo(f"  {name.replace('_', ' '):<22}{value:>8.2f} GiB")
    what = "peak allocated (CUDA)" if device == "cuda" else "peak resident (RSS)"
    click.echo(f"  {'total':<22}{p.total:>8.2f} GiB  {what}")
    if device == "cpu":
        return
    needed = p.total + CUDA_CONTEXT_GIB
    if not advice:
        click.echo(f"fits a {gpu_gib:g} GiB GPU ({needed:.2f} GiB with the CUDA context)")
    else:
        click.echo(f"does not fit a {gpu_gib:g} GiB GPU ({needed:.2f} GiB with the CUDA context): {advice[0]}")
