"""The CLI end to end on the tiny model, and the one-line errors it gives for bad input."""

import json

import pytest

from tests.kit import assert_one_error, cli, write_jsonl

TRAIN = ["--virtual-tokens", 4, "--max-steps", 4, "--batch-size", 8, "--eval-every", 2, "--lr", 0.1, "--quant", "nf4"]


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "art"
    result = cli("train", "--model", tiny_model_dir, "--recipe", "sentiment", "--data", sentiment_files["train"],
                 "--eval-data", sentiment_files["validation"], "--output", out, *TRAIN)
    assert result.exit_code == 0, result.output
    assert f"saved soft prompt to {out} (accuracy" in result.output
    return out


def test_eval_artifact_and_baseline(artifact, tiny_model_dir, sentiment_files, tmp_path):
    report = tmp_path / "m.json"
    result = cli("eval", artifact, "--data", sentiment_files["test"], "--json", report)
    assert result.exit_code == 0, result.output
    assert f"soft prompt {artifact}: accuracy" in result.output and "(32 rows" in result.output
    data = json.loads(report.read_text())
    # The report's metric is its predictions scored against the file's labels (recomputed here).
    gold = [json.loads(line)["label"] for line in sentiment_files["test"].read_text().splitlines()]
    assert len(data["predictions"]) == 32
    assert data["accuracy"] == sum(p == g for p, g in zip(data["predictions"], gold)) / 32
    result = cli("eval", "--baseline", "hard-prompt", "--model", tiny_model_dir, "--recipe", "sentiment",
                 "--data", sentiment_files["test"], "--quant", "none", "--limit", 10)
    assert result.exit_code == 0, result.output
    assert "hard-prompt 0-shot baseline" in result.output and "(10 rows" in result.output
    result = cli("eval", "--baseline", "hard-prompt", "--shots", 3, "--train-data", sentiment_files["train"],
                 "--model", tiny_model_dir, "--recipe", "sentiment", "--data", sentiment_files["test"],
                 "--quant", "none", "--limit", 4)
    assert result.exit_code == 0 and "hard-prompt 3-shot baseline" in result.output, result.output
    assert_one_error(cli("eval", artifact, "--shots", 2, "--data", sentiment_files["test"]), "--shots applies")


def test_generate(artifact):
    result = cli("generate", artifact, "--prompt", "a warm and funny film", "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] in ("label: positive", "label: negative")


def test_recipes_listing():
    result = cli("recipes")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()[:4]] == ["nli", "sentiment", "spam", "summarize"]
    shown = cli("recipes", "sentiment")
    assert "python recipes/sentiment.py" in shown.output


def test_bad_input_gives_one_line_errors(artifact, tiny_model_dir, sentiment_files, tmp_path):
    train = ["train", "--model", tiny_model_dir, "--recipe", "sentiment", *TRAIN]
    assert_one_error(cli(*train, "--data", tmp_path / "none.jsonl"), "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "positive"}\n{"text": "broken"\n')
    assert_one_error(cli(*train, "--data", bad), "line 2 is not valid JSON")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "x", "label": "positive"}, {"text": "y", "label": "meh"}])
    assert_one_error(cli(*train, "--data", wrong, "--eval-data", wrong, "--output", tmp_path / "o"),
                       "line 2 has label 'meh'")
    assert_one_error(cli("train", "--recipe", "nope"), "unknown recipe 'nope'")
    assert_one_error(cli(*train, "--data", sentiment_files["train"], "--output", artifact), "already holds")
    assert_one_error(cli(*train, "--data", sentiment_files["train"], "--output", tmp_path / "new", "--resume"),
                       "nothing to resume")
    assert_one_error(cli("eval", tmp_path, "--data", sentiment_files["test"]), "not a qprompt artifact")
    assert_one_error(cli("eval", "--baseline", "hard-prompt", "--model", "no such model", "--data",
                           sentiment_files["test"]), "unknown model")
    assert_one_error(cli("eval", artifact, "--data", bad), "line 2 is not valid JSON")  # before any model load


def test_artifact_on_another_base_is_refused(artifact, tiny_model_dir, sentiment_files, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 1
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    result = cli("eval", artifact, "--model", other, "--data", sentiment_files["test"])
    assert_one_error(result, "was trained on")
    assert f"pass --model {tiny_model_dir}" in result.output
    # The same name now loading another model: the advice is not to pass the name it already is.
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(artifact, moved)
    manifest = json.loads((moved / "qprompt.json").read_text())
    manifest["base"]["name"] = str(other)
    (moved / "qprompt.json").write_text(json.dumps(manifest))
    result = cli("eval", moved, "--data", sentiment_files["test"])
    assert_one_error(result, "now loads a model with fingerprint")
    assert "put the original model back" in result.output
    assert "--model" not in result.output


def test_ci_runs_the_readme_install_and_test_commands_in_a_fresh_venv():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    install = re.search(r'^INSTALL="(.+)"$', ci, re.M).group(1)
    test = re.search(r'^TEST="(.+)"$', ci, re.M).group(1)
    assert f"    {install} && {test}\n" in readme
    assert "-c constraints.txt" in install and (root / "constraints.txt").is_file()
    # A venv of its own, made by CI, holds what the commands install.
    assert re.search(r'^python3 -m venv "\$VENV"$', ci, re.M) and 'eval "$INSTALL"' in ci and 'eval "$TEST"' in ci


def test_export_run_and_eval_an_export(artifact, sentiment_files, tmp_path):
    out = tmp_path / "exp"
    result = cli("export", artifact, "--output", out)
    assert result.exit_code == 0, result.output
    assert "greedy tokens equal: True" in result.output and "model.onnx: none" in result.output
    result = cli("run", out, "--prompt", "a warm and funny film", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    result = cli("run", out, "--input", sentiment_files["test"], "--classify", "--batch-size", 16)
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 32
    torch_eval = cli("eval", artifact, "--data", sentiment_files["test"])
    onnx_eval = cli("eval", out, "--data", sentiment_files["test"])
    assert onnx_eval.exit_code == 0, onnx_eval.output
    accuracy = [line.split("accuracy ")[1].split()[0] for line in (torch_eval.output, onnx_eval.output)]
    assert accuracy[0] == accuracy[1]  # the fp32 graph gives the PyTorch model's predictions
    assert_one_error(cli("export", artifact, "--output", out), "already holds an export")
    assert_one_error(cli("run", tmp_path, "--prompt", "x"), "not a qprompt export")


def test_training_runs_unchanged_under_accelerate_launch(tiny_model_dir, sentiment_files, tmp_path):
    """`accelerate launch` (one process, CPU) runs the same CLI; lean-memory and checkpointing on too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(__file__).resolve().parents[1] / "cli.py"
    out = tmp_path / "launched"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(cli), "train",
               "--model", str(tiny_model_dir), "--quant", "nf4", "--data", str(sentiment_files["train"]),
               "--eval-data", str(sentiment_files["validation"]), "--max-steps", "3", "--batch-size", "4",
               "--eval-every", "0", "--gradient-checkpointing", "--lean-memory", "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "qprompt.json").read_text())
    assert manifest["training"]["steps"] == 3
    assert manifest["recipe"]["train"]["gradient_checkpointing"] and manifest["recipe"]["train"]["lean_memory"]


@pytest.mark.parametrize(("extra", "lr"), [([], 3e-3), (["--lr", 0.05], 0.05)])
def test_another_method_gets_its_own_learning_rate(tiny_model_dir, sentiment_files, tmp_path, extra, lr):
    """The recipe's 0.03 is for prompt tuning: p-tuning gets the rate measured for it unless --lr says otherwise."""
    out = tmp_path / "pt"
    result = cli("train", "--model", tiny_model_dir, "--recipe", "sentiment", "--method", "p-tuning",
                 "--data", sentiment_files["train"], "--eval-data", sentiment_files["validation"],
                 "--max-steps", 1, "--batch-size", 4, "--eval-every", 0, "--quant", "none", "--output", out, *extra)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "qprompt.json").read_text())["recipe"]["train"]["lr"] == lr


def test_constraints_pin_every_dependency_inside_its_declared_range():
    """constraints.txt (what CI tested) and pyproject.toml's ranges must not drift apart."""
    from importlib.metadata import requires
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).resolve().parents[1]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    declared = [Requirement(r) for r in requires("qprompt")]  # the installed metadata: pyproject.toml as built
    # The tests' install (`.[dev]`) takes the train, genai and track extras too (dev names them).
    declared = [r for r in declared if r.name != "qprompt" and (
        r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("train", "genai", "track", "dev")))]
    names = {canonicalize_name(r.name) for r in declared}
    assert {"torch", "onnx", "onnxscript", "onnxruntime-genai", "starlette", "pytest", "optuna", "tensorboard",
            "mlflow-skinny"} <= names
    dev = next(r for r in requires("qprompt") if r.startswith("qprompt["))
    assert all(extra in dev for extra in ("train", "genai", "track", "dev"))  # `.[dev]`: all the tests run
    for spec in declared:
        version = pins.get(canonicalize_name(spec.name))
        assert version is not None, f"{spec.name} is declared but not pinned in constraints.txt"
        assert spec.specifier.contains(version), f"{spec.name}=={version} is outside {spec}"
        assert any(s.operator in ("<", "<=", "==") for s in spec.specifier), f"{spec.name} has no upper bound"


def test_the_main_job_as_a_command_and_as_a_recipe_script(tiny_model_dir, sentiment_files, tmp_path):
    """`qprompt job` and `recipes/sentiment.py` run the same steps: the same table, and the second run reuses the
    trained prompt instead of training again."""
    from qprompt.recipes.sentiment import main as sentiment_script

    options = ["--model", tiny_model_dir, "--quant", "none", "--data", sentiment_files["train"], "--eval-data",
               sentiment_files["validation"], "--test-data", sentiment_files["test"], "--max-steps", 2,
               "--virtual-tokens", 4, "--output", tmp_path / "job", "--json", tmp_path / "job.json"]
    first = cli("job", "sentiment", *options)
    assert first.exit_code == 0, first.output
    table = [line for line in first.output.splitlines() if line.startswith(("hard prompt (", "soft prompt ("))]
    assert len(table) == 2 and all(line[24:].split()[1] == "32" for line in table)  # 32 test rows each
    result = json.loads((tmp_path / "job.json").read_text())
    assert result["training"]["steps"] == 2 and result["soft_prompt"]["rows"] == 32
    again = cli(*options, command=sentiment_script)
    assert again.exit_code == 0, again.output
    assert [line for line in again.output.splitlines() if line.startswith(("hard prompt (", "soft prompt ("))] == table
    assert json.loads((tmp_path / "job.json").read_text())["training"] == result["training"]  # reused, not retrained


def test_any_recipe_key_is_a_setting_after_the_options(tiny_model_dir, sentiment_files, tmp_path):
    """SECTION.KEY=VALUE after the options sets the recipe's key (read as YAML, applied after the flags); the
    trained run's manifest holds it. A key the recipe does not have, or a value of the wrong type, is one line."""
    out = tmp_path / "set"
    result = cli("train", "--model", tiny_model_dir, "--recipe", "sentiment", "--data", sentiment_files["train"],
                 "--eval-data", sentiment_files["validation"], "--output", out, *TRAIN,
                 "train.patience=1", "train.lr=2e-2", "method.init=labels", "data.max_length=96")
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "qprompt.json").read_text())["recipe"]
    assert (recipe["train"]["patience"], recipe["train"]["lr"]) == (1, 0.02)  # the setting beat --lr 0.1
    assert (recipe["method"]["init"], recipe["data"]["max_length"]) == ("labels", 96)
    base = ["job", "sentiment", "--model", tiny_model_dir, "--output", tmp_path / "bad"]
    assert_one_error(cli(*base, "train.patiense=2"), "'train.patiense' is not a recipe key; known keys of train:")
    assert_one_error(cli(*base, "training.lr=1"), "'training' is not a recipe section; the sections are")
    assert_one_error(cli(*base, "train.max_steps=many"), "must be an integer, got 'many'")
    assert_one_error(cli(*base, "train.patience"), "write it as section.field=value")
    assert not (tmp_path / "bad").exists()
