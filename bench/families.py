"""Benchmark: which model families export, and how. Tiny random models built from each family's config.

For each family: a tiny model (2 layers, hidden 64, the tiny Llama's 600-token tokenizer), a prompt-tuning
artifact trained one step, then `qprompt export` (graph auto) in float32 and in int4. Records which graph was
made (fused: onnxruntime-genai's model builder knows the family; written: torch's exporter), the parity
check against PyTorch, or the one-line error.

    python bench/families.py --work /tmp/qprompt-families [--family llama --family falcon ...]
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402

SMALL = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
FAMILIES = {  # family -> (transformers config class, what differs from SMALL)
    "llama": ("LlamaConfig", {}), "qwen2": ("Qwen2Config", {}), "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {}), "phi3": ("Phi3Config", {}), "phi": ("PhiConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 16}), "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16}), "olmo": ("OlmoConfig", {}), "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}), "smollm3": ("SmolLM3Config", {}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}), "gpt_neox": ("GPTNeoXConfig", {}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": True}),
    "stablelm": ("StableLmConfig", {}),
}


def tiny_tokenizer(folder: Path) -> Path:
    """The test suite's tiny BPE tokenizer (600 tokens), trained on the committed review slice."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():
        return folder
    texts = [json.loads(line)["text"] for line in (ROOT / "tests/data/rotten_tomatoes-train.jsonl").read_text()
             .splitlines() if line.strip()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", model_max_length=256).save_pretrained(folder)
    return folder


def tiny_model(family: str, folder: Path, tokenizer: Path) -> Path:
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    name, extra = FAMILIES[family]
    cls = getattr(transformers, name)
    kwargs = {**SMALL, **extra}
    if "num_key_value_heads" not in inspect.signature(cls.__init__).parameters:
        kwargs.pop("num_key_value_heads")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, folder / f)
    return folder


def run_family(family: str, work: Path, tokenizer: Path) -> dict:
    from qprompt.config import load_recipe, override
    from qprompt.data import load_splits
    from qprompt.export import export
    from qprompt.models import load_model
    from qprompt.train import train

    model_dir = tiny_model(family, work / family, tokenizer)
    artifact = work / f"{family}-artifact"
    if not (artifact / "adapter_model.safetensors").is_file():
        shutil.rmtree(artifact, ignore_errors=True)
        recipe = override(load_recipe("sentiment"), model=str(model_dir), quant="none", method__virtual_tokens=4,
                          train__max_steps=1, train__batch_size=4, train__eval_every=0, train__eval_rows=4)
        model, tok, info = load_model(recipe.model, recipe.quant)
        data = ROOT / "tests/data"
        splits = load_splits(recipe, str(data / "rotten_tomatoes-train.jsonl"),
                             str(data / "rotten_tomatoes-validation.jsonl"))
        train(recipe, model, tok, info, splits, artifact, progress=False)
    result = {}
    for quantize in ("none", "int4"):
        out = work / f"{family}-export-{quantize}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        try:
            data = export(artifact, out, quantize=quantize, parity_tokens=4)
        except Exception as exc:  # noqa: BLE001  the one-line error is the result
            result[quantize] = {"error": str(exc).splitlines()[0]}
            continue
        check = data.tasks[0].parity
        result[quantize] = {"graph": data.graph, "max_abs_logit_diff": check["max_abs_logit_diff"],
                            "tolerance": check["tolerance"], "greedy_tokens_equal": check["greedy_tokens_equal"],
                            "seconds": round(time.perf_counter() - start, 1)}
    return result


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qprompt-families"),
              show_default=True)
@click.option("--family", "families", multiple=True, type=click.Choice(list(FAMILIES)), help="[default: all]")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "bench/results/families.json",
              show_default=True)
def main(work, families, out):
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(work / "tokenizer")
    results = {}
    for family in families or FAMILIES:
        results[family] = run_family(family, work, tokenizer)
        print(family, json.dumps(results[family]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"families": results, "machine": describe()}, indent=1) + "\n")
    print(f"\n{'family':<12}{'fp32 graph':>12}{'int4 graph':>12}  parity (fp32 / int4 twin)")
    for family, r in results.items():
        cells = [r[q].get("graph", "error") for q in ("none", "int4")]
        parity = " / ".join(f"{r[q]['max_abs_logit_diff']:.1e}" if "graph" in r[q] else r[q]["error"][:60]
                            for q in ("none", "int4"))
        print(f"{family:<12}{cells[0]:>12}{cells[1]:>12}  {parity}")


if __name__ == "__main__":
    main()
