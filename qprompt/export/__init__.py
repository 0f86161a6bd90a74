"""Export: a trained soft prompt merged into an ONNX graph, checked against PyTorch, ready for the edge.

    build.py     `export()`: the steps, top to bottom (load, make the graph, check it, write the folder)
    prefix.py    the prompt as constants: per layer, the virtual tokens' keys and values
    fused.py     the fused graph: onnxruntime-genai's model builder + the prompt inside its KV cache
    written.py   the written-out graph: torch's exporter, for families the builder does not know
    quantize.py  int8-dynamic, nf4/fp4 (and the written-out graph's int8/int4) after export
    parity.py    the checks against PyTorch
    tasks.py     several tasks in one graph; adding and removing one in place
    folder.py    where an export may go, and moving a finished one into place
    lora.py      a LoRA adapter merged into its base, exported the same way (the fine-tuning baseline's deploy)
"""

from .build import GRAPHS, export
from .folder import install_export
from .parity import PARITY_ABS, PARITY_REL, PARITY_REL_FUSED, parity
from .prefix import constant_prefix
from .quantize import quantize_graph
from .tasks import add_task, remove_task

__all__ = ["GRAPHS", "PARITY_ABS", "PARITY_REL", "PARITY_REL_FUSED", "add_task", "constant_prefix", "export",
           "install_export", "parity", "quantize_graph", "remove_task"]
