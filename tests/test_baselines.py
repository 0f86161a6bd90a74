"""`qprompt job --baselines`: the prompting and fine-tuning baselines scored beside the soft prompt."""

import json
import shutil

import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file

from qprompt.cli import main
from qprompt.config import load_recipe, override
from qprompt.data import read_rows
from qprompt.evaluate import evaluate
from qprompt.models import load_model
from tests.kit import assert_one_error, cli


def test_the_job_reports_lora_and_full_fine_tuning_beside_the_soft_prompt(tiny_model_dir, sentiment_files, tmp_path):
    out, report = tmp_path / "job", tmp_path / "job.json"
    args = ["job", "sentiment", "--model", tiny_model_dir, "--quant", "nf4", "--data", sentiment_files["train"],
            "--eval-data", sentiment_files["validation"], "--test-data", sentiment_files["test"], "--max-steps", 3,
            "--method", "prefix-tuning", "--virtual-tokens", 4, "--output", out, "--json", report, "--baselines",
            "hard,kshot,lora,full", "train.batch_size=8"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    names = ("hard prompt (0-shot)", "hard prompt (k-shot)", "LoRA (fine-tuning)", "full fine-tuning",
             "soft prompt (qprompt)")
    assert [line[:24].strip() for line in result.output.splitlines() if line.startswith(names)] == list(names)
    data = json.loads(report.read_text())
    rows = data["baselines"]
    assert list(rows) == ["hard", "kshot", "lora", "full"] and all(r["rows"] == 32 for r in rows.values())
    assert data["baseline"] == rows["hard"]
    assert rows["lora"]["steps"] == rows["full"]["steps"] == data["soft_prompt"]["steps"] == 3

    base, tokenizer, _ = load_model(str(tiny_model_dir), "none")
    assert rows["full"]["trainable_parameters"] == sum(p.numel() for p in base.parameters())
    # The prefix: 4 virtual positions of keys and values in every layer.
    cfg = base.config
    kv_width = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert data["soft_prompt"]["trainable_parameters"] == 4 * cfg.num_hidden_layers * 2 * kv_width

    # LoRA's row is its saved adapter, trained (B starts at zero) and scored on the test rows.
    adapter = load_file(out / "baselines" / "lora" / "adapter_model.safetensors")
    assert sum(t.numel() for t in adapter.values()) == rows["lora"]["trainable_parameters"]
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items())
    nf4, tokenizer, _ = load_model(str(tiny_model_dir), "nf4")
    lora = PeftModel.from_pretrained(nf4, out / "baselines" / "lora").eval()
    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir))
    with torch.no_grad():
        again = evaluate(lora, tokenizer, recipe, read_rows(str(sentiment_files["test"])))
    assert again["accuracy"] == rows["lora"]["accuracy"]
    assert rows["lora"]["artifact_bytes"] >= 4 * rows["lora"]["trainable_parameters"]  # float32 weights, + config


def _finetune_with_clock(tiny_model_dir, sentiment_files, tmp_path, monkeypatch, step_seconds, budget):
    """A LoRA baseline of budget `budget` s whose k-th step takes step_seconds(k) on a fake clock (the soft prompt
    took 2 steps)."""
    import itertools
    import types

    from qprompt import baselines

    readings = itertools.accumulate((step_seconds(k) for k in itertools.count(1)), initial=0.0)
    monkeypatch.setattr(baselines, "time", types.SimpleNamespace(perf_counter=lambda: float(next(readings))))
    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="nf4", train__batch_size=8)
    splits = {"train": read_rows(str(sentiment_files["train"]))}
    test = read_rows(str(sentiment_files["test"]))[:8]
    return baselines.finetune("lora", recipe, splits, test, "test rows", 2, tmp_path / "lora", seconds=budget)


def test_a_time_budget_trains_as_many_steps_as_fit_in_the_soft_prompts_time(tiny_model_dir, sentiment_files,
                                                                             tmp_path, monkeypatch):
    """--baseline-budget time: steps of 10 s, the soft prompt's 40 s hold 4 (it took 2), and the row says how many
    ran and for how long."""
    row = _finetune_with_clock(tiny_model_dir, sentiment_files, tmp_path, monkeypatch, lambda k: 10.0, 40.0)
    assert row["steps"] == 4 and row["train_seconds"] == 40.0 and row["rows"] == 8


def test_a_time_budget_follows_steps_that_slow_down(tiny_model_dir, sentiment_files, tmp_path, monkeypatch):
    """Steps 1-4 take 10 s, later ones 20 s: an estimate made once from steps 2-4 would run 15 steps (260 s for a
    150 s budget); re-estimated after every step, the run ends within one step of the budget: 10 steps, 160 s."""
    row = _finetune_with_clock(tiny_model_dir, sentiment_files, tmp_path, monkeypatch,
                               lambda k: 10.0 if k <= 4 else 20.0, 150.0)
    assert row["steps"] == 10 and row["train_seconds"] == 160.0


def test_the_lora_baseline_exports_merged_into_its_base(tiny_model_dir, sentiment_files, tmp_path):
    """`qprompt export RUN/baselines/lora`: the adapter merged into the nf4 values it trained on, the graph checked
    against that model in PyTorch, and `qprompt eval` of the graph scoring the rows as the job's LoRA row did."""
    out, report = tmp_path / "job", tmp_path / "job.json"
    args = ["job", "sentiment", "--model", tiny_model_dir, "--quant", "nf4", "--data", sentiment_files["train"],
            "--eval-data", sentiment_files["validation"], "--test-data", sentiment_files["test"], "--max-steps", 2,
            "--virtual-tokens", 4, "--output", out, "--json", report, "--baselines", "lora", "train.batch_size=8"]
    assert cli(*args).exit_code == 0
    lora = json.loads(report.read_text())["baselines"]["lora"]
    exported = cli("export", out / "baselines" / "lora", "--output", tmp_path / "export", "--parity-tokens", 4)
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((tmp_path / "export" / "qprompt-export.json").read_text())
    task = manifest["tasks"][0]
    assert task["virtual_tokens"] == 0 and task["source"]["method"] == "lora" and task["name"] == "lora"
    assert task["parity"]["exact"] and task["parity"]["max_abs_logit_diff"] <= task["parity"]["tolerance"]
    assert manifest["base"]["name"].endswith("+ LoRA lora")
    scored = cli("eval", tmp_path / "export", "--data", sentiment_files["test"], "--json", tmp_path / "eval.json")
    assert scored.exit_code == 0, scored.output
    # The same model in float32 either way: a label can flip only where two labels' scores differ by less than
    # the graph's rounding (its parity tolerance), so at most one row of 32 may differ.
    assert abs(json.loads((tmp_path / "eval.json").read_text())["accuracy"] - lora["accuracy"]) <= 1 / 32

    refused = cli("export", out / "baselines" / "lora", out, "--output", tmp_path / "two")
    assert_one_error(refused, "a LoRA adapter is merged into its base and exports alone")
    broken = tmp_path / "broken"
    shutil.copytree(out / "baselines" / "lora", broken)
    (broken / "qprompt-lora.json").write_text('{"format": "qprompt-lora", "recipe": {}}')
    assert_one_error(cli("export", broken, "--output", tmp_path / "none"), "qprompt-lora.json lacks the key "
                     "'base_quant'", "qprompt job --baselines lora")
    assert not (tmp_path / "none").exists()


def test_fine_tuning_baselines_train_with_the_soft_prompts_memory_settings(tiny_model_dir, sentiment_files, tmp_path,
                                                                           monkeypatch):
    """Peak memory compares methods only if every row trains alike on CPU: the lean gated MLP on every layer, SDPA on
    grouped key/value heads during each forward, and the heap trimmed after each optimizer step — for LoRA, full
    fine-tuning and the soft prompt alike."""
    import os
    import types

    from qprompt import baselines, forward, memory, train

    seen = {"trims": 0, "lean": [], "gqa": []}
    monkeypatch.setattr(memory, "glibc", lambda: types.SimpleNamespace(
        malloc_trim=lambda pad: seen.__setitem__("trims", seen["trims"] + 1)))
    lean = memory.lean_gated_mlp
    monkeypatch.setattr(memory, "lean_gated_mlp", lambda model: seen["lean"].append(lean(model)))
    scored = forward.target_logprobs
    for module in (forward, train):  # train.py holds its own reference, taken at import
        monkeypatch.setattr(module, "target_logprobs", lambda model, batch: (
            seen["gqa"].append(os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")), scored(model, batch))[1])
    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="nf4", train__batch_size=8)
    splits = {"train": read_rows(str(sentiment_files["train"]))}
    test = read_rows(str(sentiment_files["test"]))[:8]
    layers = load_model(str(tiny_model_dir), "none")[0].config.num_hidden_layers
    for kind in ("lora", "full", "soft prompt"):
        seen.update(trims=0, lean=[], gqa=[])
        if kind == "soft prompt":
            result = cli("train", "--model", tiny_model_dir, "--recipe", "sentiment", "--quant", "nf4", "--data",
                         sentiment_files["train"], "--eval-data", sentiment_files["validation"], "--max-steps", 3,
                         "--virtual-tokens", 4, "--output", tmp_path / "soft", "train.batch_size=8")
            assert result.exit_code == 0, result.output
        else:
            assert baselines.finetune(kind, recipe, splits, test, "test rows", 3, tmp_path / kind)["steps"] == 3
        assert seen["trims"] == 3, kind
        assert seen["lean"] == [layers], kind
        assert seen["gqa"] and set(seen["gqa"]) == {"1"}, kind
    assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") is None  # restored once training ends


def test_fine_tuning_baselines_train_on_the_soft_prompts_batches(tiny_model_dir, sentiment_files, tmp_path,
                                                                 monkeypatch):
    """Same rows, same batches, same order (and so the same padding) as the soft prompt's trainer: the rows
    compare methods, not batchings. Thirteen steps of 8 over the 96 training rows cross into a second epoch."""
    from qprompt import baselines, data, train

    def recorder(module, seen):
        collate = module.collate

        def record(examples, *args, **kwargs):
            seen.append([tuple(e.prompt_ids) for e in examples])
            return collate(examples, *args, **kwargs)
        monkeypatch.setattr(module, "collate", record)

    trained, tuned = [], []
    recorder(train, trained)
    args = ["train", "--recipe", "sentiment", "--model", tiny_model_dir, "--quant", "nf4", "--data",
            sentiment_files["train"], "--eval-data", sentiment_files["validation"], "--max-steps", 13,
            "--virtual-tokens", 4, "--output", tmp_path / "soft", "train.batch_size=8", "train.eval_every=0"]
    assert cli(*args).exit_code == 0
    recorder(data, tuned)
    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="nf4", train__batch_size=8)
    splits = {"train": read_rows(str(sentiment_files["train"]))}
    baselines.finetune("lora", recipe, splits, read_rows(str(sentiment_files["test"]))[:8], "test rows", 13,
                       tmp_path / "lora")
    assert len(splits["train"]) < 13 * 8
    assert len(trained) == 13 and tuned[:13] == trained
