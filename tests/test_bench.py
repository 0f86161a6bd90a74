"""Smoke runs of the benchmark scripts that can run on tiny models and the committed data slices: a script that no
longer runs (an old signature, a renamed module) fails here, not in front of whoever measures next."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_the_ensemble_benchmark_scores_its_members_and_their_vote(artifact_factory, sentiment_files, tmp_path):
    artifacts = []
    for seed in (0, 1):
        artifacts += ["--artifact", artifact_factory(train__seed=seed)]
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


def test_the_serve_benchmark_loads_both_modes(sentiment_export, sentiment_files, tmp_path):
    out = tmp_path / "serve.json"
    done = bench("serve.py", "--export", sentiment_export, "--levels", "1,2", "--requests-per-client", 1,
                 "--max-tokens", 2, "--threads", 1, "--data", sentiment_files["test"], "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == ["batched", "one-at-a-time"]
    for mode in modes.values():
        assert [(level["clients"], level["requests"], level["errors"]) for level in mode["levels"]] == [(1, 1, 0),
                                                                                                       (2, 2, 0)]
        assert mode["server_metrics"]["forward_passes"] > 0


def test_the_train_speed_benchmark_runs_both_trainers(tmp_path):
    out = tmp_path / "speed.json"
    done = bench("train_speed.py", "--arch", "tiny", "--quant", "none", "--steps", 3, "--batch", 2, "--seq-len", 16,
                 "--virtual-tokens", 4, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"qprompt", "peft-trainer"}
    assert result["ratios"]["tokens_per_s"] == result["runs"]["qprompt"]["tokens_per_s"] / \
        result["runs"]["peft-trainer"]["tokens_per_s"]


def test_the_lora_memory_benchmark_trains_on_the_longest_rows_once_per_dropout(tiny_model_dir, sentiment_files,
                                                                              tmp_path):
    from qprompt.config import load_recipe
    from qprompt.data import Encoder, load_splits
    from qprompt.models import load_model

    out = tmp_path / "lora.json"
    done = bench("lora_memory.py", "--recipe", "sentiment", "--model", tiny_model_dir, "--data",
                 sentiment_files["train"], "--dropouts", "0.05,0", "--steps", 2, "--batch", 4, "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    tokenizer, recipe = load_model(str(tiny_model_dir), "none")[1], load_recipe("sentiment")
    train = load_splits(recipe, str(sentiment_files["train"]))["train"]  # the file less its validation rows
    lengths = sorted((len(e.prompt_ids) for e in Encoder(recipe, tokenizer, 0).encode_all(train, "rows")),
                     reverse=True)
    assert [r["dropout"] for r in rows] == [0.05, 0.0]
    assert all(r["tokens_per_row"] == lengths[7] and r["peak_memory_gb"] > 0 for r in rows)  # the 8 longest rows


def test_the_tasks_benchmark_scores_each_task_in_the_task_graph_as_in_its_own(artifact_factory, sentiment_files,
                                                                            tmp_path):
    artifacts = {"pt": artifact_factory(), "prefix": artifact_factory(method__name="prefix-tuning",
                                                                       method__virtual_tokens=6)}
    args = [a for name, path in artifacts.items() for a in ("--artifact", f"{name}={path}",
                                                             "--test-data", f"{name}={sentiment_files['test']}")]
    out = tmp_path / "tasks.json"
    done = bench("tasks.py", *args, "--rows", 8, "--parts", "metrics,size", "--work", tmp_path / "work", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for name in artifacts:
        scores = result["metrics"][name]
        assert scores["rows"] == 8 and scores["task_graph"]["accuracy"] == scores["own_graph"]["accuracy"]
    assert set(result["size"]) == {"1", "2"}


def test_the_baselines_benchmark_writes_the_jobs_table(tiny_model_dir, sentiment_files, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept text\n")
    job = ["--model", tiny_model_dir, "--quant", "none", "--data", sentiment_files["train"], "--eval-data",
           sentiment_files["validation"], "--test-data", sentiment_files["test"], "--max-steps", 2,
           "--virtual-tokens", 4, "train.batch_size=8", "train.eval_every=0"]
    done = bench("baselines.py", "--recipes", "sentiment", "--baselines", "hard,lora", "--budget", "steps",
                 "--work", tmp_path / "work", "--results", tmp_path / "results", "--doc", doc,
                 "--deploy-quantize", "none", "--", *job)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results" / "sentiment.json").read_text())
    assert report["baselines"]["lora"]["steps"] == report["soft_prompt"]["steps"] == 2
    assert report["command"].startswith("qprompt job sentiment --baselines hard,lora --baseline-budget steps")
    # The deploy columns: each float graph scores the 32 test rows as PyTorch did (a flip needs two label scores
    # closer than float32 rounding: one row at most), and the LoRA graph carries merged weights, not an adapter.
    deployed = report["deploy"]["rows"]
    assert report["deploy"]["quantize"] == "none" and set(deployed) == {"soft_prompt", "lora"}
    for name, torch_row in (("soft_prompt", report["soft_prompt"]), ("lora", report["baselines"]["lora"])):
        assert deployed[name]["rows"] == torch_row["rows"] == 32
        assert abs(deployed[name]["accuracy"] - torch_row["accuracy"]) <= 1 / 32, name
    assert deployed["lora"]["graph_bytes"] > 4 * report["baselines"]["lora"]["trainable_parameters"]
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept text\n")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| sentiment |")]
    assert [r[1] for r in rows] == ["hard prompt 0-shot", "soft prompt", "LoRA"]
    assert [r[10] for r in rows] == ["–", "none", "none"]  # the graph column

    # --rerun measures the named rows again and keeps the others (and what it replaced).
    done = bench("baselines.py", "--recipes", "sentiment", "--budget", "steps", "--rerun", "lora", "--work",
                 tmp_path / "work", "--results", tmp_path / "results", "--doc", doc, "--no-deploy", "--", *job)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((tmp_path / "results" / "sentiment.json").read_text())
    assert again["baselines"]["hard"] == report["baselines"]["hard"]
    rerun = again["reruns"][0]
    assert rerun["rows"] == ["lora"] and rerun["replaced"]["lora"] == report["baselines"]["lora"]
    assert not (tmp_path / "results" / "sentiment.rerun.json").exists()
    assert set(again["deploy"]["rows"]) == {"soft_prompt"}  # the retrained LoRA's old graph is no longer its own

    # The next run with deploy on exports only the graph missing: the soft prompt's row is kept as it was.
    done = bench("baselines.py", "--recipes", "sentiment", "--work", tmp_path / "work", "--results",
                 tmp_path / "results", "--doc", doc, "--deploy-quantize", "none", "--", *job)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((tmp_path / "results" / "sentiment.json").read_text())
    assert again["deploy"]["rows"]["soft_prompt"] == report["deploy"]["rows"]["soft_prompt"]
    assert again["deploy"]["rows"]["lora"]["rows"] == 32
    assert [c.split()[2] for c in again["deploy"]["commands"] if c.startswith("qprompt export")] == [
        str(tmp_path / "work" / "sentiment"), str(tmp_path / "work" / "sentiment" / "baselines" / "lora")]

    # A --work without a soft prompt trains one (new recipe defaults): the old row is recorded, its graph dropped.
    # The page's table keeps every recipe measured before (a scoring JSON beside them is not a recipe's report).
    (tmp_path / "results" / "spam.json").write_text(json.dumps(again))
    (tmp_path / "results" / "sentiment-int4.json").write_text('{"accuracy": 0.5}')
    done = bench("baselines.py", "--recipes", "sentiment", "--budget", "steps", "--rerun", "lora", "--work",
                 tmp_path / "work2", "--results", tmp_path / "results", "--doc", doc, "--no-deploy", "--", *job,
                 "train.seed=1")
    assert done.returncode == 0, done.stderr[-2000:]
    third = json.loads((tmp_path / "results" / "sentiment.json").read_text())
    assert third["output"] == str(tmp_path / "work2" / "sentiment") and not third["deploy"]["rows"]
    assert third["reruns"][1]["replaced"]["soft_prompt"] == again["soft_prompt"]
    recipes = [line.split(" | ")[0] for line in doc.read_text().splitlines() if line.startswith("| s")]
    assert recipes == ["| sentiment"] * 3 + ["| spam"] * 3


def test_the_quality_benchmark_writes_its_rows_and_table(tiny_model_dir, tmp_path):
    """Hard-prompt rows and one trained row on a data root made of the committed slices; the table replaces only
    its own block of the page."""
    from tests.kit import data_rows, write_jsonl

    for split, n in (("train", 48), ("validation", 16), ("test", 16)):
        (tmp_path / "data" / "rotten_tomatoes").mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / "data" / "rotten_tomatoes" / f"{split}.jsonl", data_rows("rotten_tomatoes", split, n))
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n<!-- table: written by bench/quality.py -->\nold table\n\n## Later section\nkept\n")
    done = bench("quality.py", "--tasks", "sentiment", "--methods", "prompt-tuning", "--quants", "none", "--shots", 2,
                 "--max-steps", 1, "--test-limit", 8, "--model", tiny_model_dir, "--data-root", tmp_path / "data",
                 "--work", tmp_path / "runs", "--results", tmp_path / "rows", "--doc", doc)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (tmp_path / "rows").iterdir()}
    assert set(rows) == {"hard prompt 0-shot", "hard prompt 2-shot", "prompt-tuning"}
    assert rows["prompt-tuning"]["steps"] == 1 and all(r["test_rows"] == 8 for r in rows.values())
    text = doc.read_text()
    assert "old table" not in text and text.endswith("\n## Later section\nkept\n")
    assert sum(line.startswith("| sentiment |") for line in text.splitlines()) == 3


def test_the_sentiment_benchmark_runs_the_recipe_job(tiny_model_dir, sentiment_files, tmp_path):
    out = tmp_path / "sentiment.json"
    done = bench("sentiment.py", "--quant", "none", "--max-steps", 1, "--model", tiny_model_dir, "--data",
                 sentiment_files["train"].parent, "--test-limit", 8, "--output", tmp_path / "run", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["soft_prompt"]["rows"] == result["baseline"]["rows"] == 8 and result["training"]["steps"] == 1


def test_the_edge_benchmark_exports_each_graph_kind_and_scores_it(artifact_factory, tiny_model_dir, tmp_path):
    """A tiny nf4-trained prompt through every graph kind made from an nf4 prompt, the builder's bare anchors, and
    the accuracy part; the nf4 graph holds the very weights the prompt trained on, so it labels the rows as
    PyTorch does (a flip needs two labels closer than the graph's rounding: at most one of 8 rows)."""
    from tests.kit import data_rows, write_jsonl

    (tmp_path / "data" / "rotten_tomatoes").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "rotten_tomatoes" / "test.jsonl", data_rows("rotten_tomatoes", "test", 8))
    art = artifact_factory(quant="nf4")
    out = tmp_path / "edge.json"
    done = bench("edge.py", "--work", tmp_path / "work", "--artifact", f"sentiment:nf4={art}", "--model",
                 tiny_model_dir, "--data", tmp_path / "data",
                 "--parts", "exports,accuracy", "--limit", 8, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = json.loads(out.read_text())["accuracy"]
    made = {"fp32", "int8", "int8-dynamic", "nf4", "int4-ptq", "written-fp32", "written-int4"}
    assert {f"sentiment-{kind}" for kind in made} <= set(accuracy)
    assert all(accuracy[f"sentiment-{kind}"]["rows"] == 8 for kind in made)
    assert accuracy["sentiment-nf4"]["agreement_with_trained"] >= 7 / 8



def test_the_inference_benchmark_scores_every_quantization_of_a_prompt(artifact_factory, sentiment_files, tmp_path):
    """Its agreement part on a tiny nf4 prompt: every graph scores the rows; the nf4 graph (the trained-on weights
    in MatMulBnb4) labels them as the float graph of those weights, up to a flip between near-equal labels."""
    out = tmp_path / "inference.json"
    done = bench("inference.py", "--parts", "agreement", "--artifact", artifact_factory(quant="nf4"), "--rows", 8,
                 "--data", sentiment_files["test"].parent, "--work", tmp_path / "work", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(out.read_text())["classification"]
    assert {"fp32", "int8", "int8-dynamic", "int4", "nf4", "nf4 weights in fp32"} <= set(table)
    assert all(row["rows"] == 8 for row in table.values())
    assert table["nf4"]["agreement_with_nf4_weights"] >= 7 / 8


def test_the_transfer_benchmark_starts_a_task_from_each_multitask_prompt(tiny_model_dir, sentiment_files, tmp_path):
    out = tmp_path / "transfer.json"
    spam, nli = ROOT / "tests" / "data" / "sms_spam-train.jsonl", ROOT / "tests" / "data" / "snli-train.jsonl"
    done = bench("transfer.py", "--target", "sentiment", "--sources", "spam,nli", "--seeds", "0", "--steps", 2,
                 "--eval-every", 1, "--test-rows", 8, "--model", tiny_model_dir, "--data", f"spam={spam}", "--data",
                 f"nli={nli}", "--data", f"sentiment={sentiment_files['train']}", "--eval-data",
                 sentiment_files["validation"],
                 "--test-data", sentiment_files["test"], "--work", tmp_path / "work", "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["source_runs"]] == ["prompt-tuning", "multitask-prompt-tuning"]
    starts = [r["start"] for r in result["target_runs"]]
    assert starts == ["instruction text", "multitask: shared prompt (SPoT)", "multitask: shared x per-task (MPT)"]
    for run in result["target_runs"]:  # step 0 is the starting prompt, then the run's own evaluations
        assert run["validation"]["0"] is not None and run["validation"]["5"] is None and run["test_rows"] == 8


def test_the_tune_table_is_read_from_the_study_database(tmp_path):
    """Two finished trials and a pruned one: each row holds the trial's settings and its reported values; the best
    is marked; a second run replaces the page's block and keeps the rest."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="sentiment", storage=storage, direction="maximize")
    dist = {"method": optuna.distributions.CategoricalDistribution(["prompt-tuning"]),
            "lr_factor": optuna.distributions.FloatDistribution(0.2, 5.0, log=True),
            "virtual_tokens": optuna.distributions.CategoricalDistribution([8, 20]),
            "init": optuna.distributions.CategoricalDistribution(["text", "vocab"])}
    for tokens, init, values, state in ((20, "text", {55: 0.835, 110: 0.848}, "COMPLETE"),
                                        (8, "vocab", {55: 0.814, 110: 0.861}, "COMPLETE"),
                                        (8, "text", {55: 0.70}, "PRUNED")):
        study.add_trial(optuna.trial.create_trial(
            params={"method": "prompt-tuning", "lr_factor": 1.0, "virtual_tokens": tokens, "init": init},
            distributions=dist, value=max(values.values()) if state == "COMPLETE" else None,
            intermediate_values=values, state=getattr(optuna.trial.TrialState, state),
            user_attrs={"lr": 0.03, "seconds": 300.0}))
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept\n")
    for _ in range(2):
        done = bench("tune_table.py", "--storage", storage, "--study", "sentiment", "--doc", doc)
        assert done.returncode == 0, done.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept\n") and text.count("## Tune: study sentiment") == 1
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r[0] for r in rows] == ["| 0", "| 1 (best)", "| 2"]
    assert [r[6:9] for r in rows] == [["83.5", "84.8", "84.8"], ["81.4", "86.1", "**86.1**"], ["70.0", "", ""]]
