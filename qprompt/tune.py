"""`qprompt tune RECIPE`: Optuna searches a recipe's soft-prompt settings on its validation rows.

A trial is one training run of the recipe (its schedule and patience) with settings the sampler picks: the method,
the learning rate (a factor on the rate measured for that method), the virtual tokens, the init where the method
reads it, and each method's own options (P-tuning's encoder). Trial 0 is the recipe as written, so a tune never
ends below it. Every evaluation reports the validation metric to Optuna, and the median pruner stops a trial whose
metric falls below the median of earlier trials at the same step.

The study lives in an Optuna RDB storage: SQLite in OUTPUT/study.db by default, any SQLAlchemy URL with
--storage. A killed tune resumes where it stopped, two terminals (or machines, on a shared database) work on one
study, and `optuna-dashboard sqlite:///OUTPUT/study.db` shows it.

    OUTPUT/study.db        the study (unless --storage names another database)
    OUTPUT/trials/NNNN/    each trial's artifact (a training run)
    OUTPUT/best/           a copy of the best trial's artifact: `qprompt export OUTPUT/best ...`
    OUTPUT/trials.csv      one row per trial: state, metric, settings, steps, why it stopped, seconds
    OUTPUT/tune.png        the metric per trial, and each setting's importance (Optuna's evaluator)
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna

from . import owned
from .config import RecipeConfig
from .errors import Interrupted, QPromptError
from .evaluate import main_metric
from .methods import METHODS, get_method
from .tracking import FILES as TRACKER_FILES
from .tracking import Report
from .train import Trainer

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# The single-task methods; multitask prompt tuning is for several recipes at once (`qprompt multitask`).
TUNED_METHODS = tuple(name for name in METHODS if name != "multitask-prompt-tuning")
VIRTUAL_TOKENS = (8, 16, 32, 64)  # the recipe's own count joins them
LR_FACTORS = (0.2, 5.0)  # the learning rate is searched log-uniformly in this band around the method's rate


@dataclass
class TuneOptions:
    """Where and how long the study runs; the recipe holds the task and the base."""

    output: Path  # trials, the best artifact, the table and the plot
    trials: int = 20  # trials the study should hold (finished or pruned), counting earlier runs'
    storage: str | None = None  # SQLAlchemy URL [default: sqlite:///OUTPUT/study.db]
    study_name: str | None = None  # [default: the recipe's name]
    budget_minutes: float | None = None  # stop starting trials after this long
    methods: tuple[str, ...] = TUNED_METHODS
    startup_trials: int = 3  # trials that run to the end before the pruner compares against them
    seed: int = 0  # the sampler's seed
    report_to: tuple[str, ...] = ()  # trackers: TensorBoard in each trial's folder, MLflow runs in OUTPUT/mlflow.db


def storage_url(options: TuneOptions) -> str:
    return options.storage or f"sqlite:///{(options.output / STUDY_FILE).resolve()}"


def open_study(recipe: RecipeConfig, options: TuneOptions) -> optuna.Study:
    """The study in its database, created on first use. A trial whose process died is marked failed after its
    heartbeat stops (2 min), and run again once."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat's label
    storage = optuna.storages.RDBStorage(
        storage_url(options), heartbeat_interval=30, grace_period=120,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=max(options.startup_trials, 1))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials,
                                         n_warmup_steps=max(recipe.train.eval_every - 1, 0))
    return optuna.create_study(storage=storage, study_name=options.study_name or recipe.name, direction="maximize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def recipe_settings(recipe: RecipeConfig) -> dict:
    """The recipe as written, in the search space's terms: the study's first trial."""
    method = get_method(recipe.method.name)
    params = {"method": recipe.method.name, "lr_factor": 1.0, "virtual_tokens": recipe.method.virtual_tokens}
    if method.uses_init(recipe.method):
        params["init"] = recipe.method.init
    params.update({option: getattr(recipe.method, option) for option in method.choices()})
    return params


def init_choices(recipe: RecipeConfig) -> list[str]:
    """The inits the recipe can use: text needs an instruction, labels a classification recipe's labels."""
    return [init for init, ok in (("text", bool(recipe.method.init_text or recipe.template.instruction)),
                                  ("labels", bool(recipe.labels)), ("vocab", True), ("random", True)) if ok]


def trial_recipe(trial: optuna.Trial, recipe: RecipeConfig, methods: tuple[str, ...]) -> RecipeConfig:
    """The recipe with the trial's settings; what was sampled is recorded on the trial."""
    out = copy.deepcopy(recipe)
    name = trial.suggest_categorical("method", list(methods))
    method = get_method(name)
    base_lr = recipe.train.lr if name == recipe.method.name else method.suggested_lr
    lr = base_lr * trial.suggest_float("lr_factor", *LR_FACTORS, log=True)
    tokens = sorted({*VIRTUAL_TOKENS, recipe.method.virtual_tokens})
    out.method.name, out.train.lr = name, lr
    out.method.virtual_tokens = trial.suggest_categorical("virtual_tokens", tokens)
    if method.uses_init(out.method):
        out.method.init = trial.suggest_categorical("init", init_choices(recipe))
    for option, choices in method.choices().items():
        setattr(out.method, option, trial.suggest_categorical(option, list(choices)))
    trial.set_user_attr("lr", lr)
    return out.validate()


class TrialFailed(Exception):
    """A trial's settings did not work (its one-line error is on the trial): the study goes on with the next."""


class TrialTrainer(Trainer):
    """A training run that reports each evaluation to its trial, and ends when the pruner says so."""

    def __init__(self, trial: optuna.Trial, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial = trial

    def evaluate(self) -> float:
        value = super().evaluate()
        self.trial.report(value, self.state["step"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation {self.metric_name} {value:.4f} at step {self.state['step']} is "
                                     "below the median of earlier trials")
        return value


def finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def tune(recipe: RecipeConfig, splits: dict[str, list[dict]], options: TuneOptions, load_model,
         first_trials: list[dict] | None = None) -> dict:
    """Run trials until the study holds `options.trials` finished ones (or the budget ends); returns the summary.
    `load_model(recipe) -> (model, tokenizer, info)` gives each trial a fresh base. `first_trials`: settings to try
    before the sampler's own (default: the recipe as written, if the study is new)."""
    check_output(options.output)
    options.output.mkdir(parents=True, exist_ok=True)
    owned.refuse_links(options.output, {STUDY_FILE, "trials", "best", "trials.csv", "tune.png",
                                        *TRACKER_FILES["mlflow"]})
    study = open_study(recipe, options)
    unknown = [m for m in options.methods if m not in METHODS]
    if unknown:
        raise QPromptError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if not study.trials:
        if any((options.output / "trials").glob("*")):
            raise QPromptError(f"{options.output}/trials holds the trials of a study that {storage_url(options)} does "
                               "not have; pass the study's --storage, or another --output")
        for params in first_trials if first_trials is not None else [recipe_settings(recipe)]:
            study.enqueue_trial(params, skip_if_exists=True)
    metric = main_metric(recipe)

    def objective(trial: optuna.Trial) -> float:
        trial_cfg = trial_recipe(trial, recipe, options.methods)
        folder = options.output / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("artifact", str(folder))
        start = time.perf_counter()
        try:
            model, tokenizer, info = load_model(trial_cfg)
            trainer = TrialTrainer(trial, trial_cfg, tokenizer, info, splits, folder, progress=False)
            trainer.setup(model, report=Report(options.report_to, options.output, study.study_name))
            trainer.train()
        except optuna.TrialPruned:
            trainer._close_log()
            trainer.tracking.finish(folder)
            trial.set_user_attr("steps", trainer.state["step"])
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
            raise
        except Interrupted:
            raise  # Ctrl-C ends the tune; the trial is marked failed, a resumed tune starts a new one
        except QPromptError as exc:
            log.warning("trial %d failed: %s", trial.number, exc)
            trial.set_user_attr("error", str(exc))
            raise TrialFailed(str(exc)) from None
        result = trainer.save()["training"]
        for key in ("steps", "best_step", "kept_step", "stopped"):
            trial.set_user_attr(key, result[key])
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        return trainer.state["kept"]  # the artifact's prompt

    remaining = options.trials - finished(study)
    if remaining > 0:
        # Until the study holds --trials finished trials (other terminals' count too); a failed trial does not
        # count, but as many failures in a row as trials wanted end the run (settings that never work).
        done = optuna.study.MaxTrialsCallback(options.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                      optuna.trial.TrialState.PRUNED))
        streak = {"failed": 0}

        def give_up(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            streak["failed"] = streak["failed"] + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
            if streak["failed"] >= remaining:
                log.warning("%d trials in a row failed: stopping (see their errors in trials.csv)", streak["failed"])
                study.stop()

        study.optimize(objective, timeout=options.budget_minutes * 60 if options.budget_minutes else None,
                       callbacks=[done, give_up], catch=(TrialFailed,))
    else:
        log.info("the study already holds %d finished trials (--trials %d): nothing to run", finished(study),
                 options.trials)
    return summarise(study, options, metric)


def check_output(output: Path) -> None:
    """A tune folder holds a study; a training run or an export is another kind of folder."""
    for name, kind in (("qprompt.json", "a training run"), ("qprompt-export.json", "an export")):
        if (output / name).is_file():
            raise QPromptError(f"{output} holds {kind}, not a tune; pass another --output")


def summarise(study: optuna.Study, options: TuneOptions, metric: str) -> dict:
    """Copy the best trial's artifact to OUTPUT/best, write trials.csv and tune.png; return the summary."""
    trials = study.get_trials(deepcopy=False)
    rows = [trial_row(t) for t in trials]
    write_table(options.output / "trials.csv", rows)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary = {"study": study.study_name, "storage": storage_url(options), "metric": metric, "trials": rows,
               "best": None}
    if not complete:
        return summary
    best = max(complete, key=lambda t: t.value)
    artifact = Path(best.user_attrs["artifact"])
    if (artifact / "qprompt.json").is_file():  # a shared study's best may have trained on another machine
        replace_folder(artifact, options.output / "best")
        artifact = options.output / "best"
    importance = param_importance(study)
    plot_study(options.output / "tune.png", rows, importance, metric)
    summary.update(best={"trial": best.number, "value": best.value, "params": best.params,
                         "lr": best.user_attrs.get("lr"), "artifact": str(artifact)},
                   importance=importance)
    return summary


def trial_row(trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    return {"trial": trial.number, "state": trial.state.name.lower(),
            "value": None if trial.value is None else round(trial.value, 4), "method": trial.params.get("method"),
            "lr": None if "lr" not in attrs else float(f"{attrs['lr']:.3g}"),
            "virtual_tokens": trial.params.get("virtual_tokens"), "init": trial.params.get("init", ""),
            "options": ";".join(f"{k}={v}" for k, v in trial.params.items()
                                if k not in ("method", "lr_factor", "virtual_tokens", "init")),
            "steps": attrs.get("steps"), "stopped": attrs.get("stopped", ""), "seconds": attrs.get("seconds"),
            "error": attrs.get("error", "")}


def write_table(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def replace_folder(source: Path, target: Path) -> None:
    """Copy `source` over `target` so that `target` is always one whole artifact (the old one or the new one)."""
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoint"), symlinks=False)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def param_importance(study: optuna.Study) -> dict[str, float]:
    """How much each setting decides the metric across finished trials (Optuna's default evaluator, PED-ANOVA in
    Optuna 5); empty while too few trials differ for it to say anything."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        with warnings.catch_warnings():  # few trials: its caveats about small samples are the plot's to show
            warnings.simplefilter("ignore")
            return {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # e.g. every trial sampled the same value of a setting
        log.info("no parameter importance yet: %s", exc)
        return {}


def plot_study(path: Path, rows: list[dict], importance: dict[str, float], metric: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [r for r in rows if r["state"] == "complete"]
    left.scatter([r["trial"] for r in done], [r["value"] for r in done], label="finished")
    best, line = -math.inf, []
    for r in done:
        best = max(best, r["value"])
        line.append(best)
    left.step([r["trial"] for r in done], line, where="post", label="best so far")
    pruned = [r["trial"] for r in rows if r["state"] == "pruned"]
    if pruned:
        left.scatter(pruned, [min(line)] * len(pruned), marker="x", color="grey", label="pruned")
    left.set(xlabel="trial", ylabel=f"validation {metric}", title="trials")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.legend()
    names = list(importance)[::-1]
    right.barh(names, [importance[n] for n in names])
    right.set(xlabel="importance (PED-ANOVA)", title="settings" if names else "settings (too few trials yet)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
