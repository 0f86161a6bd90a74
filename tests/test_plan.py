"""`qprompt plan`: memory predicted from the config alone, checked against what autograd really keeps."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig

from qprompt.cli import main
from qprompt.config import load_recipe, override
from qprompt.forward import target_logprobs
from qprompt.memory import grouped_query_sdpa, lean_gated_mlp
from qprompt.methods import add_soft_prompt, trainable_parameters
from qprompt.models import load_model
from qprompt.plan import ARCHITECTURES, Shape, activation_bytes, advise, plan_memory, prompt_parameters

ROOT = Path(__file__).resolve().parents[1]


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves for backward, leaving out the (resident) parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        target_logprobs(model, batch)
    return sum(storages.values())


@pytest.mark.parametrize("grouped_kv", [False, True])
@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_activation_inventory_matches_autograd(tiny_model_dir, method, grouped_kv):
    """The plan's per-layer inventory against autograd, set up as training sets it up (gated MLPs that
    recompute their activation; on CPU, grouped keys and values in SDPA)."""
    recipe = override(load_recipe("sentiment"), method__name=method, method__virtual_tokens=7, method__init="random")
    base, _, info = load_model(str(tiny_model_dir), "nf4")
    model = add_soft_prompt(base, recipe, info.path)
    assert lean_gated_mlp(model) > 0
    model.train()
    batch_size, length = 4, 30
    ids = torch.randint(5, 100, (batch_size, length))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # padding: keys and values are repeated to every head, as in real batches
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with grouped_query_sdpa() if grouped_kv else contextlib.nullcontext():
        measured = saved_activation_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    shape = Shape.of(base.config)
    query = length if method == "prefix-tuning" else length + 7
    per_layer, once = activation_bytes(shape, batch_size, query, length + 7, 4, grouped_kv=grouped_kv)
    predicted = shape.layers * per_layer + once
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


@pytest.mark.parametrize("method,options", [("prompt-tuning", {}), ("p-tuning", {}), ("p-tuning", {"encoder": "lstm"}),
                                            ("prefix-tuning", {}), ("prefix-tuning", {"prefix_projection": True})])
def test_prompt_parameters_match_peft(tiny_model_dir, method, options):
    extra = {"method__encoder": options["encoder"]} if "encoder" in options else {}
    if "prefix_projection" in options:
        extra["method__prefix_projection"] = True
    recipe = override(load_recipe("sentiment"), method__name=method, method__virtual_tokens=5, method__init="random",
                      **extra)
    base, _, info = load_model(str(tiny_model_dir), "none")
    model = add_soft_prompt(base, recipe, info.path)
    assert prompt_parameters(Shape.of(base.config), method, 5, **options) == trainable_parameters(model)


def test_checkpointing_is_advised_when_8b_does_not_fit_8_gib():
    data = dict(ARCHITECTURES["llama-3-8b"])
    shape = Shape.of(AutoConfig.for_model(data.pop("model_type"), **data))
    asked = dict(quant="nf4", method="prompt-tuning", virtual_tokens=100, batch=4, seq_len=512,
                 compute_dtype="bfloat16")
    plain, advice = advise(shape, 8.0, checkpointing=False, **asked)
    assert plain.total > 8 and advice and "--gradient-checkpointing" in advice[0]
    ckpt, advice = advise(shape, 8.0, checkpointing=True, **asked)
    assert ckpt.total < 7.5 and advice == []
    assert 5.0 < ckpt.weights < 5.6  # ~7B 4-bit Linear weights + bf16 embeddings and LM head
    unquantized, advice = advise(shape, 8.0, checkpointing=True, **{**asked, "quant": "none"})
    assert unquantized.weights > 14 and "nf4" in advice[0]


def test_plan_grows_with_batch_and_sequence():
    shape = Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)
    base = plan_memory(shape, "nf4", "prompt-tuning", 20, 8, 64).activations
    assert plan_memory(shape, "nf4", "prompt-tuning", 20, 16, 64).activations == pytest.approx(2 * base, rel=0.01)
    longer = plan_memory(shape, "nf4", "prompt-tuning", 20, 8, 128).activations  # 148 tokens against 84, plus
    assert (128 + 20) / (64 + 20) < longer / base < 1.2 * (128 + 20) / (64 + 20)  # the quadratic mask
    assert plan_memory(shape, "nf4", "prompt-tuning", 20, 8, 64, checkpointing=True).activations < base / 4


def test_plan_command(tiny_model_dir):
    runner = CliRunner()
    done = runner.invoke(main, ["plan", "--model", str(tiny_model_dir), "--batch", "2", "--seq-len", "64"])
    assert done.exit_code == 0, done.output
    assert "fits a 8 GiB GPU" in done.output and "activations" in done.output
    done = runner.invoke(main, ["plan", "--model", "llama-3-8b"])
    assert done.exit_code == 0 and "does not fit a 8 GiB GPU" in done.output
    assert "--gradient-checkpointing" in done.output
    done = runner.invoke(main, ["plan", "--model", str(tiny_model_dir), "--device", "cpu"])
    assert done.exit_code == 0 and "heap overhead" in done.output and "GPU" not in done.output
    done = runner.invoke(main, ["plan", "--model", "no-such-model-folder", "--device", "cpu"])
    assert done.exit_code == 2 and done.output.startswith("error: unknown model") and done.output.count("\n") == 1


def test_train_speed_benchmark_runs_its_gpu_path_on_a_tiny_random_model(tmp_path):
    """bench/train_speed.py --arch: random weights, word-level tokenizer, both trainers, the plan."""
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--arch", "tiny", "--batch", "2",
                           "--seq-len", "32", "--steps", "3", "--virtual-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for trainer in ("qprompt", "peft-trainer"):
        run = result["runs"][trainer]
        assert run["steps"] == 3 and run["tokens_per_s"] > 0 and run["peak_memory_gib"] > 0 and run["loss"] > 0
    assert result["plan"]["seq_len"] == 32 and result["plan"]["total"] > 0
