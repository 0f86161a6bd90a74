import pytest
import torch

from qprompt.errors import QPromptError
from qprompt.models import fingerprint, load_model, resolve_model


@pytest.mark.parametrize("quant,layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt"),
                                         ("none", "Linear")])
def test_load_quantized_frozen(tiny_model_dir, quant, layer):
    model, tokenizer, info = load_model(str(tiny_model_dir), quant)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    if quant in ("nf4", "fp4"):
        assert q_proj.weight.quant_type == quant
        assert q_proj.weight.quant_state.nested  # double quantization is on by default
    assert not any(p.requires_grad for p in model.parameters())
    assert info.quant == quant and info.compute_dtype == "float32" and info.device == "cpu"
    logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape == (1, 4, len(tokenizer)) and torch.isfinite(logits).all()


def test_fingerprint_ignores_quantization_but_not_architecture(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    _, tok, nf4 = load_model(str(tiny_model_dir), "nf4")
    _, _, plain = load_model(str(tiny_model_dir), "none")
    assert nf4.fingerprint == plain.fingerprint
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    assert fingerprint(config, tok) != plain.fingerprint


def test_unknown_model_names_are_clear_errors(tmp_path):
    with pytest.raises(QPromptError, match="unknown model 'not a model'"):
        resolve_model("not a model")
    with pytest.raises(QPromptError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_hub_ids_pass_through_or_fail_fast_offline(monkeypatch):
    import time

    import qprompt.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    # An endpoint that cannot resolve (.invalid is reserved): no hub, and the id is not cached.
    monkeypatch.undo()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    assert not models.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(QPromptError, match="'someone/no-such-model' is not in the local Hugging Face cache and "
                                           "hub.example.invalid cannot be reached"):
        resolve_model("someone/no-such-model")
    assert time.perf_counter() - start < 10
