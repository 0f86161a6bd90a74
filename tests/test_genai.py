"""onnxruntime-genai (ORT GenAI) runs every export folder unchanged, through the genai_config.json export writes.

Greedy tokens from `og.Generator` must equal qprompt's runtime and PyTorch, for each method and both kinds of
graph, alone and in a batch of prompts of different lengths (ORT GenAI pads a batch on the right), and for each
quantization. A fused graph keeps the prompt in ORT GenAI's own cache buffer, which is `max_length` long: the
virtual tokens count toward max_length, so these tests ask for that many more.

The tiny model here is the shared one with larger random weights (std 0.3): the shared one's greedy text is
one token repeated, under which a misplaced position or an unmasked pad would go unseen. Its tokenizer adds
BOS, so token ids are compared with the BOS in them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
from click.testing import CliRunner

from qprompt.artifact import load_artifact
from qprompt.cli import main
from qprompt.deploy.genai import GENAI_CONFIG, GENERIC_DECODER_TYPE, PLAIN_DECODER_TYPES, genai_model_type
from qprompt.deploy.runtime import QUANTIZATIONS, ExportedModel, Sampling
from qprompt.export import export
from qprompt.forward import greedy_generate
from qprompt.owned import owned
from tests.kit import train_small

NEW_TOKENS = 8
# Different lengths (4 to 12 words), so the batch has rows padded by 0 to ~10 tokens.
TEXTS = ["fine", "a long, slow and quietly devastating film", "meh", "warm, funny and far smarter than it looks"]


@pytest.fixture(scope="module")
def lively_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with weights drawn at std 0.3, and a tokenizer that puts <s> (BOS) before every text."""
    from tokenizers import Tokenizer, processors
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("genai") / "lively-llama"
    shutil.copytree(tiny_model_dir, folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:  # embeddings and projections; the norms stay at 1
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def train_artifact(model_dir: Path, sentiment_files: dict, method: str, output: Path) -> Path:
    return train_small(model_dir, sentiment_files, output, method__name=method, method__virtual_tokens=5,
                       method__prefix_projection=method == "prefix-tuning", train__lr=0.05)


@pytest.fixture(scope="module")
def artifacts(lively_model_dir, sentiment_files) -> dict[str, Path]:
    root = lively_model_dir.parent
    return {m: train_artifact(lively_model_dir, sentiment_files, m, root / f"art-{m}")
            for m in ("prompt-tuning", "p-tuning", "prefix-tuning")}


@pytest.fixture(scope="module", params=["fused", "written"])
def int8_export(artifacts, request) -> Path:
    """The prompt-tuning artifact through the command line, `qprompt export --quantize int8`, as either graph."""
    folder = artifacts["prompt-tuning"].parent / f"exp-int8-{request.param}"
    result = CliRunner().invoke(main, ["export", str(artifacts["prompt-tuning"]), "--output", str(folder),
                                       "--quantize", "int8", "--graph", request.param, "--parity-tokens", "2"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module", params=["fused", "written"])
def exports(artifacts, request) -> dict[str, Path]:
    """One float32 export per method, as either graph."""
    folders = {}
    for method in ("prompt-tuning", "p-tuning", "prefix-tuning"):
        folders[method] = artifacts[method].parent / f"exp-{method}-{request.param}"
        export(artifacts[method], folders[method], parity_tokens=2, graph=request.param)
    return folders


def genai_model(folder: Path, model_file: str | None = None, model_type: str | None = None) -> og.Model:
    """og.Model(folder), with its genai_config.json overlaid to read another graph or model type."""
    config = og.Config(str(folder))
    overlay: dict = {}
    if model_file:
        overlay["decoder"] = {"filename": model_file}
    if model_type:
        overlay["type"] = model_type
    if overlay:
        config.overlay(json.dumps({"model": overlay}))
    return og.Model(config)


def genai_tokenizer(model: og.Model) -> og.Tokenizer:
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # ORT GenAI's default leaves BOS out
    return tokenizer


def genai_generate(model: og.Model, batch: np.ndarray, new_tokens: int, virtual: int = 0) -> list[list[int]]:
    """ORT GenAI's greedy continuation of a batch (right-padded, as encode_batch gives it), cut before EOS.
    `virtual`: the virtual tokens a fused graph keeps in the cache buffer, which max_length counts."""
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=batch.shape[0], max_length=batch.shape[1] + new_tokens + virtual)
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
    eos = set(og.Tokenizer(model).eos_token_ids)
    return [until_eos([int(t) for t in generator.get_sequence(i)[batch.shape[1]:]], eos)[:new_tokens]
            for i in range(len(batch))]


def virtual_tokens(runtime: ExportedModel) -> int:
    return runtime.manifest.prefix_slots if runtime.fused else 0


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def torch_generate(artifact: Path, prompts: list[list[int]], eos: set[int], pad_id: int) -> list[list[int]]:
    """qprompt's cached greedy decoding on the PEFT model (not PEFT's generate: see tests/test_export.py)."""
    model, _, _, _ = load_artifact(artifact, quant="none")
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # greedy_generate takes a left-padded batch
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = greedy_generate(model, ids, mask, NEW_TOKENS, sorted(eos), pad_id)
    return [until_eos(row, eos) for row in out]


def test_config_points_at_the_quantized_graph_and_names_its_interface(int8_export):
    config = json.loads((int8_export / GENAI_CONFIG).read_text())
    manifest = json.loads((int8_export / "qprompt-export.json").read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert decoder["filename"] == manifest["model_file"] == "model.int8.onnx"
    assert model["type"] == "llama"
    if manifest["graph"] == "fused":  # the builder's own config: one shared buffer of max_length, prompt included
        assert model["context_length"] == 256 == manifest["max_positions"] + manifest["prefix_slots"]
        assert config["search"]["past_present_share_buffer"]
    else:
        assert model["context_length"] == manifest["max_positions"] == 256 - 5
        assert not config["search"]["past_present_share_buffer"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, [2], 3) or \
        (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 3)
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert config["search"]["max_length"] == model["context_length"] and not config["search"]["do_sample"]
    assert GENAI_CONFIG in owned(int8_export)  # --overwrite may replace it, and only it
    # Every name the config gives is one of the graph's, and every graph input is named: no position_ids.
    graph = onnx.load(str(int8_export / "model.int8.onnx"), load_external_data=False).graph
    layers = range(decoder["num_hidden_layers"])
    names = decoder["inputs"]
    inputs = [names["input_ids"], names["attention_mask"]]
    inputs += [names[f"past_{kind}_names"] % i for i in layers for kind in ("key", "value")]
    assert sorted(inputs) == sorted(i.name for i in graph.input) and "position_ids" not in names
    names = decoder["outputs"]
    outputs = [names["logits"], *[names[f"present_{kind}_names"] % i for i in layers for kind in ("key", "value")]]
    assert sorted(outputs) == sorted(o.name for o in graph.output)


def test_the_quantized_export_runs_in_genai_as_written(int8_export):
    runtime = ExportedModel(int8_export)  # the manifest's model_file: model.int8.onnx
    prompts = [runtime.prompt_ids(t) for t in TEXTS]
    expected = [runtime.generate_ids([p], Sampling(max_new_tokens=NEW_TOKENS))[0] for p in prompts]
    model = og.Model(str(int8_export))
    virtual = virtual_tokens(runtime)
    assert [genai_generate(model, np.array([p], dtype=np.int32), NEW_TOKENS, virtual)[0] for p in prompts] == expected


def test_a_generation_loop_to_max_length_ends_with_eos_in_a_fused_graph(exports):
    """ORT GenAI generates until the sequence reaches max_length; the fused graph's prompt takes that many slots of
    the buffer, so the graph ends generation with EOS, virtual-token count early, instead of failing."""
    runtime = ExportedModel(exports["prompt-tuning"])
    prompt = runtime.prompt_ids(TEXTS[1])
    expected = runtime.generate_ids([prompt], Sampling(max_new_tokens=NEW_TOKENS))[0]
    model = og.Model(str(exports["prompt-tuning"]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS)  # no room counted for the virtual tokens
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    out = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    if runtime.fused:
        room = NEW_TOKENS - virtual_tokens(runtime)  # then EOS: ORT GenAI ends the sequence
        assert until_eos(out, runtime.eos_ids) == expected[:room] and len(expected) > room
    else:
        assert until_eos(out, runtime.eos_ids) == expected


def test_genai_tokenizer_gives_qprompt_ids_with_bos(int8_export):
    runtime = ExportedModel(int8_export)
    tokenizer = genai_tokenizer(og.Model(str(int8_export)))
    template = runtime.task().template.prompt
    for text in TEXTS:
        ids = runtime.prompt_ids(text)
        assert ids[0] == tokenizer.bos_token_id == 1
        assert [int(t) for t in tokenizer.encode(template.format(text=text))] == ids
    plain = og.Tokenizer(og.Model(str(int8_export)))  # what docs/export.md warns about: no BOS unless asked
    assert [int(t) for t in plain.encode(template.format(text=TEXTS[0]))] == runtime.prompt_ids(TEXTS[0])[1:]


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning"])
def test_genai_equals_runtime_and_pytorch_alone_and_in_a_batch(exports, artifacts, method):
    folder = exports[method]
    runtime = ExportedModel(folder, "model.onnx")
    prompts = [runtime.prompt_ids(t) for t in TEXTS]
    expected = torch_generate(artifacts[method], prompts, runtime.eos_ids, runtime.pad_id)
    assert len({tuple(e) for e in expected}) == len(TEXTS)  # distinct continuations: a mix-up cannot pass
    assert runtime.generate_ids(prompts, Sampling(max_new_tokens=NEW_TOKENS)) == expected  # one padded batch
    model = genai_model(folder, "model.onnx")
    virtual = virtual_tokens(runtime)
    alone = [genai_generate(model, np.array([p], dtype=np.int32), NEW_TOKENS, virtual)[0] for p in prompts]
    assert alone == expected
    tokenizer = genai_tokenizer(model)
    batch = tokenizer.encode_batch([runtime.task().template.prompt.format(text=t) for t in TEXTS]).as_numpy()
    pad = tokenizer.pad_token_id
    for row, p in zip(batch, prompts):  # right padding: the prompt, then pad ids
        assert list(row[: len(p)]) == p and set(row[len(p):]) <= {pad}
    assert genai_generate(model, batch, NEW_TOKENS, virtual) == expected


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_every_quantization_gives_the_runtime_tokens(artifacts, tmp_path, quantization):
    """The same fused graph file in both runtimes. One prompt at a time: int8-dynamic quantizes activations with one
    scale for the whole batch, so its batched tokens depend on the other rows and on where the padding is."""
    folder = tmp_path / "export"
    export(artifacts["prompt-tuning"], folder, quantize=quantization, parity_tokens=2)
    runtime = ExportedModel(folder)
    model = og.Model(str(folder))
    for text in TEXTS:
        prompt = runtime.prompt_ids(text)
        expected = runtime.generate_ids([prompt], Sampling(max_new_tokens=NEW_TOKENS))[0]
        got = genai_generate(model, np.array([prompt], dtype=np.int32), NEW_TOKENS, virtual_tokens(runtime))[0]
        assert got == expected


def test_model_type_is_the_base_type_where_genai_knows_it_as_a_plain_decoder(artifacts, tmp_path):
    """For the written-out graph, qprompt writes genai_config.json itself and picks the model type."""
    assert genai_model_type("llama") == "llama" and genai_model_type("qwen2") == "qwen2"
    for other in ("gpt2", "lfm2", "phi3", "phimoe", "phi3small", "my_new_arch", None):
        assert genai_model_type(other) == GENERIC_DECODER_TYPE
    # Every type the export may write loads in the installed ORT GenAI and gives the same tokens.
    written = tmp_path / "written"
    export(artifacts["prompt-tuning"], written, graph="written", parity_tokens=2)
    runtime = ExportedModel(written, "model.onnx")
    prompt = runtime.prompt_ids(TEXTS[1])
    expected = runtime.generate_ids([prompt], Sampling(max_new_tokens=NEW_TOKENS))[0]
    for model_type in sorted(PLAIN_DECODER_TYPES | {GENERIC_DECODER_TYPE}):
        model = genai_model(written, "model.onnx", model_type)
        assert genai_generate(model, np.array([prompt], dtype=np.int32), NEW_TOKENS)[0] == expected, model_type
    with pytest.raises(RuntimeError, match="Unsupported model_type"):
        genai_model(written, "model.onnx", "my_new_arch")


def test_a_users_genai_config_beside_an_export_from_before_records_is_kept(tmp_path):
    """An export from before `.qprompt-files` never wrote genai_config.json: one there is the user's."""
    from qprompt.errors import QPromptError
    from qprompt.export import install_export

    output, new = tmp_path / "export", tmp_path / ".export.partial"
    output.mkdir()
    new.mkdir()
    (output / "qprompt-export.json").write_text(json.dumps({"files": {"model.onnx": {}}}))
    (output / GENAI_CONFIG).write_text("{}  # hand-written")
    for name in ("qprompt-export.json", "model.onnx", GENAI_CONFIG):
        (new / name).write_text("new")
    with pytest.raises(QPromptError, match=f"holds {GENAI_CONFIG}, which qprompt did not write"):
        install_export(new, output)
    assert (output / GENAI_CONFIG).read_text() == "{}  # hand-written"
    (output / GENAI_CONFIG).unlink()  # moved away: the export installs, its config with it
    install_export(new, output)
    assert (output / GENAI_CONFIG).read_text() == "new" and GENAI_CONFIG in owned(output)
