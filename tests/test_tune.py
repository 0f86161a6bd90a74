"""`qprompt tune`: an Optuna study in a database, resumed by a second tune, pruning, and the best trial's artifact."""

import csv
import json

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from peft import PeftModel

import qprompt.train as qtrain
from qprompt.cli import main
from qprompt.config import load_recipe
from qprompt.data import load_splits
from qprompt.models import load_model
from qprompt.tune import TuneOptions, tune
from tests.kit import small_recipe

SMALL = ["train.max_steps=2", "train.eval_every=1", "train.batch_size=8", "train.eval_rows=16",
         "train.warmup_steps=1", "method.virtual_tokens=4"]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_tune_writes_a_study_that_a_second_tune_resumes(tiny_model_dir, sentiment_files, tmp_path):
    out = tmp_path / "tune"
    base = ["tune", "sentiment", "--model", str(tiny_model_dir), "--quant", "none", "--data",
            str(sentiment_files["train"]), "--eval-data", str(sentiment_files["validation"]), "--output", str(out)]
    first = CliRunner().invoke(main, [*base, "--trials", "3", "--report-to", "mlflow", *SMALL])
    assert first.exit_code == 0, first.output
    table = rows(out / "trials.csv")
    assert [r["trial"] for r in table] == ["0", "1", "2"]
    # Trial 0 is the recipe as written: its method, learning rate and virtual tokens.
    recipe = load_recipe("sentiment")
    assert (table[0]["method"], float(table[0]["lr"]), table[0]["virtual_tokens"]) == \
        (recipe.method.name, recipe.train.lr, "4")
    study = optuna.load_study(study_name="sentiment", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert f"best: trial {best.number}," in first.output and (out / "tune.png").stat().st_size > 0
    manifest = json.loads((out / "best" / "qprompt.json").read_text())
    assert manifest["metrics"]["validation_accuracy"] == best.value  # best/ is the best trial's artifact
    assert not (out / "best" / "checkpoint").exists()
    model, _, _ = load_model(str(tiny_model_dir), "none")
    peft = PeftModel.from_pretrained(model, out / "best")
    assert peft.peft_config["default"].peft_type.value.lower().replace("_", "-") == best.params["method"]

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")  # the trials are runs of one experiment
    runs = client.search_runs([client.get_experiment_by_name("sentiment").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["0000", "0001", "0002"]

    again = CliRunner().invoke(main, [*base, "--trials", "5", *SMALL])
    assert again.exit_code == 0, again.output
    assert [r["trial"] for r in rows(out / "trials.csv")] == ["0", "1", "2", "3", "4"]  # the count went on
    assert len(optuna.load_study(study_name="sentiment", storage=f"sqlite:///{out / 'study.db'}").trials) == 5
    done = CliRunner().invoke(main, [*base, "--trials", "5", *SMALL])  # nothing left to run
    assert done.exit_code == 0 and len(rows(out / "trials.csv")) == 5, done.output


def test_a_trial_that_falls_behind_the_median_is_pruned(tiny_model_dir, sentiment_files, tmp_path, monkeypatch):
    """The validation metric is scripted from the learning rate: a rate of 1 or more scores 0.1, the others 0.9.
    After three trials at a sane rate, a trial fed five times the rate is stopped at its first evaluation."""

    def validate(self):
        return (0.1 if self.cfg.lr >= 1 else 0.9), {"metric": self.metric_name, "rows": len(self.val_rows)}

    monkeypatch.setattr(qtrain.Trainer, "_validate", validate)
    recipe = small_recipe(tiny_model_dir, train__max_steps=3, train__eval_every=1, train__lr=0.3,
                          train__eval_rows=200, train__warmup_steps=1)
    splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    sane = [{"method": "prompt-tuning", "lr_factor": 1.0, "virtual_tokens": n, "init": "vocab"} for n in (4, 8, 16)]
    bad = {"method": "prompt-tuning", "lr_factor": 5.0, "virtual_tokens": 8, "init": "random"}
    summary = tune(recipe, splits, TuneOptions(tmp_path / "tune", trials=4), lambda cfg: load_model(cfg.model, "none"),
                   first_trials=[*sane, bad])
    states = [r["state"] for r in summary["trials"]]
    assert states == ["complete", "complete", "complete", "pruned"]
    assert summary["trials"][3]["steps"] == 1 and summary["trials"][3]["lr"] == pytest.approx(1.5)
    assert summary["best"]["value"] == 0.9


def test_tune_refuses_a_training_run_folder(tiny_model_dir, sentiment_files, tmp_path, tiny_recipe):
    run_folder = tmp_path / "run"
    model, tok, info = load_model(tiny_recipe.model, "none")
    splits = load_splits(tiny_recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    tiny_recipe.train.max_steps = 1
    qtrain.train(tiny_recipe, model, tok, info, splits, run_folder, progress=False)
    before = sorted(p.name for p in run_folder.iterdir())
    result = CliRunner().invoke(main, ["tune", "sentiment", "--model", str(tiny_model_dir), "--output",
                                       str(run_folder)])
    assert result.exit_code == 2 and "holds a training run, not a tune; pass another --output" in result.output
    assert sorted(p.name for p in run_folder.iterdir()) == before


def test_a_failing_trial_is_recorded_and_ctrl_c_ends_the_tune(tiny_model_dir, sentiment_files, tmp_path):
    """A trial whose settings fail (a one-line QPromptError) is marked failed with its message and the study goes
    on; Ctrl-C in a trial (the run saves its checkpoint, then raises Interrupted) ends the whole tune."""
    from qprompt.errors import Interrupted, QPromptError

    recipe = small_recipe(tiny_model_dir, train__max_steps=1, train__eval_every=1, train__lr=0.03,
                          train__eval_rows=200, train__warmup_steps=1)
    splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    calls = []

    def load(cfg):
        calls.append(cfg.method.virtual_tokens)
        if cfg.method.virtual_tokens == 16:
            raise QPromptError("16 virtual tokens do not fit; lower them")
        return load_model(cfg.model, "none")

    first = [{"method": "prompt-tuning", "lr_factor": 1.0, "virtual_tokens": n, "init": "vocab"} for n in (4, 16, 8)]
    summary = tune(recipe, splits, TuneOptions(tmp_path / "tune", trials=2), load, first_trials=first)
    assert [r["state"] for r in summary["trials"]] == ["complete", "fail", "complete"]
    study = optuna.load_study(study_name="sentiment", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    assert study.trials[1].user_attrs["error"] == "16 virtual tokens do not fit; lower them"

    def interrupted(cfg):
        raise Interrupted("interrupted at step 0; continue with --resume")

    with pytest.raises(Interrupted):
        tune(recipe, splits, TuneOptions(tmp_path / "tune", trials=5), interrupted)
    assert len(optuna.load_study(study_name="sentiment", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
               .trials) == 4  # one more trial, failed; no further trial was started
