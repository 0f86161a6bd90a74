"""The soft prompt merged into an ONNX graph: parity with PyTorch, the torch-free runtime, quantized graphs.

Two kinds of graph: fused (onnxruntime-genai's model builder makes the base's graph, the prompt goes into
its KV cache) and written out (torch's exporter). The tiny Llama is a family the builder knows, so `auto`
gives the fused one; `graph="written"` asks for the other.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from qprompt.artifact import load_artifact
from qprompt.data import Encoder
from qprompt.deploy.runtime import ExportedModel, ExportError, Sampling
from qprompt.errors import QPromptError
from qprompt.evaluate import classify
from qprompt.export import PARITY_ABS, PARITY_REL_FUSED, export
from qprompt.forward import greedy_generate
from tests.kit import data_rows, train_small

GRAPHS = ["fused", "written"]


def train_tiny(model_dir, sentiment_files, out, quant="none", method="prompt-tuning", tokens=6, steps=4):
    return train_small(model_dir, sentiment_files, out, quant=quant, method__name=method, method__virtual_tokens=tokens,
                       method__prefix_projection=method == "prefix-tuning", train__max_steps=steps, train__lr=0.3)


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, sentiment_files, tmp_path_factory):
    return train_tiny(tiny_model_dir, sentiment_files, tmp_path_factory.mktemp("export") / "artifact", quant="nf4")


@pytest.fixture(scope="module", params=GRAPHS)
def exported(artifact, request):
    """The nf4-trained artifact exported in float32, as each kind of graph."""
    folder = artifact.parent / f"export-{request.param}"
    export(artifact, folder, graph=request.param)
    return folder


@pytest.fixture(scope="module")
def int4_artifact(tiny_model_dir, sentiment_files, tmp_path_factory):
    return train_tiny(tiny_model_dir, sentiment_files, tmp_path_factory.mktemp("int4") / "artifact", quant="int4")


def test_export_passes_parity_and_writes_a_self_contained_folder(exported):
    manifest = json.loads((exported / "qprompt-export.json").read_text())
    assert manifest["format"] == "qprompt-export/3" and not manifest["task_ids_input"]
    assert manifest["graph"] == exported.name.removeprefix("export-")
    (task,) = manifest["tasks"]
    assert task["parity"]["max_abs_logit_diff"] < 1e-4 and task["parity"]["greedy_tokens_equal"]
    assert task["parity"]["exact"] and task["parity"]["prompts"] == 4  # the artifact's stored validation rows
    assert task["virtual_tokens"] == 6 and task["source"]["method"] == "prompt-tuning"
    assert task["label_targets"] == {"positive": " positive", "negative": " negative"}
    assert manifest["prefix_slots"] == 6 and manifest["max_positions"] == 256 - 6
    assert manifest["model_file"] == "model.onnx" and manifest["fp32_weights"] == "full precision"
    for name in ("model.onnx", "tokenizer.json", "genai_config.json"):
        assert (exported / name).is_file()


def test_the_fused_graph_is_the_builders_with_the_prompt_inside(artifact, tmp_path):
    """--quantize int4: GroupQueryAttention, fused q/k/v, fused skip + RMSNorm, int4 MatMulNBits at the accuracy level
    asked for with the LM head among them, the tied embedding read from the LM head's codes; the prompt a constant."""
    data = export(artifact, tmp_path / "int4", quantize="int4", accuracy_level=4)
    assert data.graph == "fused" and data.model_file == "model.int4.onnx"
    graph = onnx.load(str(tmp_path / "int4" / "model.int4.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "SkipSimplifiedLayerNormalization" in ops
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5 + 1  # per layer q/k/v (one fused), o, gate, up, down; and the LM head
    assert sum("qkv_proj" in n.name for n in nbits) == 2 and any("lm_head" in n.name for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert ops.count("GatherBlockQuantized") == 1
    inputs = [i.name for i in graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and all(n.startswith("past_key_values.") for n in inputs[2:])
    assert [o.name for o in graph.output][0] == "logits"
    assert "qprompt.prefix" in {t.name for t in graph.initializer}


def test_a_quantized_export_holds_only_the_graph_it_deploys(artifact, tmp_path):
    export(artifact, tmp_path / "q", quantize="int4")
    names = {p.name for p in (tmp_path / "q").iterdir()}
    assert names == {"model.int4.onnx", "model.int4.onnx.data", "tokenizer.json", "tokenizer_config.json",
                     "genai_config.json", "qprompt-export.json", ".qprompt-files"}
    data = export(artifact, tmp_path / "both", quantize="int4", keep_float=True)
    assert {"model.onnx", "model.int4.onnx"} <= {p.name for p in (tmp_path / "both").iterdir()}
    assert data.model_file == "model.int4.onnx" and set(data.files) == {"model.int4.onnx", "model.onnx"}
    assert data.files["model.int4.onnx"]["mb"] < data.files["model.onnx"]["mb"] / 4


def test_runtime_matches_pytorch_generation_and_classification(artifact, exported, sentiment_files):
    model, tok, recipe, _ = load_artifact(artifact, quant="none")
    runtime = ExportedModel(exported)
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


def test_over_long_rows_are_cut_as_the_recipe_cuts_them(artifact, exported):
    """The recipe truncates over-long prompts (data.on_long: truncate, keeping the prompt's closing tokens): an
    export scored with truncate=True (what `qprompt eval EXPORT` does) sees the very tokens, and labels, that the
    PyTorch evaluation sees; without it, such a row is refused."""
    model, tok, recipe, _ = load_artifact(artifact, quant="none")
    runtime = ExportedModel(exported)
    rows = [{"text": r["text"] * 40, "label": r["label"]} for r in data_rows("rotten_tomatoes", "test", 6)]
    encoder = Encoder(recipe, tok, 6)
    examples = encoder.encode_all(rows, "test")
    assert encoder.truncated == len(rows)
    assert [runtime.prompt_ids(r, truncate=True) for r in rows] == [e.prompt_ids for e in examples]
    assert runtime.classify(rows, truncate=True) == classify(model, encoder, examples)
    with pytest.raises(ExportError, match="this export takes at most"):
        runtime.classify(rows)


def test_padded_batches_equal_single_runs(exported):
    """Right-padded (fused) or left-padded (written-out), a row gives what it gives alone."""
    runtime = ExportedModel(exported)
    prompts = [runtime.prompt_ids(t) for t in ("fine", "a long, slow and quietly devastating film", "meh")]
    batched = runtime.generate_ids(prompts, Sampling(max_new_tokens=6))
    alone = [runtime.generate_ids([p], Sampling(max_new_tokens=6))[0] for p in prompts]
    assert batched == alone
    together = runtime.prompt_logits(prompts)
    for i, p in enumerate(prompts):
        single = runtime.prompt_logits([p])[0]
        assert together[i].shape == single.shape == (len(p), runtime.manifest.vocab_size)
        assert np.abs(together[i] - single).max() < 1e-4


def test_rows_joining_and_leaving_a_running_batch_keep_their_tokens(exported):
    """The server's batching: a row that joins mid-generation, or stays after another leaves, decodes as it does alone
    (a fused graph's buffer grows as the rows get longer)."""
    from qprompt.deploy.runtime import DecodeBatch

    runtime = ExportedModel(exported)
    a, b = runtime.prompt_ids("a long, slow and quietly devastating film"), runtime.prompt_ids("meh")
    batch, rows, got = DecodeBatch(runtime), [0], {0: [], 1: []}
    logits = batch.join([a], reserve=1)  # little room: the buffer must grow
    for step in range(12):
        tokens = [int(row.argmax()) for row in logits]
        for r, t in zip(rows, tokens):
            got[r].append(t)
        if step == 8:  # a leaves
            tokens, rows = [tokens[rows.index(1)]], [1]
            batch.keep([1])
        logits = batch.step(np.array(tokens))
        if step == 2:  # b joins after a's third token
            logits, rows = np.concatenate([logits, batch.join([b])]), [0, 1]
    for r, prompt in ((0, a), (1, b)):
        alone = greedy_ids(runtime, prompt, len(got[r]))
        assert got[r] == alone and len(alone) >= 9


def greedy_ids(runtime, prompt, n):
    """n greedy tokens, EOS or not (generate_ids would stop at one)."""
    from qprompt.deploy.runtime import DecodeBatch

    batch, out = DecodeBatch(runtime), []
    logits = batch.join([prompt])
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = batch.step(np.array(out[-1:]))
    return out


def test_sampling_is_seeded_and_stops(exported):
    runtime = ExportedModel(exported)
    s = Sampling(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert runtime.generate(["good"], s) == runtime.generate(["good"], s)
    first = runtime.generate(["good"], Sampling(max_new_tokens=8))[0]
    if len(first) > 2:
        cut = runtime.generate(["good"], Sampling(max_new_tokens=8, stop=(first[1:3],)))[0]
        assert first[1:3] not in cut


@pytest.mark.parametrize("quant", ["int8", "int8-dynamic", "fp4"])
def test_other_quantized_graphs_agree_with_pytorch(artifact, tmp_path, quant):
    data = export(artifact, tmp_path / quant, quantize=quant)
    assert data.graph == "fused" and set(data.files) == {f"model.{quant}.onnx"}
    parity = data.tasks[0].parity
    if quant == "fp4":  # bitsandbytes' own fp4 weights, computed in float32: exact
        assert parity["exact"] and parity["max_abs_logit_diff"] <= parity["tolerance"]
    else:  # int8 weights (and activations) the PyTorch model does not have: measured, not exact
        assert not parity["exact"] and parity["next_token_agreement"] >= 0.75
    runtime = ExportedModel(tmp_path / quant)
    reference = ExportedModel(tmp_path / quant)  # same folder, second session: the runtime is deterministic
    rows = data_rows("rotten_tomatoes", "test", 8)
    assert runtime.classify(rows) == reference.classify(rows)


@pytest.mark.parametrize("graph", GRAPHS)
def test_nf4_graph_holds_the_weights_the_prompt_was_trained_against(artifact, tmp_path, graph):
    """The artifact was trained on nf4: the nf4 export holds bitsandbytes' dequantized weights re-encoded by
    MatMulBnb4 (blocks of 64 are bitsandbytes' too), and matches the bitsandbytes model within float rounding."""
    data = export(artifact, tmp_path / "nf4", quantize="nf4", keep_float=True, graph=graph)
    assert data.fp32_weights == "dequantized nf4" and data.model_file == "model.nf4.onnx"
    parity = data.tasks[0].parity
    assert parity["exact"] and parity["max_abs_logit_diff"] < 1e-4 and parity["greedy_tokens_equal"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "nf4" / "model.nf4.onnx")).graph.node]
    # Every projection (q/k/v as one in the fused graph); the LM head stays float, as in bitsandbytes.
    assert ops.count("MatMulBnb4") == 2 * (5 if graph == "fused" else 7)
    # ...and those are not the full-precision weights: the plain fp32 export differs from it.
    export(artifact, tmp_path / "plain", graph=graph)
    plain = ExportedModel(tmp_path / "plain")
    nf4 = ExportedModel(tmp_path / "nf4", "model.onnx")
    x = plain.prompt_ids("a fine film")
    assert np.abs(plain.prompt_logits([x])[0] - nf4.prompt_logits([x])[0]).max() > 1e-3


def test_an_int4_trained_prompt_exports_to_the_weights_it_learned(int4_artifact, tmp_path):
    """quant int4 trains on ONNX Runtime's own int4 codes. A classification export computes in float32 by default
    (accuracy level 1): the int4 graph is then the trained model to float rounding (logits within the tolerance, the
    same greedy tokens and labels). At level 4 (int8 activations: the generation default) its float32-compute twin
    must pass that check, and the deployed graph's labels are measured against the trained model's."""
    model, tok, recipe, manifest = load_artifact(int4_artifact)
    assert manifest["base"]["int4"] == {"block_size": 32, "symmetric": True}
    rows = data_rows("rotten_tomatoes", "test", 32)
    encoder = Encoder(recipe, tok, 6)
    trained = classify(model, encoder, encoder.encode_all(rows, "test"))
    exact = export(int4_artifact, tmp_path / "exact", quantize="int4")
    parity = exact.tasks[0].parity
    assert exact.weights == {"quantization": "int4", "accuracy_level": 1,
                             "int4": {"block_size": 32, "symmetric": True}}
    assert parity["exact"] and parity["max_abs_logit_diff"] <= parity["tolerance"] and parity["greedy_tokens_equal"]
    assert ExportedModel(tmp_path / "exact").classify(rows) == trained
    level4 = export(int4_artifact, tmp_path / "level4", quantize="int4", accuracy_level=4)
    twin = level4.tasks[0].parity["float_compute_twin"]
    assert twin["max_abs_logit_diff"] <= twin["tolerance"] and twin["greedy_tokens_equal"]
    labels = ExportedModel(tmp_path / "level4").classify(rows)
    assert sum(a == b for a, b in zip(labels, trained)) >= 0.9 * len(rows)


def test_the_int4_base_holds_the_graphs_codes(int4_artifact, tmp_path):
    """The codes and scales qprompt trains with are the builder's, byte for byte: every MatMulNBits weight of the
    int4 graph equals Int4Linear's codes (q/k/v concatenated for the fused projection)."""
    from onnx import numpy_helper

    from qprompt.int4 import Int4Linear

    export(int4_artifact, tmp_path / "g", quantize="int4")
    graph = onnx.load(str(tmp_path / "g" / "model.int4.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    model, _, _, _ = load_artifact(int4_artifact)
    attn = model.get_base_model().model.layers[1].self_attn
    assert isinstance(attn.q_proj, Int4Linear)
    packed = np.concatenate([attn.q_proj.codes.numpy(), attn.k_proj.codes.numpy(), attn.v_proj.codes.numpy()])
    scales = np.concatenate([attn.q_proj.scales.numpy(), attn.k_proj.scales.numpy(), attn.v_proj.scales.numpy()])
    assert np.array_equal(weights["model.layers.1.attn.qkv_proj.MatMul.weight_Q4"], packed)
    assert np.array_equal(weights["model.layers.1.attn.qkv_proj.MatMul.weight_scales"], scales)


def test_runtime_imports_no_torch(exported):
    code = ("import sys; from qprompt.deploy.runtime import ExportedModel; "
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
        ExportedModel(broken)
    (broken / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="could not be loaded"):
        ExportedModel(broken)
    with pytest.raises(ExportError, match="not a qprompt export"):
        ExportedModel(tmp_path)
    with pytest.raises(QPromptError, match="already holds an export"):
        export(artifact, exported)


@pytest.mark.parametrize("method", ["p-tuning", "prefix-tuning", "multitask-prompt-tuning"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_every_method_exports_with_parity(tiny_model_dir, sentiment_files, tmp_path, method, graph):
    """P-tuning folds in like prompt tuning; prefix tuning's learned keys/values are the prefix itself (in the fused
    graph, rotated back so that attention's own rotary embedding gives them again)."""
    art = train_tiny(tiny_model_dir, sentiment_files, tmp_path / "art", quant="nf4", method=method, tokens=5, steps=3)
    data = export(art, tmp_path / "exp", graph=graph)
    assert data.graph == graph
    assert data.tasks[0].parity["max_abs_logit_diff"] < 1e-4 and data.tasks[0].parity["greedy_tokens_equal"]
    assert data.tasks[0].virtual_tokens == 5
    runtime = ExportedModel(tmp_path / "exp")
    peft_model, tok, recipe, _ = load_artifact(art, quant="none")
    rows = data_rows("rotten_tomatoes", "test", 8)
    encoder = Encoder(recipe, tok, 5)
    assert runtime.classify(rows) == classify(peft_model, encoder, encoder.encode_all(rows, "test"))


def test_failed_parity_fails_the_export_and_writes_nothing(artifact, tmp_path, monkeypatch):
    import qprompt.export.build as build

    real = build.parity

    def off_by_a_lot(*args, **kwargs):
        report = real(*args, **kwargs)
        return {**report, "max_abs_logit_diff": 0.5}

    monkeypatch.setattr(build, "parity", off_by_a_lot)
    with pytest.raises(QPromptError, match="does not match PyTorch"):
        export(artifact, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the export nor its temporary folder


@pytest.mark.parametrize("graph", GRAPHS)
def test_bare_base_exports_with_parity_and_pads_exactly(tiny_model_dir, tmp_path, graph):
    """The comparison graph (no soft prompt) goes through the same code: parity with PyTorch, and padded rows equal
    single runs."""
    from qprompt.config import load_recipe, override

    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="none")
    data = export(None, tmp_path / "bare", base_model=recipe.model, recipe=recipe, graph=graph)
    assert data.tasks[0].virtual_tokens == 0 and data.tasks[0].parity["greedy_tokens_equal"]
    assert data.tasks[0].parity["max_abs_logit_diff"] < 1e-4 and data.prefix_slots == 0
    runtime = ExportedModel(tmp_path / "bare")
    prompts = [runtime.prompt_ids(t) for t in ("fine", "a long, slow and quietly devastating film")]
    together = runtime.prompt_logits(prompts)
    assert all(np.isfinite(rows).all() for rows in together)
    for rows, p in zip(together, prompts):
        assert np.abs(rows - runtime.prompt_logits([p])[0]).max() < 1e-4
    assert runtime.generate_ids(prompts, Sampling(max_new_tokens=5)) == \
        [runtime.generate_ids([p], Sampling(max_new_tokens=5))[0] for p in prompts]


def test_a_full_cache_buffer_ends_generation_with_eos(artifact, tmp_path):
    """onnxruntime-genai sizes the cache buffer to max_length, which the prompt's virtual tokens share: when the next
    call would not fit, the fused graph makes EOS the only choice (so a `while not is_done()` loop ends instead of
    failing). Here the buffer is one slot short of the next call."""
    export(artifact, tmp_path / "fused", graph="fused")
    runtime = ExportedModel(tmp_path / "fused")
    prompt = runtime.prompt_ids("a fine film")
    slots = runtime.manifest.prefix_slots
    eos = runtime.manifest.eos_token_ids[0]
    ids, mask = np.array([prompt]), np.ones((1, len(prompt)), dtype=np.int64)
    roomy, _ = runtime.forward(ids, mask, runtime.empty_past(1, slots + len(prompt) + 2))
    full, _ = runtime.forward(ids, mask, runtime.empty_past(1, slots + len(prompt)))
    assert int(roomy[0, -1].argmax()) != eos and int(full[0, -1].argmax()) == eos
    assert abs(full[0, -1, eos] - roomy[0, -1, eos]) < max(PARITY_ABS, PARITY_REL_FUSED * 10)
