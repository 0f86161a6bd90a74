"""Smoke runs of the benchmark scripts that can run on tiny models and the committed data slices: a script that no
longer runs (an old signature, a renamed module) fails here, not in front of whoever measures next."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qprompt.config import load_recipe, override
from qprompt.data import load_splits
from qprompt.models import load_model
from qprompt.train import train

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_the_ensemble_benchmark_scores_its_members_and_their_vote(tiny_model_dir, sentiment_files, tmp_path):
    artifacts = []
    for seed in (0, 1):
        recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="none", method__virtual_tokens=4,
                          train__max_steps=2, train__batch_size=8, train__lr=0.1, train__eval_every=0,
                          train__eval_rows=8, train__seed=seed)
        model, tok, info = load_model(recipe.model, recipe.quant)
        splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
        train(recipe, model, tok, info, splits, tmp_path / f"s{seed}", progress=False)
        artifacts += ["--artifact", tmp_path / f"s{seed}"]
    out = tmp_path / "ensemble.json"
    done = bench("ensemble.py", *artifacts, "--data", sentiment_files["test"], "--work", tmp_path / "graph",
                 "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["m0", "m1", "vote"] and result["rows"] == 32
    best = result["results"][result["best_single"]]["accuracy"]
    assert result["gain_points"] == round((result["results"]["vote"]["accuracy"] - best) * 100, 2)


def test_the_families_benchmark_exports_a_family(tmp_path):
    out = tmp_path / "families.json"
    done = bench("families.py", "--family", "llama", "--work", tmp_path / "work", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    llama = json.loads(out.read_text())["families"]["llama"]
    assert llama["none"]["graph"] == "fused" and llama["int4"]["graph"] == "fused"
    assert llama["none"]["max_abs_logit_diff"] <= llama["none"]["tolerance"]
