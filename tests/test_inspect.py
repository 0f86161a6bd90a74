"""`qprompt inspect`: nearest vocabulary tokens, norms and importance of each virtual token, on the tiny model."""

import pytest
import torch

from qprompt.config import load_recipe, override
from qprompt.data import Encoder, collate
from qprompt.forward import FixedPrefix, base_of, cache_kwargs, hidden_states, masked_virtual_tokens, real_positions
from qprompt.methods import add_soft_prompt
from qprompt.models import load_model

N = 6  # virtual tokens
ROWS = [{"text": "short", "label": "positive"},
        {"text": "a much longer review that drags on and on without end", "label": "negative"}]


def _model(tiny_model_dir, method, **extra):
    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="none", method__name=method,
                      method__virtual_tokens=N, **extra)
    base, tok, info = load_model(str(tiny_model_dir), "none")
    model = add_soft_prompt(base, recipe, info.path)
    model.eval()
    return model, tok, recipe


def _without_slot(model, input_ids, attention_mask, slot):
    """The reference for a dropped virtual token: the sequence with that token cut out, the rest at their positions."""
    decoder = base_of(model).get_decoder()
    keep = [i for i in range(N) if i != slot]
    batch = input_ids.shape[0]
    positions = real_positions(attention_mask, N)
    mask = torch.cat([attention_mask.new_ones((batch, N - 1)), attention_mask], dim=1)
    embeds = base_of(model).get_input_embeddings()(input_ids)
    prompt = model.get_prompt(batch_size=batch)
    if isinstance(prompt, torch.Tensor):  # embeddings in front
        embeds = torch.cat([prompt[:, keep], embeds], dim=1)
        positions = torch.cat([torch.tensor(keep).expand(batch, -1), positions], dim=1)
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, N - 1:]
    prefix = [(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in prompt.layers]
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                  **cache_kwargs(decoder, FixedPrefix(ddp_cache_data=prefix)))
    return out.last_hidden_state


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning"])
def test_masking_a_virtual_token_drops_it_and_masking_none_changes_nothing(tiny_model_dir, method):
    model, tok, recipe = _model(tiny_model_dir, method, method__init="vocab")
    if method == "p-tuning":  # a fresh encoder's output is near zero: shake it so that each token matters
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    batch = collate([Encoder(recipe, tok, N).encode(r) for r in ROWS], tok.pad_token_id, pad_left=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        plain = hidden_states(model, ids, mask)
        with masked_virtual_tokens(model, []):
            assert torch.equal(hidden_states(model, ids, mask), plain)
        for slot in (0, 3):  # 0: the first virtual token, which sees nothing but itself
            with masked_virtual_tokens(model, [slot]):
                dropped = hidden_states(model, ids, mask)
            real = mask.bool()
            assert torch.isfinite(dropped[real]).all()
            assert not torch.allclose(dropped[real], plain[real], atol=1e-4)
            assert torch.allclose(dropped[real], _without_slot(model, ids, mask, slot)[real], atol=1e-5)
        assert torch.equal(hidden_states(model, ids, mask), plain)  # the block leaves nothing behind
