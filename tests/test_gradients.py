"""A training step's gradient reaches the prompt through every layer of the frozen base, for every method
and quantization, after everything qprompt runs before and while training (prefix init, the lean MLP
self-check, evaluation passes in eval mode without gradients).

On a CPU with AVX512-BF16, bitsandbytes 0.50 repacked a 4-bit layer for its inference kernel after one
such pass, and that kernel has no backward: the layer then passed no gradient at all. These tests fail
there without qprompt.models.keep_4bit_layers_trainable.
"""

import pytest
import torch

from qprompt.config import load_recipe, override
from qprompt.data import Encoder, collate
from qprompt.errors import QPromptError
from qprompt.evaluate import evaluate
from qprompt.forward import base_of, target_logprobs
from qprompt.memory import lean_gated_mlp
from qprompt.methods import add_soft_prompt
from qprompt.models import load_model

METHODS = ["prompt-tuning", "p-tuning", "prefix-tuning"]
ROWS = [{"text": "short", "label": "positive"},
        {"text": "a much longer review that drags on and on without end", "label": "negative"},
        {"text": "an odd, slow, lovely thing", "label": "positive"}]


def _recipe(method, **extra):
    return override(load_recipe("sentiment"), method__name=method, method__virtual_tokens=5, **extra)


def _prepare_like_training(model, tok, recipe, path):
    """What qprompt.train does before the first step, then one evaluation pass as it does mid-training."""
    model = add_soft_prompt(model, recipe, path)
    assert lean_gated_mlp(model) == 2
    model.eval()
    evaluate(model, tok, recipe, ROWS, "validation data")  # eval mode, no grad: what once repacked layers
    model.train()
    return model


def _linears(model):
    """The decoder's projections (quantized or not), by name."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, torch.nn.Linear)
    layers = base_of(model).get_decoder().layers
    return {f"{i}.{name}": m for i, layer in enumerate(layers) for name, m in layer.named_modules()
            if isinstance(m, kinds)}


def _step_with_hooks(model, tok, recipe):
    """One training step's backward; returns the grad each projection passed to its input (None: none),
    for the projections whose input needed a gradient."""
    needs, passed = set(), {}

    def on_forward(name):
        def hook(_module, args):
            if args[0].requires_grad:
                needs.add(name)
        return hook

    def on_backward(name):
        def hook(_module, grad_input, _grad_output):
            passed[name] = grad_input[0]
        return hook

    handles = []
    for name, m in _linears(model).items():
        handles += [m.register_forward_pre_hook(on_forward(name)), m.register_full_backward_hook(on_backward(name))]
    batch = collate([Encoder(recipe, tok, 5).encode(r) for r in ROWS], tok.pad_token_id)
    logp, n = target_logprobs(model, batch)
    (-logp.sum() / n.sum()).backward()
    for h in handles:
        h.remove()
    return {name: passed.get(name) for name in needs}


def _assert_gradient_everywhere(model, tok, recipe, method):
    passed = _step_with_hooks(model, tok, recipe)
    names = set(_linears(model))
    # Prefix tuning's prompt enters at the attention: layer 0's q/k/v read plain token embeddings.
    without = {"0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"} if method == "prefix-tuning" else set()
    assert set(passed) == names - without
    dead = [name for name, g in passed.items() if g is None or not g.abs().sum() > 0 or not g.isfinite().all()]
    assert not dead, f"no gradient passed through {dead}"
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, name
        assert p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", "none"])
@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_reaches_every_layer_and_parameter(tiny_model_dir, method, quant):
    base, tok, info = load_model(str(tiny_model_dir), quant)
    recipe = _recipe(method)
    model = _prepare_like_training(base, tok, recipe, info.path)
    _assert_gradient_everywhere(model, tok, recipe, method)


@pytest.mark.parametrize("method,extra", [("p-tuning", {"method__encoder": "lstm"}),
                                          ("prefix-tuning", {"method__prefix_projection": True})])
def test_every_encoder_parameter_peft_creates_is_trained(tiny_model_dir, method, extra):
    """The other encoders: each of their parameters (LSTM, projection MLP) is on the path to the loss."""
    base, tok, info = load_model(str(tiny_model_dir), "nf4")
    recipe = _recipe(method, **extra)
    model = _prepare_like_training(base, tok, recipe, info.path)
    _assert_gradient_everywhere(model, tok, recipe, method)


def _own_4bit_model(folder):
    """A 4-bit model loaded by the user's own code, not by qprompt.models.load_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("method", METHODS)
def test_a_model_loaded_by_the_user_trains_through_every_layer(tiny_model_dir, method):
    model, tok = _own_4bit_model(tiny_model_dir)
    recipe = _recipe(method)
    model = _prepare_like_training(model, tok, recipe, str(tiny_model_dir))
    _assert_gradient_everywhere(model, tok, recipe, method)


def test_a_layer_already_packed_for_cpu_inference_is_refused(tiny_model_dir):
    """A user's model that bitsandbytes has repacked (what an eval-mode no-grad pass does on an AVX512-BF16
    CPU; done here by hand so that any CPU runs it) cannot train: refused with the fix named."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model, _ = _own_4bit_model(tiny_model_dir)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    with pytest.raises(QPromptError, match=r"layers\.0\.mlp\.up_proj.*reload the model"):
        add_soft_prompt(model, _recipe("prompt-tuning"), str(tiny_model_dir))


def _dequantized_copy(model_4bit, folder):
    """The same network in plain float32: each 4-bit weight dequantized into an nn.Linear."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    reference, _, _ = load_model(str(folder), "none")
    ours = dict(base_of(model_4bit).named_modules())
    with torch.no_grad():
        for name, m in reference.named_modules():
            if isinstance(ours.get(name), bnb.nn.Linear4bit):
                m.weight.copy_(dequantize_4bit(ours[name].weight.data, ours[name].weight.quant_state))
    return reference


@pytest.mark.parametrize("method", METHODS)
def test_the_nf4_gradient_is_the_gradient_of_the_dequantized_float32_model(tiny_model_dir, method):
    base, tok, info = load_model(str(tiny_model_dir), "nf4")
    recipe = _recipe(method)
    reference = add_soft_prompt(_dequantized_copy(base, tiny_model_dir), recipe, info.path)
    model = _prepare_like_training(base, tok, recipe, info.path)
    reference.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    reference.train()
    batch = collate([Encoder(recipe, tok, 5).encode(r) for r in ROWS], tok.pad_token_id)
    for m in (model, reference):
        logp, n = target_logprobs(m, batch)
        (-logp.sum() / n.sum()).backward()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    want = [p.grad for p in reference.parameters() if p.requires_grad]
    assert len(got) == len(want) > 0
    # Both compute the same float32 products of the same weights; only the summation order of the dot
    # products (K <= 128 terms, error <= K * 2^-24 ~ 8e-6 of the terms' magnitude) and the lean MLP's
    # closed-form SiLU derivative differ. 5e-5 of the gradient's largest entry leaves 6x headroom over
    # that bound; a layer that drops its gradient changes it by 10-100 %.
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 5e-5 * w.abs().max()
