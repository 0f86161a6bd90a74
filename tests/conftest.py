"""Shared fixtures: a tiny random-weight Llama with a real (small) BPE tokenizer, real data slices, and trained
artifacts made once per session (tests/kit.py holds the plain helpers).

The tiny model is built from a config, so no weights are downloaded; its tokenizer is trained on the
test data itself in well under a second. Data comes from tests/data (small committed slices of the
real task data; tests/data/README.md names their sources and licences).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.kit import data_rows, train_small, write_jsonl


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache from a test."""
    monkeypatch.setenv("QPROMPT_CACHE", str(tmp_path_factory.getbasetemp() / "qprompt-cache"))
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a 600-token BPE vocabulary, saved as a local model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [r["text"] for r in data_rows("rotten_tomatoes", "train")]
    texts += [f"{r['premise']} {r['hypothesis']}" for r in data_rows("snli", "train")]
    texts += ["Review: Sentiment: positive negative entailment neutral contradiction spam ham"] * 10
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", model_max_length=256)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sentiment-data")
    return {
        "train": write_jsonl(folder / "train.jsonl", data_rows("rotten_tomatoes", "train", 96)),
        "validation": write_jsonl(folder / "validation.jsonl", data_rows("rotten_tomatoes", "validation", 24)),
        "test": write_jsonl(folder / "test.jsonl", data_rows("rotten_tomatoes", "test", 32)),
    }


@pytest.fixture
def tiny_recipe(tiny_model_dir):
    """The real sentiment recipe, shrunk to a few fast steps on the tiny model."""
    from tests.kit import small_recipe

    return small_recipe(tiny_model_dir, train__max_steps=6, train__eval_every=3, train__eval_rows=16,
                        train__log_every=1, train__warmup_steps=1)


@pytest.fixture(scope="session")
def artifact_factory(tiny_model_dir, sentiment_files, tmp_path_factory):
    """`artifact_factory(name="artifact", **changes)`: a tiny sentiment artifact (tests/kit.py's small recipe with
    `changes`) in a folder called `name` (an export's task name), trained once per session for each name and set of
    changes and shared: read it, never change it (copy it first)."""
    made: dict[tuple, Path] = {}

    def make(name: str = "artifact", **changes) -> Path:
        key = (name, *sorted(changes.items()))
        if key not in made:
            made[key] = train_small(tiny_model_dir, sentiment_files, tmp_path_factory.mktemp("artifact") / name,
                                    **changes)
        return made[key]

    return make


@pytest.fixture(scope="session")
def sentiment_export(artifact_factory, tmp_path_factory) -> Path:
    """A prompt-tuning export (fp32) of the tiny model, trained a few steps on the sentiment slice: for the
    tests of what runs an export (the server, the deploy-only install)."""
    from qprompt.export import export

    folder = tmp_path_factory.mktemp("sentiment-export")
    export(artifact_factory(train__max_steps=4), folder / "export", parity_tokens=4)
    return folder / "export"
