"""The method registry: a method registered in one place is a CLI choice, passes config validation and `plan`,
trains and exports; an unknown name is one clear error; every method's declarations match what PEFT builds."""

from __future__ import annotations

import json

import pytest

from qprompt.config import load_recipe, override
from qprompt.errors import QPromptError
from qprompt.export import export
from qprompt.forward import is_prefix
from qprompt.methods import (
    EMBEDDING_PREFIX,
    KV_PREFIX,
    METHODS,
    SoftPromptMethod,
    add_soft_prompt,
    get_method,
    prompt_tuning,
    register,
    trainable_parameters,
)
from qprompt.models import load_model
from qprompt.plan import Shape
from tests.kit import cli


@pytest.fixture
def new_method():
    """A method as a newcomer adds one: a module's worth of declarations and one `register` call (here prompt
    tuning's config and count under a new name, with its own learning rate)."""
    method = register(SoftPromptMethod(
        name="test-tuning", help="prompt tuning again", peft_config=prompt_tuning.peft_config, suggested_lr=0.05,
        exports_as=EMBEDDING_PREFIX, trainable_parameters=prompt_tuning.trainable_parameters,
    ))
    yield method
    del METHODS[method.name]


def test_a_registered_method_is_a_choice_that_plans_trains_and_exports(new_method, tiny_model_dir, sentiment_files,
                                                                      tmp_path):
    planned = cli("plan", "--model", tiny_model_dir, "--method", "test-tuning", "--device", "cpu")
    assert planned.exit_code == 0, planned.output
    assert "test-tuning (100 virtual tokens)" in planned.output
    out = tmp_path / "art"
    trained = cli("train", "--model", tiny_model_dir, "--recipe", "sentiment", "--method", "test-tuning",
                  "--data", sentiment_files["train"], "--eval-data", sentiment_files["validation"], "--max-steps", 1,
                  "--batch-size", 4, "--eval-every", 0, "--quant", "none", "--virtual-tokens", 4, "--output", out)
    assert trained.exit_code == 0, trained.output
    recipe = json.loads((out / "qprompt.json").read_text())["recipe"]
    assert recipe["method"]["name"] == "test-tuning" and recipe["train"]["lr"] == 0.05  # its own suggested rate
    data = export(out, tmp_path / "export", parity_tokens=2)
    assert data.tasks[0].source["method"] == "test-tuning" and data.tasks[0].virtual_tokens == 4
    assert data.tasks[0].parity["greedy_tokens_equal"]


def test_an_unknown_method_is_one_clear_error(tmp_path):
    with pytest.raises(QPromptError, match="unknown method 'nope': use one of prompt-tuning, p-tuning, prefix-tuning, "
                       "multitask-prompt-tuning"):
        get_method("nope")
    config = tmp_path / "bad.yaml"
    config.write_text("name: t\ntask: generation\nmethod: {name: nope, init: random}\n")
    result = cli("train", "--config", config, "--model", "/no/such/model-folder")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        "error: recipe t: method 'nope' must be prompt-tuning, p-tuning, prefix-tuning or multitask-prompt-tuning"]
    assert cli("plan", "--method", "nope").exit_code == 2  # click names the choices


def test_a_name_is_registered_once(new_method):
    with pytest.raises(ValueError, match="already registered"):
        register(new_method)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_declares_what_peft_builds(tiny_model_dir, name):
    """`exports_as` must be how the forward pass and the export run its PEFT model; `trainable_parameters`, the
    count `plan` uses, must be what PEFT trains."""
    method = get_method(name)
    recipe = override(load_recipe("sentiment"), method__name=name, method__virtual_tokens=5, method__init="random")
    base, _, info = load_model(str(tiny_model_dir), "none")
    model = add_soft_prompt(base, recipe, info.path)
    assert is_prefix(model) == (method.exports_as == KV_PREFIX)
    assert method.trainable_parameters(Shape.of(base.config), 5) == trainable_parameters(model)
    assert method.suggested_lr > 0


def test_a_new_method_is_one_file_and_an_option_one_field(tmp_path):
    """Dropped into qprompt/methods/ (a copy of the package), a module with an options dataclass is a method the
    CLI lists, and its option a recipe key with its own help and checks; nothing else is edited."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import qprompt

    package = tmp_path / "qprompt"
    shutil.copytree(Path(qprompt.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "methods" / "echo_tuning.py").write_text(
        "from dataclasses import dataclass\n"
        "from . import EMBEDDING_PREFIX, SoftPromptMethod, option, prompt_tuning, register\n\n"
        "@dataclass\nclass EchoOptions:\n"
        "    echoes: int = option(2, 'times the prompt repeats', low=1)\n"
        "    mode: str = option('loud', 'how it echoes', choices=('loud', 'soft'))\n\n"
        "register(SoftPromptMethod(name='echo-tuning', help='echo', peft_config=prompt_tuning.peft_config,\n"
        "    suggested_lr=0.01, exports_as=EMBEDDING_PREFIX, options=EchoOptions,\n"
        "    trainable_parameters=prompt_tuning.trainable_parameters))\n")
    script = (
        "from qprompt.config import MethodConfig, apply_settings, load_recipe, QPromptError\n"
        "from qprompt.methods import get_method, method_names\n"
        "import dataclasses\n"
        "print(method_names()[-1], [f.name for f in dataclasses.fields(MethodConfig)][-2:])\n"
        "recipe = apply_settings(load_recipe('sentiment'), ['method.name=echo-tuning', 'method.echoes=5'])\n"
        "print(recipe.method.echoes, recipe.method.mode, get_method('echo-tuning').choices())\n"
        "for bad in ('method.echoes=0', 'method.mode=quiet'):\n"
        "    try:\n"
        "        apply_settings(load_recipe('sentiment'), [bad]).validate()\n"
        "    except QPromptError as exc:\n"
        "        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "", "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "echo-tuning ['echoes', 'mode']",
        "5 loud {'mode': ('loud', 'soft')}",
        "recipe sentiment: method.echoes must be at least 1 (got 0); fix the config or the option",
        "recipe sentiment: method.mode must be loud or soft",
    ]


def test_two_methods_may_share_an_option_only_if_it_means_the_same():
    from dataclasses import dataclass

    from qprompt.methods import option

    @dataclass
    class Clash:
        encoder: str = option("gru", "another encoder", choices=("gru",))  # p-tuning's encoder defaults to mlp

    with pytest.raises(ValueError, match="option 'encoder' differs from another method's option of that name"):
        register(SoftPromptMethod(name="clash", help="x", peft_config=prompt_tuning.peft_config, suggested_lr=0.1,
                                  exports_as=EMBEDDING_PREFIX, trainable_parameters=prompt_tuning.trainable_parameters,
                                  options=Clash))
    assert "clash" not in METHODS
