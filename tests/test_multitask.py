"""Multitask prompt training (`qprompt multitask`) and prompt transfer (`--init-from`) on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

from qprompt.cli import main
from qprompt.config import MethodConfig, load_recipe, override
from qprompt.data import load_splits
from qprompt.errors import QPromptError
from qprompt.evaluate import evaluate
from qprompt.forward import prompt_task, soft_prompt
from qprompt.methods import add_soft_prompt
from qprompt.models import load_model
from qprompt.multitask import MultitaskTrainer, multitask_recipe, train_multitask
from qprompt.transfer import saved_prompt, start_from_artifact, start_prompt
from tests.kit import ctrl_c_at, data_rows, write_jsonl

SMALL = dict(quant="none", data__validation_rows=8, train__max_steps=4, train__batch_size=8, train__lr=0.1,
             train__eval_every=2, train__eval_rows=8, train__log_every=1, train__warmup_steps=1)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("multitask-data")
    return {"sentiment": str(write_jsonl(folder / "sentiment.jsonl", data_rows("rotten_tomatoes", "train", 96))),
            "spam": str(write_jsonl(folder / "spam.jsonl", data_rows("sms_spam", "train", 48)))}


def small_recipes(model_dir, names=("sentiment", "spam"), **changes):
    return [override(load_recipe(n), model=str(model_dir), **{**SMALL, **changes}) for n in names]


def shared_parts(method="prompt-tuning"):
    return MethodConfig(name=method, virtual_tokens=4, init="vocab")


@pytest.fixture(scope="module", params=["prompt-tuning", "multitask-prompt-tuning"])
def multitask_artifact(request, tiny_model_dir, task_files, tmp_path_factory):
    recipes = small_recipes(tiny_model_dir)
    output = tmp_path_factory.mktemp("multitask") / request.param
    result = train_multitask(recipes, shared_parts(request.param), recipes[0].train, output, task_files,
                             progress=False)
    return output, result, recipes


def test_the_artifact_is_a_peft_adapter_whose_tasks_score_as_recorded(multitask_artifact, tiny_model_dir, task_files):
    output, result, recipes = multitask_artifact
    tasks = result["multitask"]["tasks"]
    assert [t["name"] for t in tasks] == ["sentiment", "spam"]
    evals = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    kept = next(e for e in evals if e["step"] == result["training"]["kept_step"])
    assert result["metrics"]["validation_mean_task_metric"] == pytest.approx(sum(kept["tasks"].values()) / 2)
    model, tokenizer, _ = load_model(str(tiny_model_dir), "none")
    model = PeftModel.from_pretrained(model, str(output))  # plain PEFT loads it
    for task, recipe in enumerate(recipes):
        rows = load_splits(recipe, task_files[recipe.name])["validation"]
        with prompt_task(model, task):
            accuracy = evaluate(model, tokenizer, recipe, rows)["accuracy"]
        assert accuracy == pytest.approx(tasks[task]["validation"])  # the same prompt, the same rows


def test_mpt_gives_each_task_its_own_prompt_starting_from_the_shared_one(multitask_artifact, tiny_model_dir):
    output, result, _ = multitask_artifact
    model, _, _ = load_model(str(tiny_model_dir), "none")
    model = PeftModel.from_pretrained(model, str(output))
    prompts = [soft_prompt(model, 1, torch.tensor([task]))[0] for task in (0, 1)]
    if result["method"] == "multitask-prompt-tuning":
        assert not torch.equal(prompts[0], prompts[1])  # trained apart
        fresh, _, _ = load_model(str(tiny_model_dir), "none")
        recipe = multitask_recipe(small_recipes(tiny_model_dir), shared_parts(result["method"]),
                                  small_recipes(tiny_model_dir)[0].train)
        fresh = add_soft_prompt(fresh, recipe, str(tiny_model_dir))
        start = [soft_prompt(fresh, 1, torch.tensor([task]))[0] for task in (0, 1)]
        shared = fresh.prompt_encoder["default"].embedding.weight
        assert torch.equal(start[0], shared) and torch.equal(start[1], shared)  # PEFT's ~4e-4 scale replaced
    else:
        assert torch.equal(prompts[0], prompts[1])


def test_a_mixed_batch_reads_each_rows_task_prompt_as_peft_does(tiny_model_dir):
    """qprompt's forward with per-row task ids equals PEFT's own MPT forward, row by row."""
    from qprompt.data import Encoder, collate
    from qprompt.forward import target_logprobs

    recipes = small_recipes(tiny_model_dir)
    recipe = multitask_recipe(recipes, shared_parts("multitask-prompt-tuning"), recipes[0].train)
    base, tok, info = load_model(str(tiny_model_dir), "none")
    model = add_soft_prompt(base, recipe, info.path)
    with torch.no_grad():  # tasks apart, so a row read with the wrong task's prompt would show
        encoder = model.prompt_encoder["default"]
        encoder.prefix_task_cols.add_(torch.randn_like(encoder.prefix_task_cols))
    rows = [{"text": "a gripping and humane film", "label": "positive"}, {"text": "dull", "label": "negative"}]
    batch = collate([Encoder(recipe, tok, 4).encode(r) for r in rows], tok.pad_token_id)
    batch["task_ids"] = torch.tensor([1, 0])
    with torch.no_grad():
        ours, _ = target_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       task_ids=batch["task_ids"]).logits[:, 4:]
        swapped, _ = target_logprobs(model, {**batch, "task_ids": torch.tensor([0, 1])})
    logp = torch.log_softmax(logits.float(), -1)
    labels = batch["labels"]
    theirs = torch.stack([sum(logp[r, t - 1, labels[r, t]] for t in range(1, labels.shape[1]) if labels[r, t] != -100)
                          for r in range(2)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert not torch.allclose(ours, swapped, atol=1e-3)


def test_each_epoch_takes_as_many_rows_from_every_task(tiny_model_dir, task_files, tmp_path):
    recipes = small_recipes(tiny_model_dir)
    _, tokenizer, info = load_model(str(tiny_model_dir), "none")
    splits = [load_splits(r, task_files[r.name]) for r in recipes]
    trainer = MultitaskTrainer(recipes, multitask_recipe(recipes, shared_parts(), recipes[0].train), tokenizer, info,
                               splits, tmp_path / "run", progress=False)
    trainer._encode_data()
    sizes = [len(rows) for rows in trainer.task_rows]
    assert sizes[0] > sizes[1] == trainer.per_task  # sentiment has more rows than spam
    epochs = [trainer._epoch_rows(epoch, __import__("random").Random(0)) for epoch in (0, 1)]
    for order in epochs:
        counts = [sum(trainer.example_task[i] == task for i in order) for task in (0, 1)]
        assert counts == [trainer.per_task, trainer.per_task]
    sentiment = [{i for i in order if trainer.example_task[i] == 0} for order in epochs]
    assert sentiment[0] != sentiment[1]  # the bigger task shows another slice next epoch


def test_an_interrupted_multitask_run_resumes_to_the_same_prompt(tiny_model_dir, task_files, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import qprompt.train as qtrain

    recipes = small_recipes(tiny_model_dir, train__eval_every=1)
    mpt = shared_parts("multitask-prompt-tuning")
    straight = train_multitask(recipes, mpt, recipes[0].train, tmp_path / "straight", task_files, progress=False)
    real = ctrl_c_at(monkeypatch, 3)  # Ctrl-C during step 3, after the step-2 checkpoint
    with pytest.raises(QPromptError, match="interrupted at step 2"):
        train_multitask(recipes, mpt, recipes[0].train, tmp_path / "split", task_files, progress=False)
    monkeypatch.setattr(qtrain, "target_logprobs", real)
    with pytest.raises(QPromptError, match="different settings"):  # another task list is another run
        train_multitask(recipes[::-1], mpt, recipes[0].train, tmp_path / "split", task_files, resume=True,
                        progress=False)
    resumed = train_multitask(recipes, mpt, recipes[0].train, tmp_path / "split", task_files, resume=True,
                              progress=False)
    assert resumed["multitask"] == straight["multitask"]
    x, y = (load_file(str(tmp_path / d / "checkpoint" / "adapter_model.safetensors")) for d in ("straight", "split"))
    for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_init_from_starts_a_new_task_at_the_saved_prompt(multitask_artifact, tiny_model_dir, method, tmp_path):
    output, result, _ = multitask_artifact
    model, _, info = load_model(str(tiny_model_dir), "none")
    recipe = override(load_recipe("nli"), model=str(tiny_model_dir), quant="none", method__virtual_tokens=4,
                      method__name=method, method__init_from=str(output))
    fresh = add_soft_prompt(model, recipe, str(tiny_model_dir))
    if method == "prefix-tuning":  # keys/values cannot start from embeddings: one clear error
        with pytest.raises(QPromptError, match="prompt-tuning prompt .embedding prefix.*kv prefix"):
            start_from_artifact(fresh, method, output, info.fingerprint)
        return
    start_from_artifact(fresh, method, output, info.fingerprint)
    source, _, _ = load_model(str(tiny_model_dir), "none")
    source = PeftModel.from_pretrained(source, str(output))
    # What the source's tasks read, averaged (one prompt for prompt tuning, each task's for MPT).
    expected = torch.stack([soft_prompt(source, 1, torch.tensor([t]))[0] for t in (0, 1)]).mean(0)
    torch.testing.assert_close(soft_prompt(fresh, 1)[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(saved_prompt(output), fresh.prompt_encoder["default"].embedding.weight.detach())


def test_init_from_refuses_what_cannot_start_the_prompt(multitask_artifact, tiny_model_dir, tmp_path):
    output, _, _ = multitask_artifact
    model, _, info = load_model(str(tiny_model_dir), "none")
    recipe = override(load_recipe("nli"), model=str(tiny_model_dir), quant="none", method__virtual_tokens=6,
                      method__name="prompt-tuning")
    fresh = add_soft_prompt(model, recipe, str(tiny_model_dir))
    with pytest.raises(QPromptError, match="has 4 virtual tokens, this run 6: pass --virtual-tokens 4"):
        start_from_artifact(fresh, "prompt-tuning", output, info.fingerprint)
    with pytest.raises(QPromptError, match="another base"):
        start_from_artifact(fresh, "prompt-tuning", output, "0" * 16)
    with pytest.raises(QPromptError, match="does not exist"):
        start_from_artifact(fresh, "prompt-tuning", tmp_path / "nowhere", info.fingerprint)
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "lora-like"
    shutil.copytree(output, other)
    save_file({"lora_A": torch.zeros(2, 2)}, str(other / "adapter_model.safetensors"))
    with pytest.raises(QPromptError, match="holds no soft prompt"):
        start_prompt(other, "prompt-tuning", 4, info.fingerprint)
    assert load_file(str(output / "adapter_model.safetensors"))  # the source is untouched
    with pytest.raises(QPromptError, match="learns its prompt directly.*not p-tuning"):
        override(recipe, method__name="p-tuning", method__init_from=str(output))


def test_a_recipe_digest_is_unchanged_by_the_new_method_fields():
    # The digest of the sentiment recipe (with its settings of then) before init_from and tasks existed: its
    # checkpoints still resume.
    old = override(load_recipe("sentiment"), method__name="prompt-tuning", method__virtual_tokens=20, train__lr=0.03)
    assert old.digest() == "bad2fde019151249"
    changed = override(load_recipe("sentiment"), method__init_from="runs/x")
    assert changed.digest() != load_recipe("sentiment").digest()


def test_the_cli_trains_a_multitask_prompt_then_a_task_from_it(tiny_model_dir, task_files, tmp_path):
    runner = CliRunner()
    common = ["--model", str(tiny_model_dir), "--quant", "none", "--virtual-tokens", "4", "--max-steps", "2",
              "--batch-size", "8", "--eval-every", "0"]
    source = tmp_path / "source"
    result = runner.invoke(main, ["multitask", "sentiment", "spam", "--output", str(source), *common,
                                  "--data", f"sentiment={task_files['sentiment']}", "--data",
                                  f"spam={task_files['spam']}"])
    assert result.exit_code == 0, result.output
    assert "saved multitask prompt" in result.output and "spam accuracy" in result.output
    made = json.loads((source / "qprompt.json").read_text())
    assert made["method"] == "multitask-prompt-tuning" and made["recipe"]["method"]["tasks"] == 2  # the default
    target = tmp_path / "target"
    spam = ["train", "--recipe", "spam", "--data", task_files["spam"], "--init-from", str(source), "--output",
            str(target), *common]
    result = runner.invoke(main, spam)  # the spam recipe learns a prefix of keys/values: one clear error
    assert result.exit_code == 2 and "learns a kv prefix" in result.output and not target.exists()
    result = runner.invoke(main, [*spam, "--method", "prompt-tuning"])
    assert result.exit_code == 0, result.output
    assert json.loads((target / "qprompt.json").read_text())["recipe"]["method"]["init_from"] == str(source)
    bad = runner.invoke(main, ["multitask", "sentiment", "spam", "--output", str(tmp_path / "x"), *common,
                               "--data", "spam.jsonl"])
    assert bad.exit_code != 0 and "RECIPE=FILE" in bad.output
    one = runner.invoke(main, ["multitask", "sentiment", "--output", str(tmp_path / "y"), *common])
    assert one.exit_code != 0 and "at least two recipes" in one.output


@pytest.mark.parametrize("source_method, target_method", [("p-tuning", "prompt-tuning"),
                                                          ("prefix-tuning", "prefix-tuning")])
def test_init_from_a_single_task_artifact_starts_at_what_its_model_reads(tiny_model_dir, sentiment_files, tmp_path,
                                                                          source_method, target_method):
    """P-tuning's saved prompt is its encoder's output, prefix tuning's the keys/values: a new prompt starts there."""
    from qprompt.train import train

    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="none", method__name=source_method,
                      method__virtual_tokens=4, train__max_steps=2, train__batch_size=8, train__eval_every=0,
                      train__eval_rows=8, train__lr=0.05)
    model, tok, info = load_model(recipe.model, recipe.quant)
    splits = load_splits(recipe, str(sentiment_files["train"]), str(sentiment_files["validation"]))
    train(recipe, model, tok, info, splits, tmp_path / "source", progress=False)
    source, _, _ = load_model(recipe.model, "none")
    source = PeftModel.from_pretrained(source, str(tmp_path / "source"))
    base, _, _ = load_model(recipe.model, "none")
    target = override(recipe, method__name=target_method, method__init="random",
                      method__init_from=str(tmp_path / "source"))
    fresh = add_soft_prompt(base, target, info.path)
    start_from_artifact(fresh, target_method, tmp_path / "source", info.fingerprint)
    theirs, ours = soft_prompt(source, 1), soft_prompt(fresh, 1)
    if target_method == "prefix-tuning":
        for a, b in zip(theirs.layers, ours.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
