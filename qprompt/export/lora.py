"""A LoRA adapter merged into its base and exported as that base: the same graph kinds, quantizations and parity
check as a soft prompt's export, so the two deploy side by side (`qprompt job --baselines lora` then
`qprompt export RUN/baselines/lora --output DIR`).

The adapter is merged into the weights it trained against: for a QLoRA adapter (nf4/fp4/int8 base), the base's
quantized values dequantized to float32, which is exactly what its forward pass computed with. The merged model is
a plain model of the base's family, so the export makes its graph like a bare base's and checks it against the
merged model in PyTorch.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from ..deploy.manifest import ExportManifest
from ..errors import QPromptError

LORA_RECORD = "qprompt-lora.json"  # written beside the adapter by the job: its recipe and the base it trained on
RECORD_FORMAT = "qprompt-lora"


def is_lora(folder: str | Path) -> bool:
    """Whether `folder` holds a PEFT LoRA adapter."""
    config = Path(folder) / "adapter_config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("peft_type") == "LORA"
    except (ValueError, AttributeError):
        return False


def write_record(folder: Path, recipe, base_quant: str, base: dict) -> None:
    """What `export_lora` needs besides the adapter: the task (template, labels) and the base's quantization."""
    (folder / LORA_RECORD).write_text(json.dumps({"format": RECORD_FORMAT, "recipe": recipe.to_dict(),
                                                  "base_quant": base_quant, "base": base}, indent=1) + "\n")


def export_lora(adapter: str | Path, output: str | Path, quantize: str = "none", overwrite: bool = False,
                parity_tokens: int = 8, **options) -> ExportManifest:
    """Merge the LoRA adapter in `adapter` into its base and export that model to `output` (see `export`)."""
    from ..artifact import recipe_of
    from ..deploy.runtime import read_json_object
    from .build import export
    from .folder import check_export_output

    adapter, output = Path(adapter), Path(output)
    record_path = adapter / LORA_RECORD
    if not record_path.is_file():
        raise QPromptError(f"{adapter} holds a LoRA adapter without {LORA_RECORD} (the task it was trained for); "
                           "export one that `qprompt job --baselines lora` trained")
    record = read_json_object(record_path, RECORD_FORMAT, ("recipe", "base_quant", "base.name"),
                              "train the LoRA baseline again with `qprompt job --baselines lora`")
    recipe = recipe_of(record)
    check_export_output(output, adapter, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.merged-{uuid.uuid4().hex[:12]}"
    try:
        merged = merge(adapter, recipe.model, record["base_quant"], work)
        data = export(None, output, quantize, overwrite=overwrite, parity_tokens=parity_tokens,
                      base_model=str(merged), recipe=recipe, names=[adapter.name], **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The export's base is the merged model; its name says what it is made of (not the removed work folder).
    data.base = {**data.base, "name": f"{record['base']['name']} + LoRA {adapter.name}"}
    for task in data.tasks:
        task.source = {**task.source, "artifact": adapter.name, "method": "lora", "base": data.base}
    data.write(output)
    return data


def merge(adapter: Path, base: str, base_quant: str, folder: Path) -> Path:
    """The base (its quantized values as float32 for a QLoRA adapter) with the adapter merged in, saved to
    `folder` with the tokenizer."""
    from peft import PeftModel

    from ..models import load_model

    model, tokenizer, _ = load_model(base, base_quant, "float32", "cpu")
    if base_quant != "none":
        model.dequantize()  # each quantized Linear becomes a float32 one holding the same values
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
