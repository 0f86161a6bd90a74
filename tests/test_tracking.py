"""--report-to: TensorBoard event files and an MLflow run (SQLite store in the run's folder) hold what
metrics.jsonl holds; a resumed run goes on in the same MLflow run."""

import json

import mlflow
import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qprompt.train as qtrain
from qprompt.cli import main
from qprompt.config import load_recipe
from tests.kit import ctrl_c_at

OPTIONS = ["--virtual-tokens", 4, "--max-steps", 4, "--batch-size", 8, "--eval-every", 2, "--lr", 0.1, "--quant",
           "none", "--report-to", "tensorboard", "--report-to", "mlflow", "train.log_every=1", "train.eval_rows=16"]


def train(tiny_model_dir, files, out, *extra):
    args = ["train", "--model", tiny_model_dir, "--recipe", "sentiment", "--data", files["train"], "--eval-data",
            files["validation"], "--output", out, *OPTIONS, *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def logged(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"]) for r in lines if "loss" in r],
            [(r["step"], r["eval"]) for r in lines if "eval" in r])


def mlflow_run(out):
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_tensorboard_and_mlflow_hold_the_run(tiny_model_dir, sentiment_files, tmp_path):
    out = tmp_path / "tracked"
    result = train(tiny_model_dir, sentiment_files, out)
    assert result.exit_code == 0, result.output
    losses, evals = logged(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4] and [s for s, _ in evals] == [2, 4]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == \
        [(s, round(v, 4)) for s, v in losses]
    assert [(e.step, e.value) for e in events.Scalars("validation/accuracy")] == [(s, pytest.approx(v)) for s, v in
                                                                                 evals]

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation_accuracy")] == evals
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert run.data.params["train.lr"] == "0.1"
    assert run.data.params["method.name"] == load_recipe("sentiment").method.name
    names = {a.path for a in client.list_artifacts(run.info.run_id, "artifact")}
    assert {"artifact/adapter_model.safetensors", "artifact/qprompt.json"} <= names


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tiny_model_dir, sentiment_files, tmp_path, monkeypatch):
    real = ctrl_c_at(monkeypatch, 3)  # Ctrl-C during step 3, after the step-2 checkpoint
    out = tmp_path / "split"
    first = train(tiny_model_dir, sentiment_files, out)
    assert first.exit_code == 2 and "interrupted at step 2" in first.output, first.output
    monkeypatch.setattr(qtrain, "target_logprobs", real)
    again = train(tiny_model_dir, sentiment_files, out, "--resume")
    assert again.exit_code == 0, again.output
    client, run = mlflow_run(out)  # one run, not two
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
