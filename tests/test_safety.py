"""Nothing of the user's is deleted or replaced: train and export touch only the files qprompt wrote,
--overwrite waits for the new run's checks, checkpoints load without unpickling, exports carry no local paths."""

import json
import os

import pytest
import torch

from qprompt.data import load_splits
from qprompt.errors import QPromptError
from qprompt.export import export
from qprompt.models import load_model
from qprompt.owned import RECORD, owned
from qprompt.train import train
from tests.kit import small_recipe


def _train(recipe, files, output, splits=None, **kw):
    model, tok, info = load_model(recipe.model, "none")
    splits = splits or load_splits(recipe, str(files["train"]), str(files["validation"]))
    return train(recipe, model, tok, info, splits, output, progress=False, **kw)


def _bad_label_splits(recipe, files):
    splits = load_splits(recipe, str(files["train"]), str(files["validation"]))
    splits["train"][5] = {**splits["train"][5], "label": "meh"}
    return splits


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, sentiment_files, tmp_path_factory):
    """A finished tiny run (quant none) in a folder that already held the user's README.md and notes."""
    recipe = small_recipe(tiny_model_dir, train__lr=0.03)
    out = tmp_path_factory.mktemp("safety") / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes on this run\n")
    _train(recipe, sentiment_files, out)
    return out


def test_train_keeps_the_users_readme_and_records_its_own_files(run_dir):
    assert (run_dir / "README.md").read_text() == "my notes on this run\n"  # PEFT's model card went nowhere
    mine = owned(run_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "qprompt.json", "metrics.jsonl", "loss.png",
            "checkpoint"} <= mine
    assert "README.md" not in mine and not (run_dir / ".best.partial").exists()


def test_overwrite_removes_only_recorded_files_and_only_after_the_checks(tiny_recipe, sentiment_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("mine")
    _train(tiny_recipe, sentiment_files, out)
    (out / "notes.txt").write_text("also mine")
    before = (out / "adapter_model.safetensors").read_bytes()
    listing = sorted(os.listdir(out))

    # A bad label found by the new run: the old run is untouched, every file of it still there.
    with pytest.raises(QPromptError, match="label 'meh'"):
        _train(tiny_recipe, sentiment_files, out, _bad_label_splits(tiny_recipe, sentiment_files), overwrite=True)
    assert sorted(os.listdir(out)) == listing and (out / "adapter_model.safetensors").read_bytes() == before

    tiny_recipe.train.lr = 0.05  # another run, so another prompt
    _train(tiny_recipe, sentiment_files, out, overwrite=True)
    assert (out / "README.md").read_text() == "mine" and (out / "notes.txt").read_text() == "also mine"
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_a_failed_check_creates_no_output_folder(tiny_recipe, sentiment_files, tmp_path):
    with pytest.raises(QPromptError, match="label 'meh'"):
        _train(tiny_recipe, sentiment_files, tmp_path / "new", _bad_label_splits(tiny_recipe, sentiment_files))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_checkpoint_folder_is_never_removed(tiny_recipe, sentiment_files, tmp_path, overwrite):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "weights.bin").write_bytes(b"the user's own")
    with pytest.raises(QPromptError, match="holds checkpoint, which qprompt did not write"):
        _train(tiny_recipe, sentiment_files, out, overwrite=overwrite)
    assert (out / "checkpoint" / "weights.bin").read_bytes() == b"the user's own"
    assert sorted(os.listdir(out)) == ["checkpoint"]


def test_checkpoint_state_loads_with_weights_only(run_dir):
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)  # raises on anything unsafe
    assert state["step"] == 2 and isinstance(state["best"], float)
    assert {"optimizer", "scheduler", "rng", "prompt_encoder"} <= set(state)
    python = state["rng"]["python"]
    import random

    random.setstate((python[0], tuple(python[1]), python[2]))  # the restored tuple is accepted as it was


def test_export_refuses_an_output_that_holds_more_than_an_export(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QPromptError, match="is the current folder or one above it; .* --output export"):
        export(run_dir, ".", overwrite=True)
    with pytest.raises(QPromptError, match="is the current folder or one above it"):
        export(run_dir, "..", overwrite=True)
    for target in (run_dir, run_dir.parent):
        with pytest.raises(QPromptError, match="is the artifact folder or one above it; .*--output run-export"):
            export(run_dir, target, overwrite=True)
    assert (run_dir / "qprompt.json").is_file() and (run_dir / "README.md").is_file()


def test_export_overwrite_replaces_only_its_own_files_and_ships_no_paths(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "exp"
    export(run_dir, out, quantize="int8")
    assert {"model.int8.onnx", "model.int8.onnx.data", "tokenizer.json", "qprompt-export.json"} <= owned(out)
    assert "model.onnx" not in owned(out)  # a quantized export holds the graph it deploys, no float one
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # the usual permissions, not mkdtemp's
    (out / "README.md").write_text("how to run this model")
    (out / "serve.py").write_text("print('hi')")

    data = export(run_dir, out, overwrite=True)  # fp32 only now: the int8 graph of the earlier export goes
    assert (out / "README.md").read_text() == "how to run this model" and (out / "serve.py").is_file()
    assert not (out / "model.int8.onnx").exists() and not (out / "model.int8.onnx.data").exists()
    assert data.model_file == "model.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp.partial")]

    source = data.tasks[0].source
    assert source["artifact"] == "run" and "path" not in source["base"]
    assert source["base"]["name"] == tiny_model_dir.name and source["base"]["fingerprint"]
    # No file written carries a path of this machine (the artifact's, the base model's or the temp folder's).
    for path in out.iterdir():
        if path.suffix in (".json", ".txt", ".jinja") or path.name == RECORD:
            text = path.read_text()
            for local in (str(tmp_path), str(run_dir.parent), str(tiny_model_dir.parent)):
                assert local not in text, (path.name, local)
    assert json.loads((out / "qprompt-export.json").read_text())["tasks"][0]["source"] == source


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_run_from_before_the_record_is_still_recognised_and_replaced(run_dir, tiny_recipe, sentiment_files,
                                                                       tmp_path):
    import shutil

    out = tmp_path / "old-run"
    shutil.copytree(run_dir, out)
    (out / RECORD).unlink()
    with pytest.raises(QPromptError, match="already holds a training run"):
        _train(tiny_recipe, sentiment_files, out)
    _train(tiny_recipe, sentiment_files, out, overwrite=True)
    assert (out / "README.md").read_text() == "my notes on this run\n"
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == tiny_recipe.train.max_steps


def test_resume_drops_a_metrics_line_a_kill_cut_short(tmp_path):
    from qprompt.train import drop_lines_after

    lines = ['{"step": 1, "loss": 0.5}', '{"step": 2, "eval": 0.7}', '{"step": 3, "loss": 0.4}', '{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    drop_lines_after(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert not (tmp_path / "metrics.jsonl.partial").exists()


# ----------------------------------------------------------------------------------- folders of another kind
def test_export_never_overwrites_a_training_run_and_train_never_an_export(run_dir, tiny_recipe, sentiment_files,
                                                                          tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    listing = sorted(os.listdir(run))
    for overwrite in (False, True):
        with pytest.raises(QPromptError, match=r"holds a training run \(qprompt.json\), not an export"):
            export(run_dir, run, overwrite=overwrite)
    assert sorted(os.listdir(run)) == listing
    exp = tmp_path / "exp"
    export(run_dir, exp)
    listing = sorted(os.listdir(exp))
    with pytest.raises(QPromptError, match="holds an export .*not a training run"):
        _train(tiny_recipe, sentiment_files, exp, overwrite=True)
    assert sorted(os.listdir(exp)) == listing


# ----------------------------------------------------------------------------------- crafted files
def test_a_crafted_ledger_never_reaches_outside_the_export_folder(run_dir, tmp_path):
    """An export folder from before records (no .qprompt-files) whose manifest's `files` names `..` or a path: export
    --overwrite removes only plain names inside the folder; the folder's parent and its other files stay."""
    parent = tmp_path / "shared"
    out = parent / "exp"
    out.mkdir(parents=True)
    (parent / "someone-elses.txt").write_text("keep me")
    (out / "qprompt-export.json").write_text(json.dumps({"files": {"..": {}, "../someone-elses.txt": {},
                                                                   "/etc/hostname": {}, "model.onnx": {}}}))
    (out / "model.onnx").write_text("old graph")
    export(run_dir, out, overwrite=True)
    assert (parent / "someone-elses.txt").read_text() == "keep me"
    assert json.loads((out / "qprompt-export.json").read_text())["format"] == "qprompt-export/3"


@pytest.mark.parametrize("name", ["../other/model.onnx", "/etc/passwd", "..", "sub/model.onnx"])
def test_a_crafted_model_file_is_refused(run_dir, tmp_path, name):
    from qprompt.deploy.runtime import ExportedModel, ExportError

    out = tmp_path / "exp"
    export(run_dir, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    manifest = json.loads((out / "qprompt-export.json").read_text())
    (out / "qprompt-export.json").write_text(json.dumps({**manifest, "model_file": name}))
    with pytest.raises(ExportError, match="is not a file name in the export folder"):
        ExportedModel(out)
    with pytest.raises(ExportError, match="not a file name in"):
        ExportedModel(out, model_file="../other/model.onnx")


@pytest.mark.parametrize("name", ["loss.png", "metrics.jsonl.partial", "checkpoint.partial"])
def test_train_never_writes_through_a_symbolic_link(run_dir, tiny_recipe, sentiment_files, tmp_path, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    target = outside if name.endswith(".partial") and name.startswith("checkpoint") else outside / "victim"
    if (run / name).exists():
        (run / name).unlink()
    (run / name).symlink_to(target)
    recipe = tiny_recipe
    recipe.train.max_steps = 4
    with pytest.raises(QPromptError, match=f"{name} is a symbolic link"):
        _train(recipe, sentiment_files, run, resume=True)
    assert (outside / "victim").read_text() == "untouched" and sorted(os.listdir(outside)) == ["victim"]


# ----------------------------------------------------------------------------------- the shared cache
_MAKER = """
import sys, time
from pathlib import Path
from qprompt.sources import make_once

def build(tmp):
    tmp.mkdir()
    (tmp / "log").write_text(sys.argv[2])
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    (tmp / "config.json").write_text("{}")
    with open(Path(sys.argv[1]).parent / "builds", "a") as f:
        f.write(sys.argv[2] + "\\n")

make_once(Path(sys.argv[1]), build, done=lambda p: (p / "config.json").is_file())
print((Path(sys.argv[1]) / "log").read_text())
"""


def test_processes_started_together_make_a_cache_entry_once(tmp_path):
    """Two processes needing the same cache entry at once (two terminals, a sweep): one builds it under the cache's
    lock in its own temporary folder, the other waits and finds it complete; nothing is left half-made."""
    import subprocess
    import sys

    env = {**os.environ, "QPROMPT_CACHE": str(tmp_path / "cache")}
    entry = tmp_path / "cache" / "models" / "alias"
    procs = [subprocess.Popen([sys.executable, "-c", _MAKER, str(entry), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    builds = (entry.parent / "builds").read_text().split()
    assert len(builds) == 1  # built once
    assert {o[0].strip() for o in outputs} == set(builds)  # both processes read the one entry
    assert sorted(os.listdir(entry)) == ["config.json", "log"]
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
