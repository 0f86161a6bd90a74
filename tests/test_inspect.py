"""`qprompt inspect`: nearest vocabulary tokens, norms and importance of each virtual token, on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from qprompt.artifact import MANIFEST, load_artifact, manifest, write_json
from qprompt.config import load_recipe, override
from qprompt.data import Encoder, collate
from qprompt.evaluate import evaluate
from qprompt.forward import FixedPrefix, base_of, cache_kwargs, hidden_states, masked_virtual_tokens, real_positions
from qprompt.inspect import importance
from qprompt.methods import add_soft_prompt
from qprompt.models import load_model
from tests.kit import assert_one_error, cli, data_rows, write_jsonl

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


def test_importance_finds_the_virtual_token_that_decides_the_label(tiny_model_dir):
    """A prefix slot made to write one label's direction into the last layer: dropping it costs all the accuracy,
    dropping any other slot costs nothing (the tiny random model alone predicts one label for every row)."""
    model, tok, recipe = _model(tiny_model_dir, "prefix-tuning", labels={"positive": "film", "negative": "movie"})
    rows = data_rows("rotten_tomatoes", "validation", 24)
    alone = evaluate(model, tok, recipe, rows, "rows")["predictions"]
    other = "negative" if alone[0] == "positive" else "positive"
    rows = [r for r in rows if r["label"] == other]  # rows the prompt alone can get right
    base = model.get_base_model()
    cfg = base.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // kv_heads
    word = {label: tok(" " + w, add_special_tokens=False)["input_ids"] for label, w in recipe.labels.items()}
    assert all(len(ids) == 1 for ids in word.values())  # one token per label: one pass scores them
    table = base.get_input_embeddings().weight
    direction = table[word[other][0]] - table[word[alone[0]][0]]  # the tied LM head reads the same rows
    # The last layer's o_proj sees each key/value head's value once per query head of its group: find the
    # value that o_proj turns into `direction`, and make it large enough to outweigh everything else.
    o_proj = base.model.layers[-1].self_attn.o_proj.weight
    per_kv_head = torch.cat([sum(o_proj[:, (h * groups + g) * head_dim:(h * groups + g + 1) * head_dim]
                                 for g in range(groups)) for h in range(kv_heads)], dim=1)
    value = torch.linalg.pinv(per_kv_head) @ direction
    with torch.no_grad():  # PEFT's row of a virtual token: (layers * 2, kv heads, head dim), key then value
        prompt = model.prompt_encoder["default"].embedding.weight.view(N, 2 * layers, kv_heads, head_dim)
        prompt[2, 2 * layers - 1] = (value / value.norm() * 100).view(kv_heads, head_dim)
    result = importance(model, tok, recipe, rows)
    assert result["full"] == 1.0 and result["rows"] == len(rows) > 0
    assert result["importance"] == [0.0, 0.0, -1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------- the command

def _untrained_artifact(folder: Path, tiny_model_dir, method: str, **extra) -> Path:
    """An artifact holding a freshly initialised prompt, written as training writes one (no training)."""
    recipe = override(load_recipe("sentiment"), model=str(tiny_model_dir), quant="none", method__name=method,
                      method__virtual_tokens=N, **extra)
    base, _, info = load_model(recipe.model, recipe.quant)
    add_soft_prompt(base, recipe, info.path).save_pretrained(folder)
    write_json(folder / MANIFEST, manifest(info, recipe, {}, {}, []))
    return folder


INIT_TEXT = "a warm and funny film"


def test_a_prompt_started_from_text_shows_that_text(tiny_model_dir, tmp_path):
    art = _untrained_artifact(tmp_path / "art", tiny_model_dir, "prompt-tuning", method__init="text",
                              method__init_text=INIT_TEXT)
    report = tmp_path / "r.json"
    result = cli("inspect", art, "--no-importance", "--top", 2, "--json", report)
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(INIT_TEXT)["input_ids"]  # PEFT tokenizes the text so and repeats it to fill the prompt
    expected = (ids * N)[:N]
    tokens = json.loads(report.read_text())["tokens"]
    assert [t["nearest"][0]["id"] for t in tokens] == expected
    assert [t["nearest"][0]["token"] for t in tokens] == [tok.decode([i]) for i in expected]
    assert all(t["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5) for t in tokens)
    assert all(len(t["nearest"]) == 2 and t["nearest"][1]["cosine"] < 0.99 for t in tokens)
    assert all(t["importance"] is None for t in tokens)
    lines = result.stdout.splitlines()
    assert lines[0] == f"prompt-tuning: {N} virtual tokens"
    assert f"{tok.decode([expected[1]])!r} 1.00" in lines[3 + 1]  # one row per token, after the headers


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "art"
    result = cli("train", "--model", tiny_model_dir, "--recipe", "sentiment", "--data", sentiment_files["train"],
                 "--eval-data", sentiment_files["validation"], "--output", out, "--virtual-tokens", 4,
                 "--max-steps", 2, "--batch-size", 8, "--eval-every", 0, "--lr", 0.1, "--quant", "none")
    assert result.exit_code == 0, result.output
    return out


def test_importance_is_measured_against_the_eval_metric(trained, sentiment_files, tmp_path):
    report, picture, scored = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "eval.json"
    result = cli("inspect", trained, "--data", sentiment_files["validation"], "--rows", 16, "--json", report,
                 "--png", picture)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert len(data["importance"]["dropped"]) == len(data["tokens"]) == 4 and data["importance"]["rows"] == 16
    assert [t["importance"] for t in data["tokens"]] == [d - data["importance"]["full"]
                                                         for d in data["importance"]["dropped"]]
    assert len(result.stdout.splitlines()) == 4 + 4  # the headers, then one line per virtual token
    scoring = cli("eval", trained, "--data", sentiment_files["validation"], "--limit", 16, "--json", scored)
    assert scoring.exit_code == 0, scoring.output
    assert data["importance"]["full"] == json.loads(scored.read_text())["accuracy"]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefix_tuning_gives_the_layer_by_token_norm_grid(tiny_model_dir, sentiment_files, tmp_path):
    art = _untrained_artifact(tmp_path / "art", tiny_model_dir, "prefix-tuning")
    report, picture = tmp_path / "r.json", tmp_path / "r.png"
    result = cli("inspect", art, "--data", sentiment_files["validation"], "--rows", 8, "--json", report,
                 "--png", picture)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    prefix = data["prefix"]
    assert data["embedding"] is None and prefix["layers"] == 2
    assert [len(row) for row in prefix["key_norms"]] == [N, N] and [len(row) for row in prefix["value_norms"]] == [N, N]
    assert len(data["importance"]["importance"]) == N
    model, *_ = load_artifact(art)
    with torch.no_grad():
        layers = model.get_prompt(batch_size=1).layers
    for got_keys, got_values, layer in zip(prefix["key_norms"], prefix["value_norms"], layers):
        # mean over the key/value heads of each head's L2 norm, per virtual token
        want_keys = [sum(layer.keys[0, h, t].norm().item() for h in range(2)) / 2 for t in range(N)]
        want_values = [sum(layer.values[0, h, t].norm().item() for h in range(2)) / 2 for t in range(N)]
        assert got_keys == pytest.approx(want_keys, rel=1e-5) and got_values == pytest.approx(want_values, rel=1e-5)
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert "key norm" in result.stdout


def test_bad_input_gives_one_line_errors(trained, tmp_path):
    assert_one_error(cli("inspect", tmp_path / "nowhere"), "does not exist")
    assert_one_error(cli("inspect", trained, "--data", tmp_path / "none.jsonl"), "does not exist")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "x", "label": "positive"}, {"text": "y", "label": "meh"}])
    assert_one_error(cli("inspect", trained, "--data", wrong), "line 2 has label 'meh'")
    assert_one_error(cli("inspect", trained, "--data", wrong, "--no-importance"), "drop --no-importance")
