"""`qprompt run` and `qprompt eval EXPORT` need only onnxruntime, numpy and tokenizers: they never import torch.

Each command runs in a subprocess where importing torch, transformers, PEFT or bitsandbytes raises
ImportError, so a single stray import anywhere on those paths fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
# A None entry in sys.modules makes `import torch` raise ImportError, wherever it is attempted.
WITHOUT_TORCH = (f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
                 "from qprompt.cli import main; main()")


def qprompt_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def exported(sentiment_export) -> Path:
    return sentiment_export


def test_the_block_really_blocks():
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
                           "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "import of torch halted" in done.stderr


def test_run_and_eval_an_export_without_torch(exported, sentiment_files, tmp_path):
    done = qprompt_without_torch("run", exported, "--prompt", "a warm and funny film", "--max-new-tokens", 3)
    assert done.returncode == 0, done.stderr
    done = qprompt_without_torch("run", exported, "--input", sentiment_files["test"], "--classify")
    assert done.returncode == 0, done.stderr
    labels = [json.loads(line) for line in done.stdout.splitlines()]
    from qprompt.deploy.runtime import ExportedModel

    rows = [json.loads(line) for line in sentiment_files["test"].read_text().splitlines()]
    assert labels == ExportedModel(exported).classify(rows)  # what the runtime gives with torch importable too
    out = tmp_path / "eval.json"
    done = qprompt_without_torch("eval", exported, "--data", sentiment_files["test"], "--json", out)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["rows"] == 32 and report["predictions"] == labels  # the same graph, the same labels
    # A user error on this path is still one line, also without torch.
    done = qprompt_without_torch("run", exported, "--prompt", "x", "--raw", "--classify")
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
