"""The soft prompt merged into an ONNX graph: parity with PyTorch, the torch-free runtime, quantized graphs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qprompt.artifact import load_artifact
from qprompt.data import Encoder, load_splits
from qprompt.errors import QPromptError
from qprompt.evaluate import classify
from qprompt.export import export
from qprompt.forward import greedy_generate
from qprompt.models import load_model
from qprompt.runtime import ExportedModel, ExportError, Sampling
from qprompt.train import train


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, sentiment_files, tmp_path_factory):
    from qprompt.config import load_recipe, override

    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="nf4", method__virtual_tokens=6,
                      train__max_steps=4, train__batch_size=8, train__lr=0.3, train__eval_every=0,
                      train__eval_rows=8)
    model, tok, info = load_model(recipe.model, recipe.quant)
    out = tmp_path_factory.mktemp("export") / "artifact"
    splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    train(recipe, model, tok, info, splits, out, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(artifact):
    folder = artifact.parent / "export-int8"
    export(artifact, folder, quantize="int8")
    return folder


def test_export_passes_parity_and_writes_a_self_contained_folder(exported):
    manifest = json.loads((exported / "qprompt-export.json").read_text())
    assert manifest["format"] == "qprompt-export/2" and not manifest["task_ids_input"]
    (task,) = manifest["tasks"]
    assert task["parity"]["max_abs_logit_diff"] < 1e-4 and task["parity"]["greedy_tokens_equal"]
    assert task["parity"]["prompts"] == 4  # the artifact's stored validation rows
    assert task["virtual_tokens"] == 6 and task["source"]["method"] == "prompt-tuning"
    assert task["label_targets"] == {"positive": " positive", "negative": " negative"}
    assert manifest["prefix_slots"] == 6 and manifest["max_positions"] == 256 - 6
    assert manifest["model_file"] == "model.int8.onnx"
    assert manifest["files"]["model.int8.onnx"]["next_token_top1_agreement"] >= 0.75
    assert manifest["fp32_weights"] == "full precision"  # int8 starts from the unquantized base
    for name in ("model.onnx", "model.int8.onnx", "tokenizer.json"):
        assert (exported / name).is_file()


def test_graph_has_plain_inputs_and_no_prompt_input(exported):
    import onnx

    graph = onnx.load(str(exported / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and all(n.startswith("past_key_values.") for n in inputs[2:])
    assert [o.name for o in graph.output][0] == "logits"


def test_runtime_matches_pytorch_generation_and_classification(artifact, exported, sentiment_files):
    model, tok, recipe, _ = load_artifact(artifact, quant="none")
    runtime = ExportedModel(exported, "model.onnx")
    rows = [json.loads(x) for x in sentiment_files["test"].read_text().splitlines()][:12]
    encoder = Encoder(recipe, tok, 6)
    examples = encoder.encode_all(rows, "test")
    assert [runtime.prompt_ids(r) for r in rows] == [e.prompt_ids for e in examples]  # same tokens, no torch
    assert runtime.classify(rows) == classify(model, encoder, examples)
    prompt = examples[0].prompt_ids
    # qprompt's greedy decoding (held to cache-free decoding by PEFT's forward in test_methods), not PEFT's
    # generate, which transformers 5.24's cache rename broke for prompt methods.
    x = torch.tensor([prompt])
    expected = greedy_generate(model, x, torch.ones_like(x), 10, sorted(runtime.eos_ids), tok.pad_token_id)[0]
    got = runtime.generate_ids([prompt], Sampling(max_new_tokens=10))[0]
    assert got == expected[: len(got)] and len(got) > 0


def test_left_padded_batches_equal_single_runs(exported):
    runtime = ExportedModel(exported, "model.onnx")
    prompts = [runtime.prompt_ids(t) for t in ("fine", "a long, slow and quietly devastating film", "meh")]
    batched = runtime.generate_ids(prompts, Sampling(max_new_tokens=6))
    alone = [runtime.generate_ids([p], Sampling(max_new_tokens=6))[0] for p in prompts]
    assert batched == alone
    ids, mask = runtime._left_pad(prompts)
    batch_logits, _ = runtime.forward(ids, mask, runtime.empty_past(3))
    for i, p in enumerate(prompts):
        x = np.array([p])
        single, _ = runtime.forward(x, np.ones_like(x), runtime.empty_past(1))
        assert np.abs(batch_logits[i, -1] - single[0, -1]).max() < 1e-4


def test_sampling_is_seeded_and_stops(exported):
    runtime = ExportedModel(exported, "model.onnx")
    s = Sampling(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert runtime.generate(["good"], s) == runtime.generate(["good"], s)
    first = runtime.generate(["good"], Sampling(max_new_tokens=8))[0]
    if len(first) > 2:
        cut = runtime.generate(["good"], Sampling(max_new_tokens=8, stop=(first[1:3],)))[0]
        assert first[1:3] not in cut


@pytest.mark.parametrize("quant", ["int8-dynamic", "int4", "fp4"])
def test_other_quantized_graphs_run(artifact, tmp_path, quant):
    data = export(artifact, tmp_path / quant, quantize=quant)
    info = data.files[f"model.{quant}.onnx"]
    assert info["mb"] > 0 and 0 <= info["next_token_top1_agreement"] <= 1
    runtime = ExportedModel(tmp_path / quant)
    assert set(runtime.classify(["fine", "awful"])) <= {"positive", "negative"}


def test_nf4_graph_holds_the_weights_the_prompt_was_trained_against(artifact, exported, tmp_path):
    """The artifact was trained on nf4: the nf4 export's fp32 graph is bitsandbytes' dequantized weights,
    passes parity against the bitsandbytes model, and MatMulBnb4 reproduces those weights exactly."""
    import onnx

    data = export(artifact, tmp_path / "nf4", quantize="nf4")
    assert data.fp32_weights == "dequantized nf4" and data.model_file == "model.nf4.onnx"
    assert data.tasks[0].parity["max_abs_logit_diff"] < 1e-4 and data.tasks[0].parity["greedy_tokens_equal"]
    info = data.files["model.nf4.onnx"]
    assert info["max_abs_next_token_logit_diff"] < 1e-4 and info["next_token_top1_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "nf4" / "model.nf4.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulBnb4") == 2 * 7  # every projection of both layers; the LM head stays float
    # ...and those are not the full-precision weights: the plain fp32 export differs from it.
    plain = ExportedModel(exported, "model.onnx")
    nf4 = ExportedModel(tmp_path / "nf4", "model.onnx")
    x = np.array([plain.prompt_ids("a fine film")])
    a, _ = plain.forward(x, np.ones_like(x), plain.empty_past(1))
    b, _ = nf4.forward(x, np.ones_like(x), nf4.empty_past(1))
    assert np.abs(a - b).max() > 1e-3


def test_runtime_imports_no_torch(exported):
    code = ("import sys; from qprompt.runtime import ExportedModel; "
            f"m = ExportedModel({str(exported)!r}); print(m.classify(['a fine film']), m.generate(['ok'])); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_broken_exports_are_refused(exported, tmp_path, artifact):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "qprompt-export.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        ExportedModel(broken)
    shutil.copy(exported / "qprompt-export.json", broken / "qprompt-export.json")
    manifest = json.loads((broken / "qprompt-export.json").read_text())
    manifest["num_layers"] = 5
    (broken / "qprompt-export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="does not match"):
        ExportedModel(broken, "model.onnx")
    (broken / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="could not be loaded"):
        ExportedModel(broken, "model.onnx")
    with pytest.raises(ExportError, match="not a qprompt export"):
        ExportedModel(tmp_path)
    with pytest.raises(QPromptError, match="already holds an export"):
        export(artifact, exported)


@pytest.mark.parametrize("method", ["p-tuning", "prefix-tuning", "multitask-prompt-tuning"])
def test_every_method_exports_with_parity(tiny_model_dir, sentiment_files, tmp_path, method):
    """P-tuning folds in like prompt tuning; prefix tuning's learned keys/values are the prefix itself."""
    from qprompt.config import load_recipe, override

    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="nf4", method__name=method,
                      method__virtual_tokens=5, method__prefix_projection=method == "prefix-tuning",
                      train__max_steps=3, train__batch_size=8, train__lr=0.05, train__eval_every=0,
                      train__eval_rows=8)
    model, tok, info = load_model(recipe.model, recipe.quant)
    splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    train(recipe, model, tok, info, splits, tmp_path / "art", progress=False)
    data = export(tmp_path / "art", tmp_path / "exp")
    assert data.tasks[0].parity["max_abs_logit_diff"] < 1e-4 and data.tasks[0].parity["greedy_tokens_equal"]
    assert data.tasks[0].virtual_tokens == 5
    runtime = ExportedModel(tmp_path / "exp")
    peft_model, tok, recipe, _ = load_artifact(tmp_path / "art", quant="none")
    rows = [json.loads(x) for x in sentiment_files["test"].read_text().splitlines()][:8]
    encoder = Encoder(recipe, tok, 5)
    assert runtime.classify(rows) == classify(peft_model, encoder, encoder.encode_all(rows, "test"))


def test_failed_parity_fails_the_export_and_writes_nothing(artifact, tmp_path, monkeypatch):
    import qprompt.export as qexport

    real = qexport.parity

    def off_by_a_lot(*args, **kwargs):
        report = real(*args, **kwargs)
        return {**report, "max_abs_logit_diff": 0.5}

    monkeypatch.setattr(qexport, "parity", off_by_a_lot)
    with pytest.raises(QPromptError, match="does not match PyTorch"):
        export(artifact, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_bare_base_exports_with_parity_and_pads_exactly(tiny_model_dir, tmp_path):
    """The comparison graph (no soft prompt) goes through the same written-out attention: parity with
    PyTorch, and left-padded rows (whose padded query rows see no key at all) equal single runs."""
    from qprompt.config import load_recipe, override

    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="none")
    data = export(None, tmp_path / "bare", base_model=recipe.model, recipe=recipe)
    assert data.tasks[0].virtual_tokens == 0 and data.tasks[0].parity["greedy_tokens_equal"]
    assert data.tasks[0].parity["max_abs_logit_diff"] < 1e-4
    runtime = ExportedModel(tmp_path / "bare")
    prompts = [runtime.prompt_ids(t) for t in ("fine", "a long, slow and quietly devastating film")]
    ids, mask = runtime._left_pad(prompts)
    logits, _ = runtime.forward(ids, mask, runtime.empty_past(2))
    assert np.isfinite(logits).all()
    for i, p in enumerate(prompts):
        x = np.array([p])
        single, _ = runtime.forward(x, np.ones_like(x), runtime.empty_past(1))
        assert np.abs(logits[i, -1] - single[0, -1]).max() < 1e-4
    assert runtime.generate_ids(prompts, Sampling(max_new_tokens=5)) == \
        [runtime.generate_ids([p], Sampling(max_new_tokens=5))[0] for p in prompts]
