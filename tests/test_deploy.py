"""The deploy-only install: a second, fresh venv with plain `pip install qprompt` (no extras) runs an export
made in this one — `qprompt run`, `qprompt eval EXPORT`, `qprompt serve` — and torch cannot be imported there.

This is what an edge box gets: the package is built from this checkout and installed with the same
constraints file as the README's commands, so the test fails if the runtime needs anything the plain
install does not declare.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qprompt.deploy.runtime import ExportedModel, Sampling
from tests.kit import data_rows

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "onnx", "safetensors")


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh venv holding `pip install -c constraints.txt qprompt`, built from a copy of this checkout."""
    work = tmp_path_factory.mktemp("deploy")
    source = work / "qprompt-src"  # a copy: building a wheel in place would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, source / name)
    for name in ("qprompt", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "-c", str(source / "constraints.txt"), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def deployed(venv: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "qprompt"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=venv.parent, **kwargs)


def test_the_deploy_install_has_no_torch(deploy_venv):
    python = str(deploy_venv / "bin" / "python")
    probe = f"import importlib.util as u; print([m for m in {TRAINING!r} if u.find_spec(m)])"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=deploy_venv.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    done = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=deploy_venv.parent)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    # Training commands say what to install, in one line.
    done = deployed(deploy_venv, "train", "--recipe", "sentiment", "--max-steps", 1)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: `qprompt train` needs the training packages (torch is not installed): pip install 'qprompt[train]'"]


def test_run_and_eval_an_export_in_the_deploy_install(deploy_venv, sentiment_export, sentiment_files, tmp_path):
    model = ExportedModel(sentiment_export, providers=["CPUExecutionProvider"])
    text = data_rows("rotten_tomatoes", "test", 1)[0]["text"]
    done = deployed(deploy_venv, "run", sentiment_export, "--prompt", text, "--max-new-tokens", 5)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == model.generate([text], Sampling(max_new_tokens=5))[0]
    report = tmp_path / "eval.json"
    done = deployed(deploy_venv, "eval", sentiment_export, "--data", sentiment_files["test"], "--json", report)
    assert done.returncode == 0, done.stderr
    rows = data_rows("rotten_tomatoes", "test", 32)
    assert json.loads(report.read_text())["predictions"] == model.classify(rows)


def test_serve_an_export_from_the_deploy_install(deploy_venv, sentiment_export):
    model = ExportedModel(sentiment_export, providers=["CPUExecutionProvider"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen([str(deploy_venv / "bin" / "qprompt"), "serve", str(sentiment_export), "--port", "0",
                               "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env,
                              cwd=deploy_venv.parent)
    try:
        banner = server.stderr.readline()  # "serving EXPORT (...) on http://127.0.0.1:PORT ..."
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", banner).group(1))
        text = data_rows("rotten_tomatoes", "test", 2)[1]["text"]
        for _ in range(100):  # the banner comes before uvicorn has started: wait for /health
            try:
                status, health = request(port, "GET", "/health")
                break
            except ConnectionError:
                time.sleep(0.1)
        assert status == 200 and health["status"] == "ok"
        status, body = request(port, "POST", "/v1/completions", {"prompt": text, "max_tokens": 5})
        assert status == 200, body
        assert body["choices"][0]["text"].strip() == model.generate([text], Sampling(max_new_tokens=5))[0]
        status, body = request(port, "POST", "/v1/classify", {"input": text})
        assert status == 200 and body["data"][0]["label"] == model.classify([text])[0]
    finally:
        server.terminate()
        server.wait(timeout=30)


def request(port: int, method: str, path: str, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=json.dumps(body) if body is not None else None)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data
