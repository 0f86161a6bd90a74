"""qprompt's own forward pass must agree with PEFT's, and padding must not change any score."""

import torch

from qprompt.config import load_recipe, override
from qprompt.data import Encoder, Example, collate
from qprompt.evaluate import classify
from qprompt.methods import add_soft_prompt, next_token_logprobs, target_logprobs
from qprompt.models import load_model


def _model(tiny_model_dir, quant="nf4", init="text"):
    recipe = override(load_recipe("sentiment"), method__virtual_tokens=5, method__init=init)
    base, tok, info = load_model(str(tiny_model_dir), quant)
    return add_soft_prompt(base, recipe, info.path), tok, recipe


def test_target_logprobs_match_peft_forward(tiny_model_dir):
    model, tok, recipe = _model(tiny_model_dir)
    encoder = Encoder(recipe, tok, 5)
    ex = encoder.encode({"text": "a gripping and humane film", "label": "positive"})
    batch = collate([ex], tok.pad_token_id)
    ours, count = target_logprobs(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, 5:]  # PEFT returns logits for the virtual tokens too
    logp = torch.log_softmax(logits.float(), -1)
    n = len(ex.prompt_ids)
    theirs = sum(logp[0, n - 1 + i, t] for i, t in enumerate(ex.target_ids))
    assert count.item() == len(ex.target_ids)
    assert torch.allclose(ours[0], theirs, atol=1e-4)


def test_right_padding_does_not_change_scores(tiny_model_dir):
    model, tok, recipe = _model(tiny_model_dir, quant="none", init="vocab")
    encoder = Encoder(recipe, tok, 5)
    rows = [{"text": "short", "label": "positive"},
            {"text": "a much longer review that drags on and on without end", "label": "negative"}]
    examples = [encoder.encode(r) for r in rows]
    with torch.no_grad():
        together, _ = target_logprobs(model, collate(examples, tok.pad_token_id))
        alone = torch.cat([target_logprobs(model, collate([e], tok.pad_token_id))[0] for e in examples])
        batch = collate(examples, tok.pad_token_id, with_target=False)
        nxt = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(together, alone, atol=1e-5)
    firsts = [Example(e.prompt_ids, e.target_ids[:1], None) for e in examples]
    with torch.no_grad():
        first_logp, _ = target_logprobs(model, collate(firsts, tok.pad_token_id))
    assert torch.allclose(nxt[torch.arange(2), [e.target_ids[0] for e in examples]], first_logp, atol=1e-5)


def test_single_pass_and_pairwise_classification_agree(tiny_model_dir):
    model, tok, recipe = _model(tiny_model_dir, quant="none", init="vocab")
    encoder = Encoder(recipe, tok, 5)
    rows = [{"text": t, "label": "positive"} for t in ("good", "bad film", "an odd, slow, lovely thing", "meh")]
    examples = [encoder.encode(r) for r in rows]
    fast = classify(model, encoder, examples, batch_size=3)
    slow = classify(model, encoder, examples, batch_size=3, single_pass=False)
    assert fast == slow


def test_only_prompt_parameters_get_gradients(tiny_model_dir):
    model, tok, recipe = _model(tiny_model_dir, quant="int8")
    encoder = Encoder(recipe, tok, 5)
    batch = collate([encoder.encode({"text": "fine", "label": "positive"})], tok.pad_token_id)
    logp, n = target_logprobs(model, batch)
    (-logp.sum() / n.sum()).backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("prompt_encoder" in name for name in with_grad)
