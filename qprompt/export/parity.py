"""Does the graph compute what the PyTorch model does? Checked on real inputs before anything is written.

An exact graph (the PyTorch reference holds its weights and computes as it does in float32) must match
its logits within float rounding and give the same greedy tokens. An int4 graph computing with int8
activations (accuracy level 4) cannot be matched that closely by anything (see export/build.py `_check`):
its float32-compute twin is held to the tolerance, and its agreement is measured and reported, as for int8
graphs, which quantize weights the reference does not.
"""

from __future__ import annotations

import numpy as np
import torch

from ..deploy.runtime import ExportedModel, Sampling
from ..forward import greedy_generate, is_multitask, is_prefix, virtual_tokens

# An exact graph must match PyTorch to max |logit diff| <= max(PARITY_ABS, rel x the largest |logit|).
# rel is float32 reassociation. Written-out graph: on SmolLM2-135M (30 layers, |logits| up to ~45) PyTorch
# itself differs from PEFT's forward by ~5e-5 once the prompt's keys/values are computed separately, so
# 1e-5. The fused graph (the builder's kernels: GQA's own softmax) and any quantized graph (MLAS's blocked
# dequantize-and-multiply) reassociate more: 1.8e-5 measured on SmolLM2's fused int4 graph at accuracy level 1,
# 1.8e-5 on its written-out int4 graph, so 1e-4 (5x).
PARITY_ABS, PARITY_REL = 1e-4, 1e-5
PARITY_REL_FUSED = 1e-4


@torch.no_grad()
def parity(model, exported: ExportedModel, prompts: list[list[int]], new_tokens: int, task: str | None = None,
           rel: float = PARITY_REL) -> dict:
    """Compare the graph with the PyTorch PEFT model: logits on each prompt (PEFT's forward), greedy tokens, and
    how often the next token after each prompt is the same."""
    max_diff, max_logit, same_next = 0.0, 0.0, 0
    greedy_equal = True
    onnx_tokens = exported.generate_ids(prompts, Sampling(max_new_tokens=new_tokens), task)
    task_ids = exported.task_ids(task, 1)
    for ids, onnx_new in zip(prompts, onnx_tokens):
        x = torch.tensor([ids])
        # A multitask prompt exports its first task's prompt (soft_prompt's default): PEFT must be asked for it.
        first_task = {"task_ids": torch.zeros(1, dtype=torch.long)} if is_multitask(model) else {}
        ref = model(input_ids=x, attention_mask=torch.ones_like(x), **first_task).logits
        if not is_prefix(model):  # PEFT returns logits for the virtual tokens too
            ref = ref[:, virtual_tokens(model):]
        logits = exported.prompt_logits([ids], task_ids)[0]
        max_diff = max(max_diff, float(np.abs(logits - ref[0].float().numpy()).max()))
        same_next += int(logits[-1].argmax() == int(ref[0, -1].argmax()))
        max_logit = max(max_logit, float(ref.abs().max()))
        # Not PEFT's `generate`: PEFT 0.21 looks for the cache under `past_key_values`, which transformers 5.24
        # renamed to `cache`, so its generate drops prefix tuning's prefix and re-inserts a prompt-tuning prompt
        # at every step. greedy_generate is the decoding qprompt's evaluation uses, and tests/test_methods.py
        # holds it to greedy decoding by PEFT's forward without a cache. One row, so pad_id never shows.
        eos = set(exported.eos_ids)
        torch_new = greedy_generate(model, x, torch.ones_like(x), new_tokens, sorted(eos), pad_id=0)[0]
        torch_new = torch_new[: next((i for i, t in enumerate(torch_new) if t in eos), len(torch_new))]
        greedy_equal &= torch_new == onnx_new
    tolerance = max(PARITY_ABS, rel * max_logit)
    return {"max_abs_logit_diff": max_diff, "max_abs_logit": max_logit, "tolerance": tolerance,
            "greedy_tokens_equal": bool(greedy_equal), "next_token_agreement": same_next / len(prompts),
            "prompts": len(prompts), "new_tokens": new_tokens}


def passed(report: dict) -> bool:
    return report["max_abs_logit_diff"] <= report["tolerance"] and report["greedy_tokens_equal"]
