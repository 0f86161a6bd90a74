"""qprompt's own forward pass must agree with PEFT's for every method, whatever the padding."""

import contextlib
import os

import pytest
import torch

from qprompt.config import load_recipe, override
from qprompt.data import Encoder, Example, collate
from qprompt.evaluate import classify, generate_texts
from qprompt.forward import greedy_generate, is_prefix, next_token_logprobs, target_logprobs
from qprompt.methods import add_soft_prompt
from qprompt.models import load_model

METHODS = ["prompt-tuning", "p-tuning", "prefix-tuning"]
ROWS = [{"text": "short", "label": "positive"},
        {"text": "a much longer review that drags on and on without end", "label": "negative"},
        {"text": "an odd, slow, lovely thing", "label": "positive"}]


def _model(tiny_model_dir, method="prompt-tuning", quant="nf4", init="vocab", **extra):
    recipe = override(load_recipe("sentiment"), method__name=method, method__virtual_tokens=5, method__init=init,
                      **extra)
    base, tok, info = load_model(str(tiny_model_dir), quant)
    model = add_soft_prompt(base, recipe, info.path)
    if method != "prompt-tuning":  # fresh encoders start near zero: shake them so the prompt matters
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    return model, tok, recipe


@pytest.mark.parametrize("method", METHODS)
def test_target_logprobs_match_peft_forward(tiny_model_dir, method):
    model, tok, recipe = _model(tiny_model_dir, method)
    ex = Encoder(recipe, tok, 5).encode({"text": "a gripping and humane film", "label": "positive"})
    batch = collate([ex], tok.pad_token_id)
    with torch.no_grad():
        ours, count = target_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if not is_prefix(model):
        logits = logits[:, 5:]  # PEFT returns logits for the virtual tokens too
    logp = torch.log_softmax(logits.float(), -1)
    n = len(ex.prompt_ids)
    theirs = sum(logp[0, n - 1 + i, t] for i, t in enumerate(ex.target_ids))
    assert count.item() == len(ex.target_ids)
    assert torch.allclose(ours[0], theirs, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_left_and_right_padding_give_the_same_scores(tiny_model_dir, method, quant):
    model, tok, recipe = _model(tiny_model_dir, method, quant)
    examples = [Encoder(recipe, tok, 5).encode(r) for r in ROWS]
    with torch.no_grad():
        right, _ = target_logprobs(model, collate(examples, tok.pad_token_id))
        left, _ = target_logprobs(model, collate(examples, tok.pad_token_id, pad_left=True))
        alone = torch.cat([target_logprobs(model, collate([e], tok.pad_token_id))[0] for e in examples])
        firsts = [Example(e.prompt_ids, e.target_ids[:1], None) for e in examples]
        first_logp, _ = target_logprobs(model, collate(firsts, tok.pad_token_id))
        for pad_left in (False, True):
            batch = collate(examples, tok.pad_token_id, with_target=False, pad_left=pad_left)
            nxt = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
            assert torch.allclose(nxt[torch.arange(3), [e.target_ids[0] for e in examples]], first_logp, atol=1e-4)
    assert torch.allclose(right, alone, atol=1e-4) and torch.allclose(left, alone, atol=1e-4)


def test_single_pass_and_pairwise_classification_agree(tiny_model_dir):
    model, tok, recipe = _model(tiny_model_dir, quant="none")
    encoder = Encoder(recipe, tok, 5)
    rows = [{"text": t, "label": "positive"} for t in ("good", "bad film", "an odd, slow, lovely thing", "meh")]
    examples = [encoder.encode(r) for r in rows]
    fast = classify(model, encoder, examples, batch_size=3)
    slow = classify(model, encoder, examples, batch_size=3, single_pass=False)
    assert fast == slow


@pytest.mark.parametrize("method,extra", [("prompt-tuning", {}), ("p-tuning", {"method__encoder": "lstm"}),
                                          ("p-tuning", {}), ("prefix-tuning", {"method__prefix_projection": True}),
                                          ("prefix-tuning", {})])
def test_only_prompt_parameters_get_gradients(tiny_model_dir, method, extra):
    model, tok, recipe = _model(tiny_model_dir, method, "int8", **extra)
    batch = collate([Encoder(recipe, tok, 5).encode(ROWS[0])], tok.pad_token_id)
    logp, n = target_logprobs(model, batch)
    (-logp.sum() / n.sum()).backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("prompt_encoder" in name for name in with_grad)
    assert all(p.grad is None for name, p in model.named_parameters() if "prompt_encoder" not in name)


def test_class_label_init_uses_the_label_words(tiny_model_dir):
    model, tok, recipe = _model(tiny_model_dir, init="labels")
    words = tok("positive negative", add_special_tokens=True)["input_ids"]
    table = model.get_base_model().get_input_embeddings().weight
    prompt = model.prompt_encoder["default"].embedding.weight
    for i in range(5):  # PEFT repeats the words' tokens to fill the virtual tokens
        assert torch.allclose(prompt[i], table[words[i % len(words)]])


def _close_gradients(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding: a backward pass's inner products run over K <= 128 terms here, and
    summing them in another order moves the result by at most K * 2^-24 ~ 7.6e-6 of the terms' magnitude,
    bounded by the gradient's largest entry (p-tuning's is ~2e-4, prompt tuning's ~0.2: no absolute tolerance)."""
    return bool((a - b).abs().max() <= 1e-5 * a.abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(tiny_model_dir, method):
    from qprompt.memory import enable_gradient_checkpointing

    def grads_and_saved(checkpointing):
        torch.manual_seed(0)
        model, tok, recipe = _model(tiny_model_dir, method, "nf4")
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        batch = collate([Encoder(recipe, tok, 5).encode(r) for r in ROWS], tok.pad_token_id)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logp, n = target_logprobs(model, batch)
        (-logp.sum() / n.sum()).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad], sum(saved)

    plain, plain_saved = grads_and_saved(False)
    ckpt, ckpt_saved = grads_and_saved(True)
    assert plain and all(_close_gradients(a, b) for a, b in zip(plain, ckpt))
    assert ckpt_saved < plain_saved


@pytest.mark.parametrize("saver", ["gated-mlp", "gated-mlp-gelu", "grouped-sdpa", "gated-mlp+checkpointing"])
@pytest.mark.parametrize("method", METHODS)
def test_memory_savers_give_the_same_gradients_with_fewer_saved_bytes(tiny_model_dir, method, saver):
    """The training-time memory savers change what autograd keeps, never the loss or the gradients."""
    from transformers.activations import ACT2FN

    from qprompt.memory import enable_gradient_checkpointing, grouped_query_sdpa, lean_gated_mlp

    def grads_and_saved(on):
        torch.manual_seed(0)
        model, tok, recipe = _model(tiny_model_dir, method, "nf4")
        mlps = [m for m in model.modules() if hasattr(m, "act_fn")]
        if saver.endswith("gelu"):  # the generic (non-SiLU) backward
            for m in mlps:
                m.act_fn = ACT2FN["gelu_pytorch_tanh"]
        if "checkpointing" in saver:
            enable_gradient_checkpointing(model)
        if on and "gated-mlp" in saver:
            assert lean_gated_mlp(model) == len(mlps) == 2
        model.train()
        batch = collate([Encoder(recipe, tok, 5).encode(r) for r in ROWS], tok.pad_token_id)
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        scope = grouped_query_sdpa() if on and saver == "grouped-sdpa" else contextlib.nullcontext()
        with scope, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logp, n = target_logprobs(model, batch)
        loss = -logp.sum() / n.sum()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad], sum(storages.values())

    loss, grads, saved = grads_and_saved(False)
    lean_loss, lean_grads, lean_saved = grads_and_saved(True)
    # The forward runs the same float32 ops on the same values (bitwise equal on AVX-512, AVX2 and scalar
    # kernels, 1 or 2 threads); 2e-6 is the worst-case rounding of a 32-term sum reordered (32 * 2^-24).
    assert lean_loss == pytest.approx(loss, rel=2e-6)
    # grouped-sdpa really changes the gradients, by <= 4e-7 of their largest entry (measured): SDPA sums each
    # key/value head's gradient over its query heads itself, where repeat_kv's backward summed it after.
    assert grads and all(_close_gradients(a, b) for a, b in zip(grads, lean_grads))
    if "checkpointing" in saver:  # the layer's inputs are all it keeps either way; the recomputation must agree
        assert lean_saved == saved
    else:
        assert lean_saved < saved
    assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") is None  # the switch does not outlive its scope


def test_lean_gated_mlp_leaves_other_mlps_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    from qprompt.memory import lean_gated_mlp

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert lean_gated_mlp(model) == 0


@pytest.mark.parametrize("init", ["text", "labels", "vocab"])
def test_prefix_tuning_starts_from_the_keys_and_values_of_real_tokens(tiny_model_dir, init):
    recipe = override(load_recipe("sentiment"), method__name="prefix-tuning", method__virtual_tokens=5,
                      method__init=init)
    base, tok, info = load_model(str(tiny_model_dir), "none")
    model = add_soft_prompt(base, recipe, info.path)
    # The same tokens through the bare model give the keys/values the prefix must hold.
    from qprompt.methods.prefix_tuning import init_token_ids

    ids = init_token_ids(recipe.method, recipe, info.path, base.config.vocab_size)
    ids = (ids * 5)[:5]
    with torch.no_grad():
        expected = model.get_base_model()(input_ids=torch.tensor([ids]), use_cache=True).past_key_values.layers
        prefix = model.get_prompt(batch_size=1).layers
    assert len(prefix) == len(expected)
    for got, want in zip(prefix, expected):
        assert torch.allclose(got.keys, want.keys, atol=1e-5) and torch.allclose(got.values, want.values, atol=1e-5)
    if init == "text":  # the instruction's tokens, not PEFT's N(0, 1) draw
        assert ids[:3] == tok(recipe.template.instruction, add_special_tokens=False)["input_ids"][:3]


def _greedy_without_cache(model, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """Greedy decoding by definition: the whole sequence through the (PEFT) model's forward at every step.

    No cache and no position bookkeeping to get wrong. PEFT's `generate` cannot be the reference:
    PEFT 0.21 reads the cache as `past_key_values`, which transformers 5.24 renamed to `cache`, so
    it re-inserts the prompt at every step (prompt and p-tuning) or drops the prefix (prefix tuning)."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        x = torch.tensor([seq])
        seq.append(int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
        if seq[-1] in stops:
            break
    return seq[len(prompt):]


@pytest.mark.parametrize("method", ["none", *METHODS])
def test_batched_generation_matches_greedy_decoding_of_rows_alone(tiny_model_dir, method):
    """Greedy decoding in left-padded batches: each row's tokens equal greedy decoding of that row alone
    by the PEFT/transformers forward, whatever it is batched with (the summarize evaluation relies on it)."""
    if method == "none":
        model, tok, _ = load_model(str(tiny_model_dir), "none")
    else:
        model, tok, _ = _model(tiny_model_dir, method, "none")
    # The tiny model's 0.02-std weights mostly echo the last token, whatever its position: redraw the
    # base's matrices larger so that a position or cache mistake changes the tokens.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not p.requires_grad and "embed" not in name:
                p.normal_(0, 0.3)
    prompts = [tok(t)["input_ids"] for t in ("good", "a much longer review that drags on", "an odd, slow film")]
    stops = [tok.eos_token_id]
    with torch.no_grad():
        expected = [_greedy_without_cache(model, p, 6, stops) for p in prompts]
    batch = collate([Example(p, [], None) for p in prompts], tok.pad_token_id, with_target=False, pad_left=True)
    batched = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 6, stops, tok.pad_token_id)
    assert batched == expected
    assert len({tuple(e) for e in expected}) > 1  # the rows differ, so mixing them up would show
    texts = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert texts == generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=1)
