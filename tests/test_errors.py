"""Every problem a user can fix ends in one `error:` line that names it and the fix, exit code 2, no traceback.

Data, config and file problems must be found before the ~20-second model load: tests prove that by
passing a --model that does not exist, so only an error raised *before* the load can reach the user.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qprompt.errors import QPromptError
from tests.kit import assert_one_error, cli, data_rows, write_jsonl

NO_MODEL = "/no/such/model-folder"  # loading it fails with "unknown model": any other error came first


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "art"
    result = cli("train", "--model", tiny_model_dir, "--data", sentiment_files["train"], "--eval-data",
                 sentiment_files["validation"], "--output", out, "--quant", "none", "--virtual-tokens", 4,
                 "--max-steps", 2, "--batch-size", 8, "--eval-every", 0)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(artifact) -> Path:
    out = artifact.parent / "export"
    result = cli("export", artifact, "--output", out, "--parity-tokens", 2)
    assert result.exit_code == 0, result.output
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


# 1 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [lambda raw: raw[: len(raw) - 20], lambda raw: b"not safetensors at all"])
def test_damaged_adapter_weights(artifact, tmp_path, damage):
    art = copy_of(artifact, tmp_path)
    weights = art / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    for command in (["eval", art, "--data", tmp_path / "unread.jsonl"], ["generate", art, "--prompt", "x"],
                    ["export", art, "--output", tmp_path / "exp"]):
        if command[0] == "eval":
            write_jsonl(command[-1], [{"text": "fine", "label": "positive"}])
        assert_one_error(cli(*command), "adapter_model.safetensors is damaged", "copy the artifact again")
    assert not (tmp_path / "exp").exists()
    weights.unlink()
    assert_one_error(cli("generate", art, "--prompt", "x"), "no adapter_model.safetensors", "train again")


# 2 and 16 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("yaml_text", "words"), [
    ("train: {batch_size: big}\n", ["train: key 'batch_size' must be an integer", "'big'"]),
    ("train: {lr: x}\n", ["key 'lr' must be a number", "'x'"]),
    ("train: {gradient_checkpointing: 1}\n", ["must be true or false", "1 (int)"]),
    ("train: {seed: true}\n", ["key 'seed' must be an integer", "True (bool)"]),
    ("labels: [a, b]\n", ["key 'labels' must be a mapping", "['a', 'b']"]),
    ("train: {max_steps: -3}\n", ["train.max_steps must be at least 1", "got -3"]),
    ("labels: {positive: good, 1: bad}\n", ["labels 1: 'bad' must be text", "quote"]),
    ("train: {batch_size: [unclosed\n", ["not valid YAML at line", "fix the file"]),
])
def test_config_values_are_type_checked(tmp_path, yaml_text, words):
    path = config_file(tmp_path, "name: t\ntask: generation\nmethod: {init: random}\n" + yaml_text)
    assert_one_error(cli("train", "--config", path, "--model", NO_MODEL), *words)
    assert_one_error(cli("eval", "--baseline", "hard-prompt", "--config", path, "--model", NO_MODEL), *words)


def test_an_int_is_a_float_and_an_empty_section_is_its_defaults(tmp_path):
    from qprompt.config import load_recipe_file

    recipe = load_recipe_file(config_file(tmp_path, "name: t\nlabels: {a: b, c: d}\nmethod: {init: random}\n"
                                                    "train: {lr: 1}\ndata:\n"))
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float) and recipe.data.max_length == 256


def test_eval_baseline_accepts_config(tiny_model_dir, sentiment_files, tmp_path):
    from qprompt.config import recipes_dir

    text = (recipes_dir() / "sentiment.yaml").read_text()
    path = config_file(tmp_path, text + f"\nmodel: {tiny_model_dir}\nquant: none\n")
    result = cli("eval", "--baseline", "hard-prompt", "--config", path, "--data", sentiment_files["test"],
                 "--limit", 4)
    assert result.exit_code == 0, result.output
    assert f"hard-prompt 0-shot baseline ({tiny_model_dir}, none)" in result.output
    assert_one_error(cli("eval", "--baseline", "hard-prompt", "--config", path, "--recipe", "sentiment"),
                     "either --recipe or --config")


# 3 ------------------------------------------------------------------------------------------------
def test_damaged_checkpoint_state(artifact, tmp_path):
    from qprompt.artifact import read_checkpoint_state

    good = artifact / "checkpoint" / "state.pt"
    state = read_checkpoint_state(good)  # a real checkpoint loads with weights_only
    assert state["step"] == 2 and "prompt_encoder" in state
    bad = tmp_path / "state.pt"
    for content in (good.read_bytes()[:300], b""):
        bad.write_bytes(content)
        with pytest.raises(QPromptError, match=r"cannot be read: it is truncated or damaged.*resume from the copy; "
                                               r"else start the run again with --overwrite") as caught:
            read_checkpoint_state(bad)
        assert "weights_only" not in str(caught.value)
    import pickle

    import torch

    torch.save({"step": 3}, bad)
    with pytest.raises(QPromptError, match="not a qprompt training state"):
        read_checkpoint_state(bad)
    # A crafted pickle that would run code: refused without torch's advice to turn the safety off.
    bad.write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(QPromptError, match="never runs code from a checkpoint") as caught:
        read_checkpoint_state(bad)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)


# 4 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("damage", "words"), [
    (lambda m: b"{not json", ["is not valid JSON (line 1", "restore it from a copy or train again"]),
    (lambda m: b'{"format": "qprompt-artifact/1", "x": "\xff"}', ["is not UTF-8 text"]),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "recipe"}).encode(), ["lacks the key 'recipe'"]),
    (lambda m: json.dumps({**m, "base": {"name": "x", "quant": "none"}}).encode(),
     ["lacks the key 'base.fingerprint'"]),
    (lambda m: b"[1, 2]", ["is not a qprompt-artifact/1 manifest"]),
])
def test_damaged_artifact_manifest(artifact, sentiment_files, tmp_path, damage, words):
    art = copy_of(artifact, tmp_path)
    manifest = art / "qprompt.json"
    manifest.write_bytes(damage(json.loads(manifest.read_text())))
    assert_one_error(cli("eval", art, "--data", sentiment_files["test"]), "qprompt.json", *words)
    assert_one_error(cli("generate", art, "--prompt", "x"), *words)


@pytest.mark.parametrize(("damage", "words"), [
    (lambda m: b"{not json", ["is not valid JSON", "export again"]),
    (lambda m: b"\xff\xfe{}", ["is not UTF-8 text", "export again"]),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "head_dim"}).encode(), ["lacks the key 'head_dim'"]),
    (lambda m: json.dumps({**m, "tasks": [{**m["tasks"][0], "template": {}}]}).encode(),
     ["lacks the key 'tasks[0].template.prompt'"]),
    (lambda m: json.dumps({**m, "format": "qprompt-export/1"}).encode(),
     ["format 1, written by an older qprompt", "export the artifact again with this qprompt"]),
    (lambda m: json.dumps({**m, "format": "qprompt-export/4"}).encode(), ["format 4, written by a newer", "upgrade"]),
])
def test_damaged_export_manifest(exported, sentiment_files, tmp_path, damage, words):
    exp = copy_of(exported, tmp_path)
    manifest = exp / "qprompt-export.json"
    manifest.write_bytes(damage(json.loads(manifest.read_text())))
    assert_one_error(cli("run", exp, "--prompt", "a fine film"), "qprompt-export.json", *words)
    assert_one_error(cli("eval", exp, "--data", sentiment_files["test"]), *words)


# 5 ------------------------------------------------------------------------------------------------
def test_damaged_tokenizer_in_an_export(exported, sentiment_files, tmp_path):
    exp = copy_of(exported, tmp_path)
    (exp / "tokenizer.json").write_text('{"model": ')
    assert_one_error(cli("run", exp, "--prompt", "a fine film"), "tokenizer.json is damaged", "export again")
    assert_one_error(cli("eval", exp, "--data", sentiment_files["test"]), "tokenizer.json is damaged")


def test_damaged_tokenizer_in_a_base_model_folder(artifact, tiny_model_dir, sentiment_files, tmp_path):
    base = copy_of(tiny_model_dir, tmp_path)
    (base / "tokenizer.json").write_text("{")
    words = ["tokenizer.json is damaged", "copy the model folder again"]
    assert_one_error(cli("eval", artifact, "--model", base, "--data", sentiment_files["test"]), *words)
    assert_one_error(cli("train", "--model", base, "--data", sentiment_files["train"], "--output",
                         tmp_path / "o"), *words)


# 6 ------------------------------------------------------------------------------------------------
def test_onnxruntime_failures_are_one_line(exported, sentiment_files, tmp_path):
    exp = copy_of(exported, tmp_path)
    manifest = json.loads((exp / "qprompt-export.json").read_text())
    (exp / "qprompt-export.json").write_text(json.dumps({**manifest, "head_dim": manifest["head_dim"] + 1}))
    for command in (["run", exp, "--prompt", "a fine film"], ["eval", exp, "--data", sentiment_files["test"]]):
        assert_one_error(cli(*command), "onnxruntime could not run model.onnx", "export again")
    (exp / "model.onnx").write_bytes(b"garbage")
    assert_one_error(cli("run", exp, "--prompt", "a fine film"), "could not be loaded by onnxruntime", "export again")


# 8 ------------------------------------------------------------------------------------------------
def test_json_into_a_missing_folder_fails_before_the_work(artifact, exported, sentiment_files, tmp_path):
    out = tmp_path / "no-such-folder" / "m.json"
    words = ["--json", "no-such-folder does not exist", "create the folder"]
    assert_one_error(cli("eval", "--baseline", "hard-prompt", "--model", NO_MODEL, "--json", out), *words)
    assert_one_error(cli("eval", artifact, "--data", sentiment_files["test"], "--json", out), *words)
    assert_one_error(cli("eval", exported, "--data", sentiment_files["test"], "--json", out), *words)
    (tmp_path / "a-file").write_text("")
    assert_one_error(cli("eval", exported, "--json", tmp_path / "a-file" / "m.json"), "is a file, not a folder")
    assert_one_error(cli("train", "--model", NO_MODEL, "--output", tmp_path / "a-file" / "run"),
                     "--output", "a-file is a file, not a folder")
    assert_one_error(cli("--output", tmp_path / "a-file" / "run", command=recipe_script()),
                     "a-file is a file, not a folder")


def recipe_script():
    from qprompt.recipes.sentiment import main

    return main


def test_recipe_script_checks_json_and_data_before_the_model_load(tmp_path):
    script = recipe_script()
    assert_one_error(cli("--json", tmp_path / "none" / "r.json", command=script), "--json", "does not exist")
    rows = [{"text": f"ok {i}", "label": "negative"} for i in range(12)]
    rows[3] = {"text": "hm", "label": "meh"}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_one_error(cli("--model", NO_MODEL, "--data", data, "--output", tmp_path / "o", command=script),
                     "d.jsonl: line 4 has label 'meh'")
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok", "label": "positive"}, {"text": "", "label": "positive"}])
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": f"ok {i}", "label": "negative"} for i in range(12)])
    assert_one_error(cli("--model", NO_MODEL, "--data", good, "--test-data", test, "--output", tmp_path / "o",
                         command=script), "t.jsonl: line 2 has field 'text' but it is empty")


# 9 ------------------------------------------------------------------------------------------------
def test_kshot_demonstration_missing_a_field(sentiment_files, tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": "good", "label": "positive"}, {"label": "negative"},
                                                 {"text": "fine", "label": "positive"}])
    assert_one_error(cli("eval", "--baseline", "hard-prompt", "--model", NO_MODEL, "--shots", 3, "--train-data", pool,
                         "--data", sentiment_files["test"]),
                     "pool.jsonl (--shots demonstrations): line 2 has no field 'text'")


# 10, 11, 14, 15 -----------------------------------------------------------------------------------
def train_on(path: Path, tmp_path: Path, *extra):
    return cli("train", "--model", NO_MODEL, "--data", path, "--output", tmp_path / "out", *extra)


def test_csv_row_with_extra_or_missing_cells(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood film,positive\na film, sadly,negative\n")
    assert_one_error(train_on(bad, tmp_path), "bad.csv: line 3 has 3 cells but the header has 2", "quote cells")
    bad.write_text("text,label\ngood film,positive\nno label\n")
    assert_one_error(train_on(bad, tmp_path), "line 3 has 1 cell but the header has 2")


def test_data_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine", "label": "positive"}\n{"text": "caf\xe9", "label": "positive"}\n')
    assert_one_error(train_on(bad, tmp_path), "latin1.jsonl: line 2 is not UTF-8 text (byte 0xe9)", "save the file")


def test_folder_as_data(tmp_path):
    assert_one_error(train_on(tmp_path, tmp_path), "is a folder, not a file")


def test_data_errors_name_the_file_line_after_the_shuffle(tmp_path):
    rows = data_rows("rotten_tomatoes", "train", 40)
    rows[36] = {"text": "", "label": rows[36]["label"]}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    line = assert_one_error(train_on(data, tmp_path), "train.jsonl: line 37 has field 'text' but it is empty")
    rows[36] = {"review": "no text field", "label": "positive"}
    write_jsonl(data, rows)
    assert_one_error(train_on(data, tmp_path), "line 37 has no field 'text' (fields: review, label)")
    assert "does not exist" not in line


def test_validation_and_eval_rows_are_checked_before_the_model_load(artifact, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"t{i}", "label": "positive"} for i in range(8)])
    bad = write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "meh"}])
    assert_one_error(train_on(good, tmp_path, "--eval-data", bad), "val.jsonl: line 2 has label 'meh'")
    assert_one_error(cli("eval", "--baseline", "hard-prompt", "--model", NO_MODEL, "--data", bad),
                     "val.jsonl: line 2 has label 'meh'", "add the label")
    # An artifact's own base is loaded only after the rows pass.
    assert_one_error(cli("eval", artifact, "--data", bad), "line 2 has label 'meh'")


# 12, 13 -------------------------------------------------------------------------------------------
def test_run_raw_is_for_prompt_text_only(exported, artifact, sentiment_files):
    assert_one_error(cli("run", exported, "--raw", "--input", sentiment_files["test"]),
                     "does not apply to --input", "drop --raw")
    assert_one_error(cli("run", exported, "--raw", "--classify", "--prompt", "x"), "drop --raw")
    assert_one_error(cli("run", exported, "--raw", "--prompt", ""), "--prompt is empty")
    assert_one_error(cli("generate", artifact, "--raw", "--prompt", ""), "--prompt is empty")
    result = cli("run", exported, "--raw", "--prompt", "The film", "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output


def test_messages_name_the_true_cause(exported, artifact, tiny_model_dir, sentiment_files, tmp_path):
    assert_one_error(cli("run", exported, "--prompt", "x", "--input", sentiment_files["test"]), "not both")
    assert_one_error(cli("serve", tmp_path / "nowhere"), "does not exist", "qprompt export --output")
    assert_one_error(cli("serve", exported, "--host", "10.255.255.254", "--port", 0), "no such address", "--host")
    # Too many virtual tokens for max_length: truncation is already on, so say what does help.
    train = ["train", "--recipe", "sentiment", "--model", tiny_model_dir, "--quant", "none", "--data",
             sentiment_files["train"], "--eval-data", sentiment_files["validation"], "--max-steps", 1,
             "--output", tmp_path / "long"]
    message = assert_one_error(cli(*train, "--virtual-tokens", 9000), "use fewer virtual tokens",
                               "raise data.max_length")
    assert "on_long" not in message


def test_a_run_killed_before_its_first_checkpoint_gets_one_consistent_advice(artifact, tiny_model_dir,
                                                                             sentiment_files, tmp_path):
    import shutil

    run_dir = tmp_path / "killed"
    shutil.copytree(artifact, run_dir)
    for name in ("checkpoint", "qprompt.json", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train = ["train", "--recipe", "sentiment", "--model", tiny_model_dir, "--quant", "none", "--data",
             sentiment_files["train"], "--eval-data", sentiment_files["validation"], "--max-steps", 1,
             "--output", run_dir]
    assert_one_error(cli(*train), "stopped before its first checkpoint", "--overwrite")
    assert_one_error(cli(*train, "--resume"), "stopped before its first checkpoint", "--overwrite")
    done = cli(*train, "--overwrite")
    assert done.exit_code == 0, done.output


def test_a_negative_seed_is_one_usage_error(exported):
    for temperature in ("0", "1"):
        result = cli("run", exported, "--prompt", "a film", "--temperature", temperature, "--seed", "-1")
        assert result.exit_code == 2 and "--seed" in result.output and "-1" in result.output
        assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception,
                                                                                          SystemExit)


def test_top_p_zero_keeps_the_most_likely_token(exported):
    args = ["run", exported, "--prompt", "a warm and funny film", "--max-new-tokens", 6]
    greedy = cli(*args)
    sampled = cli(*args, "--temperature", 1, "--top-p", 0, "--seed", 3)
    assert greedy.exit_code == 0 and sampled.exit_code == 0, sampled.output
    assert sampled.output == greedy.output


def test_pick_with_top_p_zero_is_argmax():
    import numpy as np

    from qprompt.deploy.runtime import Sampling, pick_token

    logits = np.array([0.5, 2.0, 1.0])
    rng = np.random.default_rng(0)
    assert {pick_token(logits, Sampling(temperature=1.0, top_p=0.0), rng) for _ in range(20)} == {1}


# others -------------------------------------------------------------------------------------------
def test_other_user_errors_are_one_line(exported, sentiment_files, tmp_path):
    assert_one_error(cli("eval", exported, "--data", tmp_path / "none.jsonl"), "does not exist")
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "meh"}])
    assert_one_error(cli("eval", exported, "--data", bad), "line 2 has label 'meh'")
    missing = write_jsonl(tmp_path / "m.jsonl", [{"review": "a"}])
    assert_one_error(cli("run", exported, "--input", missing), "m.jsonl: line 1 has no field 'text'")
    result = cli("eval", exported, "--data", sentiment_files["test"], "--limit", 1000)
    assert result.exit_code == 0 and "(32 rows" in result.output, result.output
    task = config_file(tmp_path, "name: t\ntask: ranking\n")
    assert_one_error(cli("train", "--config", task), "task 'ranking' must be classification or generation")


def test_resume_from_a_damaged_checkpoint_is_one_error(tiny_model_dir, sentiment_files, tmp_path):
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", sentiment_files["train"], "--eval-data", sentiment_files["validation"],
            "--output", out, "--quant", "none", "--virtual-tokens", 4, "--max-steps", 2, "--batch-size", 8,
            "--eval-every", 1]
    assert cli("train", *args).exit_code == 0
    state = out / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert_one_error(cli("train", *args[:-6], "--max-steps", 3, "--batch-size", 8, "--eval-every", 1, "--resume"),
                     "cannot be read", "--overwrite")


def test_a_missing_optional_extra_names_the_package_and_the_pip_command(tmp_path, monkeypatch):
    import sys

    from qprompt.data import read_rows

    monkeypatch.setitem(sys.modules, "datasets", None)  # as on an install without the [hub] extra
    with pytest.raises(QPromptError, match=r"`datasets` package: pip install 'qprompt\[hub\]'"):
        read_rows("hf:imdb:test")


def test_damaged_tokenizer_in_the_aliases_converted_folder(tmp_path, monkeypatch):
    """The built-in alias resolves to a folder in qprompt's cache: a damaged tokenizer there says how to redo it."""
    from qprompt import models

    monkeypatch.setenv("QPROMPT_CACHE", str(tmp_path / "cache"))  # not the session's cache: the real alias lives there
    folder = models.cache_dir() / "models" / "smollm2-135m"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(QPromptError, match="tokenizer.json is damaged .*delete .* and qprompt converts it again"):
        models.load_model("smollm2-135m", "none")
