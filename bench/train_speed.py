"""Benchmark: training speed and memory, qprompt's trainer against plain PEFT + transformers `Trainer`.

Both train the same soft prompt on the same base (same quantization, compute dtype, examples, batch
size, learning rate and schedule) for --steps steps, each in its own process so peak memory is its
own: CUDA peak allocated on a GPU, peak RSS on CPU. Reported: real (non-padding) tokens/s over steps
2..N, peak memory, mean training loss of the last 5 steps, and qprompt / baseline ratios; the JSON
also holds `qprompt plan`'s prediction for the qprompt run.

The baseline is written the way PEFT's prompt-tuning guide and the Trainer docs show it: a
bitsandbytes model from `from_pretrained`, `get_peft_model`, labels -100 outside the target, a
padding collator, `Trainer.train()`.

Models: --model smollm2-135m (real weights, real short reviews from ../shared) or --arch NAME, a
random-weight model with a published architecture (qprompt.plan.ARCHITECTURES, e.g. llama-3-8b, or
`tiny` for a CPU check of that path) fed synthetic rows of exactly --seq-len tokens: speed and
memory do not depend on trained weights, and no hub is needed.

    python bench/train_speed.py --model smollm2-135m --quant nf4 --batch 16 --steps 20
    python bench/train_speed.py --arch llama-3-8b --quant nf4 --batch 4 --seq-len 512 --steps 10   # a GPU
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = ROOT.parent / "shared" / "data" / "rotten_tomatoes" / "train.jsonl"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "tie_word_embeddings": True,
        "max_position_embeddings": 1024}
WORDS = 2000  # synthetic vocabulary for random-weight runs


def random_model_folder(arch: str) -> Path:
    """A random-weight model with `arch`'s config and a word-level tokenizer, saved once to the cache."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from qprompt.plan import ARCHITECTURES
    from qprompt.sources import cache_dir

    folder = cache_dir() / "random-models" / arch
    if (folder / "config.json").is_file():
        return folder
    data = dict(TINY if arch == "tiny" else ARCHITECTURES[arch])
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "yes": 3, "no": 4, **{f"w{i}": 5 + i for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", model_max_length=config.max_position_embeddings)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16 on disk: half the bytes
    tmp = folder.with_name(arch + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def bench_recipe(args: dict, model_path: str):
    from qprompt.config import load_recipe, override

    recipe = override(load_recipe("sentiment"), model=model_path, quant=args["quant"], method__name=args["method"],
                      method__virtual_tokens=args["virtual_tokens"], method__init="random",
                      train__max_steps=args["steps"], train__batch_size=args["batch"], train__lr=3e-2,
                      train__warmup_steps=2, train__eval_every=0, train__eval_rows=8, train__log_every=1,
                      train__gradient_checkpointing=args["gradient_checkpointing"],
                      train__lean_memory=args["lean_memory"])
    if args["arch"]:  # synthetic rows: the template is the row itself, the label one word
        recipe.template.prompt, recipe.template.instruction, recipe.template.chat = "{text}", "", False
        recipe.labels = {"positive": "yes", "negative": "no"}
        recipe.data.max_length = args["seq_len"] + args["virtual_tokens"] + 8
    return recipe


def bench_rows(args: dict) -> list[dict]:
    rng = random.Random(0)
    if args["arch"]:  # seq_len - 1 prompt tokens and a one-token target: exactly seq_len tokens per row
        return [{"text": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(args["seq_len"] - 1)),
                 "label": rng.choice(["positive", "negative"])} for _ in range(args["batch"] * (args["steps"] + 2))]
    rows = [json.loads(x) for x in SENTIMENT.read_text().splitlines()]
    return rows[: args["batch"] * (args["steps"] + 2)]


def peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3


def run_qprompt(args: dict, model_path: str, rows: list[dict]) -> dict:
    from qprompt.models import load_model
    from qprompt.train import train

    recipe = bench_recipe(args, model_path)
    model, tok, info = load_model(model_path, args["quant"], args["dtype"], args["device"])
    with tempfile.TemporaryDirectory() as out:
        train(recipe, model, tok, info, {"train": rows, "validation": rows[:8]}, Path(out), progress=False)
        log = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    timed = [r for r in steps if r["step"] >= 2]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
            "loss": sum(r["loss"] for r in steps[-5:]) / len(steps[-5:]), "steps": len(steps)}


def run_peft_trainer(args: dict, model_path: str, rows: list[dict]) -> dict:
    """The baseline, as PEFT's and transformers' docs write it."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from qprompt.data import Encoder
    from qprompt.models import load_tokenizer

    dtype = getattr(torch, args["dtype"])
    quant = {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=dtype),
             "int8": BitsAndBytesConfig(load_in_8bit=True), "none": None}[args["quant"]]
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": args["device"]})
    tokenizer = load_tokenizer(model_path)
    torch.manual_seed(0)
    model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args["virtual_tokens"],
                                                     prompt_tuning_init=PromptTuningInit.RANDOM))
    if args["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Same token ids as qprompt's (its encoder applies the template); labels -100 outside the target.
    encoder = Encoder(bench_recipe(args, model_path), tokenizer, args["virtual_tokens"])
    dataset = []
    for ex in encoder.encode_all(rows, "benchmark rows"):
        ids = ex.prompt_ids + ex.target_ids
        dataset.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                        "labels": [-100] * len(ex.prompt_ids) + ex.target_ids})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch_tokens = []

    def collate(features):
        batch = collator(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    timer = StepTimer()
    on_cpu = args["device"] == "cpu"
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args["batch"], max_steps=args["steps"],
        learning_rate=3e-2, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=on_cpu, bf16=args["dtype"] == "bfloat16",
        remove_unused_columns=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                      callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = timer.times[-1] - timer.times[0]
    return {"tokens_per_s": sum(batch_tokens[1 : len(timer.times)]) / seconds,
            "loss": sum(losses[-5:]) / len(losses[-5:]), "steps": len(timer.times)}


def worker(args: dict) -> dict:
    """One trainer in this process: returns its speed, loss and peak memory."""
    sys.path.insert(0, str(ROOT))
    import torch

    from qprompt.cli import quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    model_path = str(random_model_folder(args["arch"])) if args["arch"] else args["model"]
    if not args["arch"]:
        from qprompt.models import resolve_model

        model_path = resolve_model(model_path)
    rows = bench_rows(args)
    run = run_qprompt if args["trainer"] == "qprompt" else run_peft_trainer
    result = run(args, model_path, rows)
    result["peak_memory_gib"] = peak_memory_gib(args["device"])
    result["max_row_tokens"] = args["seq_len"] if args["arch"] else None
    return result


def plan_for(args: dict, model_path: str) -> dict:
    from qprompt.data import Encoder
    from qprompt.models import load_tokenizer
    from qprompt.plan import Shape, load_config, plan_memory

    config = load_config(model_path)
    if args["arch"]:
        seq_len = args["seq_len"]
    else:  # the longest row sets the peak (batches are padded to their longest row)
        encoder = Encoder(bench_recipe(args, model_path), load_tokenizer(model_path), args["virtual_tokens"])
        seq_len = max(len(e.prompt_ids) + len(e.target_ids) for e in encoder.encode_all(bench_rows(args), "rows"))
    plan = plan_memory(Shape.of(config), args["quant"], args["method"], args["virtual_tokens"], args["batch"],
                       seq_len, args["dtype"], "cuda" if args["device"].startswith("cuda") else "cpu",
                       args["gradient_checkpointing"], target_tokens=1)
    return {**plan.to_dict(), "seq_len": seq_len}


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Real model (alias, folder, hub id).")
@click.option("--arch", default=None, help="Random-weight architecture instead: llama-3-8b, or tiny (CPU check).")
@click.option("--quant", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True)
@click.option("--method", default="prompt-tuning", show_default=True, help="Only prompt tuning has a baseline.")
@click.option("--virtual-tokens", default=100, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--seq-len", default=512, show_default=True, help="Tokens per synthetic row (with --arch).")
@click.option("--steps", default=20, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Both trainers recompute activations.")
@click.option("--lean-memory", is_flag=True, help="qprompt's CPU lean-memory mode (train.lean_memory).")
@click.option("--trainers", default="qprompt,peft-trainer", show_default=True)
@click.option("--out", "json_out", default=None,
              help="JSON path [default: bench/results/train_speed-DEVICE-MODEL-QUANT.json].")
@click.option("--worker", "worker_args", default=None, hidden=True)
def main(model, arch, quant, method, virtual_tokens, batch, seq_len, steps, gradient_checkpointing, lean_memory,
         trainers, json_out, worker_args):
    if worker_args:  # child process: one trainer, result as JSON on the last stdout line
        click.echo(json.dumps(worker(json.loads(worker_args))))
        return
    sys.path.insert(0, str(ROOT))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = {"model": model, "arch": arch, "quant": quant, "method": method, "virtual_tokens": virtual_tokens,
            "batch": batch, "seq_len": seq_len, "steps": steps, "gradient_checkpointing": gradient_checkpointing,
            "lean_memory": lean_memory,
            "device": device, "dtype": "bfloat16" if device == "cuda" else "float32"}
    from machine import describe

    results = {"args": args, "command": " ".join(["python", *sys.argv]), "runs": {}, "machine": describe()}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for trainer in trainers.split(","):
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**args, "trainer": trainer})],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"{trainer} failed:\n{done.stderr[-3000:]}")
        results["runs"][trainer] = json.loads(done.stdout.strip().splitlines()[-1])
    from qprompt.models import resolve_model

    model_path = str(random_model_folder(arch)) if arch else resolve_model(model)
    results["plan"] = plan_for(args, model_path)
    show(results)
    name = arch or model
    mode = "-lean" if lean_memory else ""
    path = Path(json_out or ROOT / "bench" / "results" / f"train_speed-{device}-{name}-{quant}{mode}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    click.echo(f"wrote {path}")


def show(results: dict) -> None:
    runs, plan = results["runs"], results["plan"]
    unit = "peak GiB (CUDA alloc)" if results["args"]["device"] == "cuda" else "peak GiB (RSS)"
    click.echo(f"{'trainer':<14}{'tokens/s':>10}{unit:>24}{'loss (last 5)':>15}")
    for name, r in runs.items():
        click.echo(f"{name:<14}{r['tokens_per_s']:>10.1f}{r['peak_memory_gib']:>24.2f}{r['loss']:>15.4f}")
    if "qprompt" in runs and "peft-trainer" in runs:
        q, b = runs["qprompt"], runs["peft-trainer"]
        results["ratios"] = {"tokens_per_s": q["tokens_per_s"] / b["tokens_per_s"],
                             "peak_memory": q["peak_memory_gib"] / b["peak_memory_gib"]}
        click.echo(f"qprompt / baseline: tokens/s {results['ratios']['tokens_per_s']:.2f}x, "
                   f"peak memory {results['ratios']['peak_memory']:.2f}x")
    if "qprompt" in runs:
        measured = runs["qprompt"]["peak_memory_gib"]
        results["plan_error"] = plan["total"] / measured - 1
        click.echo(f"qprompt plan predicted {plan['total']:.2f} GiB for qprompt (measured {measured:.2f}, "
                   f"{results['plan_error']:+.1%}; seq len {plan['seq_len']})")


if __name__ == "__main__":
    main()
