"""genai_config.json: what onnxruntime-genai (ORT GenAI) needs to run an export folder as it is.

ORT GenAI (`og.Model(folder)`) reads one JSON file beside the graph. The exported graph already has
the decoder interface ORT GenAI drives by default (input_ids, attention_mask, past_key_values.%d.key/value
-> logits, present.%d.key/value), so the config only names those tensors and gives shapes, token ids
and search defaults. The soft prompt is inside the graph: to ORT GenAI it is a plain decoder.

Torch-free: built from the export manifest and a few numbers of the base's config.
Facts about ORT GenAI below were read from its source (0.18: src/config.cpp, src/models/model.cpp,
model_type.h, position_inputs.cpp) and checked by tests/test_genai.py against the installed package.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import ExportManifest

GENAI_CONFIG = "genai_config.json"

# `model.type` values ORT GenAI builds its plain decoder-only model for, with nothing else tied to the type
# (the graph's inputs decide the rest). Left out on purpose: gpt2 and lfm2 get model classes of their own
# (another cache layout), and phi3/phimoe/phi3small re-run the whole sequence at 4097/8193 tokens to switch
# their long-context RoPE, which in our graph is fixed and starts after the virtual tokens.
PLAIN_DECODER_TYPES = frozenset({
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gemma4_text", "gptoss", "granite", "granitemoehybrid",
    "hunyuandensev1", "internlm2", "llama", "mistral", "nemotron", "olmo", "phi", "qwen2", "qwen3",
    "qwen3_5_moe_text", "qwen3_5_text", "smollm3",
})
# ORT GenAI's own name for "any decoder-only graph with the standard inputs"; any other name is refused
# when the model loads ("Unsupported model_type"). It changes nothing but telemetry's model family.
GENERIC_DECODER_TYPE = "decoder"


def genai_model_type(base_model_type: str | None) -> str:
    """The base's `config.model_type` where ORT GenAI knows it as a plain decoder, else the generic one."""
    return base_model_type if base_model_type in PLAIN_DECODER_TYPES else GENERIC_DECODER_TYPE


def genai_config(manifest: ExportManifest, base_model_type: str | None, hidden_size: int, num_attention_heads: int,
                 bos_token_id: int | None) -> dict:
    """genai_config.json for an export whose qprompt-export.json is `manifest` (its final model_file)."""
    eos = list(manifest.eos_token_ids)
    # ORT GenAI pads a batch on the right with pad_token_id and masks the trailing pads; a tokenizer without
    # a pad token gets eos, which ORT GenAI also emits for rows that have finished.
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else (eos[0] if eos else 0)
    # The virtual tokens' positions are inside the graph: ORT GenAI may use only the real-token positions left.
    context = manifest.max_positions
    decoder = {
        "filename": manifest.model_file,  # the quantized graph when --quantize was given
        # ORT GenAI shapes the empty cache of the first call as (batch, num_key_value_heads, 0, head_size).
        "head_size": manifest.head_dim,
        "num_key_value_heads": manifest.num_kv_heads,
        "num_hidden_layers": manifest.num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        # Empty provider list: CPU. A CUDA user adds {"cuda": {}} here, or og.Config.append_provider("cuda").
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        # No position_ids: the graph counts positions from attention_mask, which ORT GenAI keeps exact for
        # right-padded batches (pads 0, every new token 1), so no entry names one and ORT GenAI feeds none.
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model = {"type": genai_model_type(base_model_type), "context_length": context, "vocab_size": manifest.vocab_size,
             "pad_token_id": pad, "eos_token_id": eos, "decoder": decoder}
    if bos_token_id is not None:
        model["bos_token_id"] = bos_token_id
    search = {
        # Greedy, like qprompt's runtime by default; callers change these per request with set_search_options.
        "do_sample": False, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "num_beams": 1, "num_return_sequences": 1,
        "min_length": 0, "max_length": context, "repetition_penalty": 1.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
        # Shared buffers need a graph that writes each step into a max_length-sized past tensor in place
        # (GroupQueryAttention); ours returns past + new as a longer present, which ORT GenAI feeds back.
        "past_present_share_buffer": False,
    }
    return {"model": model, "search": search}


def fused_genai_config(builder_config: dict, manifest: ExportManifest) -> dict:
    """genai_config.json for a fused export: the one onnxruntime-genai's model builder wrote for the bare base,
    pointed at the export's graph. Its cache settings stay (`past_present_share_buffer`: one buffer of
    `max_length` per layer), which is what the graph's prompt lives in: the virtual tokens count toward
    max_length as prompt tokens would (qprompt/export/fused.py)."""
    config = json.loads(json.dumps(builder_config))  # a copy
    decoder = config["model"]["decoder"]
    decoder["filename"] = manifest.model_file
    decoder.setdefault("session_options", {}).setdefault("provider_options", [])
    search = config.setdefault("search", {})
    search.update({"do_sample": False, "top_k": 1, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True})
    return config
