"""The tests' kit: the CLI runner, the one-error check, the small recipe and its training, the data slices.

Fixtures (the tiny model, the data files, session-cached artifacts) are in conftest.py; these are plain functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

TEST_DATA = Path(__file__).resolve().parent / "data"
# The recipe shrunk for the tiny model: unquantized, prompt tuning (whatever the recipe's own method: tests of other
# methods name theirs), 4 virtual tokens, 2 steps of 8 rows, one check at the end.
SMALL = {"quant": "none", "method__name": "prompt-tuning", "method__virtual_tokens": 4, "train__max_steps": 2,
         "train__batch_size": 8, "train__lr": 0.1, "train__eval_every": 0, "train__eval_rows": 8}


def cli(*args, command=None) -> Result:
    """`qprompt ARGS...` in-process (any value is passed as its text)."""
    from qprompt.cli import main

    return CliRunner().invoke(command or main, [str(a) for a in args])


def assert_one_error(result: Result, *words: str) -> str:
    """Exit code 2, exactly one `error:` line holding each of `words`, and no traceback; returns the line."""
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    print(errors[0])  # shown with -s: the messages users see
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def small_recipe(model_dir, name: str = "sentiment", **changes):
    """A real recipe with the SMALL settings (and `changes`, in `override`'s section__field form) on `model_dir`."""
    from qprompt.config import load_recipe, override

    return override(load_recipe(name), model=str(model_dir), **{**SMALL, **changes})


def train_small(model_dir, files: dict, output: Path, name: str = "sentiment", **changes) -> Path:
    """Train `small_recipe(model_dir, name, **changes)` on `files` (train/validation) into `output`."""
    from qprompt.data import load_splits
    from qprompt.models import load_model
    from qprompt.train import train

    recipe = small_recipe(model_dir, name, **changes)
    model, tok, info = load_model(recipe.model, recipe.quant)
    splits = load_splits(recipe, str(files["train"]), str(files["validation"]))
    train(recipe, model, tok, info, splits, output, progress=False)
    return output


def data_rows(task: str, split: str, n: int | None = None) -> list[dict]:
    """The first `n` rows of a committed slice (tests/data/TASK-SPLIT.jsonl); all of them for None.

    A missing file or too few rows fail the test: nothing here may be skipped for want of data."""
    path = TEST_DATA / f"{task}-{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if n is not None and len(rows) < n:
        raise AssertionError(f"{path} has {len(rows)} rows, the test needs {n}")
    return rows[:n]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ctrl_c_at(monkeypatch, call: int):
    """Ctrl-C during the `call`-th micro-batch of training (qprompt.train.target_logprobs); returns the real function,
    to set back for the resumed run."""
    import qprompt.train as qtrain

    real, calls = qtrain.target_logprobs, {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(qtrain, "target_logprobs", flaky)
    return real
