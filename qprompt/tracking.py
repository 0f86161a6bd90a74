"""Experiment tracking through the tools users already run: `--report-to tensorboard` and/or `mlflow`.

A run sends what its metrics.jsonl holds (loss, learning rate and tokens/s per logged step; the validation metric
per evaluation) to each tracker, the recipe as parameters, and at the end its artifact (MLflow). By default both
live in the run's output folder:

    OUTPUT/tensorboard/     TensorBoard event files (`tensorboard --logdir OUTPUT/tensorboard`), written by
                            PyTorch's SummaryWriter; a resumed run drops the events after its checkpoint
    OUTPUT/mlflow.db        an MLflow tracking store (SQLite: MLflow no longer takes new runs in a plain folder
    OUTPUT/mlartifacts/     store) and its artifacts (`mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow.db`);
                            MLFLOW_TRACKING_URI, when set, sends the runs to that server instead

Both packages come with the `track` extra (`pip install 'qprompt[track]'`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import QPromptError

TRACKERS = ("tensorboard", "mlflow")
# The names a tracker writes in the run's folder (claimed before writing, removed by --overwrite).
FILES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow.db", "mlartifacts")}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.03}} -> {"train.lr": 0.03}: a recipe as flat parameters."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: train/loss, train/lr, train/tokens_per_s or validation/METRIC."""
    if "eval" in record:
        return {f"validation/{record.get('metric', 'metric')}": float(record["eval"])}
    return {f"train/{k}": float(record[k]) for k in ("loss", "lr", "tokens_per_s") if k in record}


class TensorBoard:
    def __init__(self, folder: Path, name: str, params: dict, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise QPromptError("--report-to tensorboard needs the tensorboard package: "
                               "pip install -c constraints.txt 'qprompt[track]'") from None
        # purge_step: a resumed run's events after its checkpoint are hidden, so no step is shown twice.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=purge)
        if resume_step is None:
            text = "\n".join(f"    {k}: {v}" for k, v in flatten(params).items())  # indented: markdown code block
            self.writer.add_text("recipe", text, 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, folder: Path) -> None:
        self.writer.close()

    def state(self) -> dict:
        return {}


class MLflow:
    def __init__(self, folder: Path, name: str, params: dict, resume_step: int | None, run_id: str | None = None,
                 experiment: str = "qprompt"):
        try:
            import mlflow
        except ImportError:
            raise QPromptError("--report-to mlflow needs the mlflow-skinny package: "
                               "pip install -c constraints.txt 'qprompt[track]'") from None
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its table-creation notes on every first run
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        self.client = mlflow.MlflowClient(uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI")
                else (folder / "mlartifacts").resolve().as_uri())
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = flatten(params)
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                batch = list(params.items())[start : start + 100]
                self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in batch])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        import mlflow

        when = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k.replace("/", "_"), v, when, step)
                                                    for k, v in values.items()])

    def finish(self, folder: Path) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors", "qprompt.json", "loss.png"):
            if (folder / name).is_file():
                self.client.log_artifact(self.run_id, str(folder / name), artifact_path="artifact")
        self.client.set_terminated(self.run_id)

    def state(self) -> dict:
        return {"mlflow_run_id": self.run_id}


@dataclass
class Report:
    """Where a run reports: `--report-to` names, and for MLflow the folder of its store and the experiment's name
    (a tune puts its trials' runs in one store and one experiment)."""

    to: tuple[str, ...] = ()
    mlflow_home: Path | None = None  # [default: the run's folder]
    experiment: str = "qprompt"


class Tracking:
    """The trackers a run reports to; a run with none costs nothing."""

    def __init__(self, report: Report, folder: Path, name: str, params: dict, resume_step: int | None = None,
                 saved: dict | None = None):
        names, experiment = report.to, report.experiment
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise QPromptError(f"--report-to {unknown[0]}: unknown tracker; choose from {', '.join(TRACKERS)}")
        saved = saved or {}
        self.trackers = []
        for n in dict.fromkeys(names):
            if n == "tensorboard":
                self.trackers.append(TensorBoard(folder, name, params, resume_step))
            else:
                self.trackers.append(MLflow(report.mlflow_home or folder, name, params, resume_step,
                                            saved.get("mlflow_run_id"), experiment))

    def log_record(self, record: dict) -> None:
        values = scalars(record)
        if values:
            for tracker in self.trackers:
                tracker.log(values, int(record["step"]))

    def finish(self, folder: Path) -> None:
        for tracker in self.trackers:
            tracker.finish(folder)
        self.trackers = []  # finished once

    def state(self) -> dict:
        return {k: v for tracker in self.trackers for k, v in tracker.state().items()}
