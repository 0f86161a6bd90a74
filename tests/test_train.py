import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import qprompt.train as qtrain
from qprompt.artifact import load_artifact, read_manifest
from qprompt.data import load_splits
from qprompt.errors import QPromptError
from qprompt.models import load_model
from qprompt.train import train
from tests.kit import ctrl_c_at


def _run(recipe, files, output, quant="nf4", **kw):
    model, tok, info = load_model(recipe.model, quant)
    splits = load_splits(recipe, str(files["train"]), str(files["validation"]))
    return train(recipe, model, tok, info, splits, output, progress=False, **kw)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_training_lowers_loss_and_writes_a_peft_artifact(tiny_recipe, sentiment_files, tmp_path, quant):
    tiny_recipe.train.max_steps = 12
    tiny_recipe.train.eval_every = 6
    out = tmp_path / "run"
    result = _run(tiny_recipe, sentiment_files, out, quant)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert [r["step"] for r in lines if "eval" in r] == [6, 12]
    for name in ("adapter_config.json", "adapter_model.safetensors", "qprompt.json", "loss.png"):
        assert (out / name).is_file(), name
    manifest = read_manifest(out)
    assert manifest["base"]["quant"] == quant and manifest["method"] == "prompt-tuning"
    assert manifest["labels"] == {"positive": "positive", "negative": "negative"}
    assert manifest["training"]["trainable_parameters"] == 4 * 64  # virtual tokens x hidden size
    best = max(json.loads(x)["eval"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x)
    assert manifest["metrics"] == result["metrics"] and manifest["metrics"]["validation_accuracy"] == best

    # PEFT itself loads the artifact, and it holds the best prompt.
    base, _, _ = load_model(tiny_recipe.model, quant)
    peft_model = PeftModel.from_pretrained(base, str(out))
    saved = load_file(out / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight.detach(), saved)
    # qprompt reloads it on the same base and gets identical logits.
    reloaded, tok, recipe, _ = load_artifact(out)
    ids = torch.tensor([tok("Review: fine\nSentiment:")["input_ids"]])
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.equal(a, b) and recipe.name == "sentiment"


def test_existing_output_is_not_overwritten(tiny_recipe, sentiment_files, tmp_path):
    out = tmp_path / "run"
    _run(tiny_recipe, sentiment_files, out, "none")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(QPromptError, match="already holds a training run; pass --resume"):
        _run(tiny_recipe, sentiment_files, out, "none")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    _run(tiny_recipe, sentiment_files, out, "none", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only qprompt's own files


def test_resume_with_nothing_to_resume(tiny_recipe, sentiment_files, tmp_path):
    with pytest.raises(QPromptError, match="nothing to resume"):
        _run(tiny_recipe, sentiment_files, tmp_path / "empty", "none", resume=True)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_interrupted_run_resumes_to_the_same_prompt(tiny_recipe, sentiment_files, tmp_path, monkeypatch, quant):
    """Bit for bit, on nf4 too: resuming runs the same arithmetic (on AVX512-BF16 CPUs the evaluation
    before the checkpoint once repacked the 4-bit layers, so a resumed nf4 run drifted)."""
    straight = tmp_path / "straight"
    _run(tiny_recipe, sentiment_files, straight, quant)

    real = ctrl_c_at(monkeypatch, 5)  # Ctrl-C during the 5th micro-batch, after the step-3 checkpoint
    out = tmp_path / "interrupted"
    with pytest.raises(QPromptError, match="interrupted at step 4.*--resume"):
        _run(tiny_recipe, sentiment_files, out, quant)
    assert (out / "checkpoint" / "state.pt").is_file() and not (out / "qprompt.json").exists()
    monkeypatch.setattr(qtrain, "target_logprobs", real)
    with pytest.raises(QPromptError, match="different settings"):
        tiny_recipe.train.lr = 0.2
        _run(tiny_recipe, sentiment_files, out, quant, resume=True)
    tiny_recipe.train.lr = 0.1
    _run(tiny_recipe, sentiment_files, out, quant, resume=True)
    for name in ("checkpoint/adapter_model.safetensors", "adapter_model.safetensors"):
        a, b = (load_file(folder / name)["prompt_embeddings"] for folder in (straight, out))
        assert torch.equal(a, b), name
    assert read_manifest(out)["training"]["steps"] == 6
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice across the interruption


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning"])
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", "int4", "none"])
def test_method_by_quantization_matrix(tiny_recipe, sentiment_files, tmp_path, method, quant):
    """Every method trains on every quantization, saves a PEFT artifact, and reloads to the same prompt."""
    from qprompt.methods import add_soft_prompt

    tiny_recipe.method.name = method
    tiny_recipe.method.prefix_projection = method == "prefix-tuning"
    tiny_recipe.train.lr = 0.1 if method == "prompt-tuning" else 0.01
    tiny_recipe.train.max_steps = tiny_recipe.train.eval_every = 10
    out = tmp_path / "run"
    _run(tiny_recipe, sentiment_files, out, quant)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert read_manifest(out)["method"] == method
    # The saved adapter is what the trained encoder produces (best step == last step here) ...
    base, _, info = load_model(tiny_recipe.model, quant)
    fresh = add_soft_prompt(base, tiny_recipe, info.path)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    fresh.prompt_encoder.load_state_dict(state["prompt_encoder"])
    saved = load_file(out / "adapter_model.safetensors")["prompt_embeddings"]
    with torch.no_grad():
        produced = fresh.prompt_encoder["default"](fresh.prompt_tokens["default"][: saved.shape[0]].unsqueeze(0))[0]
    assert torch.allclose(produced, saved, atol=1e-5)
    # ... and PEFT's own loader and qprompt's give identical logits.
    peft_model = PeftModel.from_pretrained(load_model(tiny_recipe.model, quant)[0], str(out))
    ours, tok, _, _ = load_artifact(out)
    ids = torch.tensor([tok("Review: fine\nSentiment:")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_summarize_recipe_trains_and_scores_rouge(tiny_model_dir, tmp_path):
    """The generation recipe end to end on real ACLSum rows: the target is the summary text (+ EOS),
    the loss falls, and evaluation (soft prompt and hard prompt k-shot) reports ROUGE-L."""
    from qprompt.config import load_recipe, override
    from qprompt.evaluate import evaluate
    from tests.kit import data_rows, write_jsonl

    rows = data_rows("aclsum", "train", 24)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows[:16]),
             "validation": write_jsonl(tmp_path / "validation.jsonl", rows[16:20])}
    recipe = override(load_recipe("summarize"), model=str(tiny_model_dir), quant="none", data__max_length=160,
                      method__virtual_tokens=4, train__max_steps=8, train__batch_size=4, train__grad_accum=1,
                      train__lr=0.3, train__eval_every=8, train__eval_rows=2, train__log_every=1,
                      train__warmup_steps=1)
    out = tmp_path / "run"
    _run(recipe, files, out, "none")
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # 16 rows in batches of 4: steps 1-4 and 5-8 are two epochs over the same rows, so their sums compare.
    assert len(losses) == 8 and sum(losses[4:]) < sum(losses[:4]), losses
    tuned, tok, tuned_recipe, _ = load_artifact(out)
    soft = evaluate(tuned, tok, tuned_recipe, rows[20:22], "test")
    base, _, _ = load_model(recipe.model, "none")
    hard = evaluate(base, tok, recipe, rows[20:22], "test", hard_prompt=True, shots=rows[:1])
    from qprompt.metrics import rouge_l

    for report in (soft, hard):  # the reported score is the mean ROUGE-L of its own predictions
        expected = sum(rouge_l(p, r["summary"]) for p, r in zip(report["predictions"], rows[20:22])) / 2
        assert report["rows"] == 2 and report["rouge_l"] == pytest.approx(expected)


def test_a_prompt_started_from_an_artifact_is_kept_unless_training_beats_it(tiny_recipe, sentiment_files, tmp_path):
    """--init-from (e.g. an nf4 prompt moved to an int4 base): the starting prompt is evaluated at step 0 and stays the
    artifact's prompt if no step does better; here a learning rate of 1e4 wrecks every step."""
    source = tmp_path / "source"
    _run(tiny_recipe, sentiment_files, source, "none")
    tiny_recipe.method.init_from = str(source)
    tiny_recipe.train.lr, tiny_recipe.train.max_steps, tiny_recipe.train.eval_every = 1e4, 2, 1
    tiny_recipe.train.keep_within_se = 0  # the random tiny model scores near chance: any prompt is within noise
    out = tmp_path / "moved"
    _run(tiny_recipe, sentiment_files, out, "int4")
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert read_manifest(out)["training"]["best_step"] == 0
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(source / "adapter_model.safetensors")["prompt_embeddings"])


# A scripted validation series, by step: the best is step 2; steps 3, 4 and 5 bring nothing new.
SERIES = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.7, 5: 0.65}


def _scripted(monkeypatch, prompts: dict):
    """Trainer._validate returns SERIES[step] (0.1 after step 5) and records the prompt each step had."""

    def validate(self):
        step = self.state["step"]
        prompts[step] = self.model.prompt_encoder["default"].embedding.weight.detach().clone()
        return SERIES.get(step, 0.1), {"metric": self.metric_name, "rows": len(self.val_rows)}

    monkeypatch.setattr(qtrain.Trainer, "_validate", validate)


def test_patience_stops_after_evaluations_without_a_new_best_and_keeps_the_best_prompt(
        tiny_recipe, sentiment_files, tmp_path, monkeypatch):
    prompts = {}
    _scripted(monkeypatch, prompts)
    tiny_recipe.train.max_steps, tiny_recipe.train.eval_every, tiny_recipe.train.patience = 20, 1, 3
    out = tmp_path / "patient"
    _run(tiny_recipe, sentiment_files, out, "none")
    training = read_manifest(out)["training"]
    assert (training["steps"], training["best_step"], training["stopped"]) == (5, 2, "patience")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], prompts[2])
    assert not torch.equal(prompts[2], prompts[5])  # the prompt kept is not simply the last one

    tiny_recipe.train.patience = 0  # off: the cap decides
    _run(tiny_recipe, sentiment_files, tmp_path / "capped", "none")
    training = read_manifest(tmp_path / "capped")["training"]
    assert (training["steps"], training["best_step"], training["stopped"]) == (20, 2, "max_steps")


def test_the_artifact_keeps_the_latest_prompt_within_a_standard_error_of_the_best(
        tiny_recipe, sentiment_files, tmp_path, monkeypatch):
    """Validation scores 0.5, 0.7, 0.6, 0.68, 0.62 with a standard error of 0.05: patience counts from the best (step
    2) and stops at step 5, but the artifact keeps step 4's prompt, whose 0.02 deficit is noise; step 5's 0.08 is not.
    With keep_within_se 0 the strictly best is kept."""
    series = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.68, 5: 0.62}
    prompts = {}

    def validate(self):
        step = self.state["step"]
        prompts[step] = self.model.prompt_encoder["default"].embedding.weight.detach().clone()
        return series[step], {"metric": self.metric_name, "rows": 400, "standard_error": 0.05}

    monkeypatch.setattr(qtrain.Trainer, "_validate", validate)
    tiny_recipe.train.max_steps, tiny_recipe.train.eval_every, tiny_recipe.train.patience = 20, 1, 3
    for within, kept in ((1.0, 4), (0.0, 2)):
        tiny_recipe.train.keep_within_se = within
        out = tmp_path / f"within-{within}"
        _run(tiny_recipe, sentiment_files, out, "none")
        data = read_manifest(out)
        assert (data["training"]["steps"], data["training"]["best_step"], data["training"]["stopped"]) == (
            5, 2, "patience")
        assert data["training"]["kept_step"] == kept and data["metrics"]["validation_accuracy"] == series[kept]
        assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], prompts[kept])
    assert not torch.equal(prompts[2], prompts[4])


def test_the_main_metrics_standard_error_follows_from_the_rows():
    """Accuracy: binomial, sqrt(p (1 - p) / n); ROUGE-L: the per-row scores' sample deviation over sqrt(n)."""
    from qprompt.metrics import task_metrics

    refs = ["a"] * 8 + ["b"] * 2
    preds = ["a"] * 8 + ["a", "b"]  # 9 of 10 right
    assert task_metrics("classification", preds, refs, ["a", "b"])["accuracy_se"] == pytest.approx(0.3 / 10**0.5)
    # per-row ROUGE-L: 1 (same words) and 0 (none shared): mean 0.5, sample deviation sqrt(0.5), over sqrt(2)
    result = task_metrics("generation", ["x y", "p q"], ["x y", "r s"], [])
    assert result["rouge_l"] == 0.5 and result["rouge_l_se"] == pytest.approx(0.5)


def test_a_resumed_run_keeps_its_patience_count(tiny_recipe, sentiment_files, tmp_path, monkeypatch):
    """Interrupted during step 4 (one evaluation without a new best behind it): the resumed run stops at step 5
    like the uninterrupted one, not three evaluations after the resume."""
    _scripted(monkeypatch, {})
    tiny_recipe.train.max_steps, tiny_recipe.train.eval_every, tiny_recipe.train.patience = 20, 1, 3
    real = ctrl_c_at(monkeypatch, 4)
    out = tmp_path / "split"
    with pytest.raises(QPromptError, match="interrupted at step 3"):
        _run(tiny_recipe, sentiment_files, out, "none")
    monkeypatch.setattr(qtrain, "target_logprobs", real)
    _run(tiny_recipe, sentiment_files, out, "none", resume=True)
    training = read_manifest(out)["training"]
    assert (training["steps"], training["best_step"], training["stopped"]) == (5, 2, "patience")
    tiny_recipe.train.patience = 5  # more patience is not another recipe: the stopped run goes on
    _run(tiny_recipe, sentiment_files, out, "none", resume=True)
    assert read_manifest(out)["training"]["steps"] == 7
