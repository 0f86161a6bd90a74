"""Summarize recipe: train a soft prompt that writes a paper's outcome from its abstract (ACLSum),
then compare it with the hand-written prompt on held-out papers (ROUGE-L, greedy decoding).

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prompt-tuning (default), p-tuning, prefix-tuning (--method)
  - data:    ACLSum from the aclsum 0.1.2 wheel (fetched with pip), or your own .jsonl/.csv with
             "document" and "summary"

The job's steps are qprompt/pipeline.py's train_and_compare (what `qprompt job` runs);
defaults live in summarize.yaml beside this file. Run:
  python recipes/summarize.py
  python recipes/summarize.py --test-limit 20
"""

from pathlib import Path

from qprompt.cli import recipe_script
from qprompt.pipeline import train_and_compare

# Read the rows, score the hand-written prompt, train (or reuse) the soft prompt, score it on a fresh base, then the
# fine-tuning baselines --baselines names: train_and_compare, with summarize.yaml's defaults and this command line.
main = recipe_script(Path(__file__).with_suffix(".yaml"))(train_and_compare)

if __name__ == "__main__":
    main()
