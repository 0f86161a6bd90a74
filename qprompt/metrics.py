"""Task metrics, in plain Python so the torch-free runtime can use them too."""

from __future__ import annotations

import math


def task_metrics(kind: str, predictions: list[str], references: list[str], labels: list[str]) -> dict:
    """The scoring rule every path uses (PyTorch evaluation, `qprompt eval EXPORT`, the benches): accuracy, macro-F1
    and per-label F1 for a classification task; mean ROUGE-L for a generation task. The main metric's standard error
    (`accuracy_se`, `rouge_l_se`) says how far another sample of as many rows could move it."""
    if kind == "classification":
        return classification_metrics(predictions, references, labels)
    scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
    mean = sum(scores) / len(scores)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
    return {"rouge_l": mean, "rouge_l_se": spread / math.sqrt(len(scores)), "rows": len(scores)}


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict:
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    f1s = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(predictions, references))
        fp = sum(p == lab and r != lab for p, r in zip(predictions, references))
        fn = sum(p != lab and r == lab for p, r in zip(predictions, references))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    per_label = {f"f1_{lab}": f for lab, f in zip(labels, f1s)}
    accuracy = correct / n
    return {"accuracy": accuracy, "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n),  # binomial
            "macro_f1": sum(f1s) / len(f1s), **per_label, "rows": n}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens (longest common subsequence)."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)
