"""qprompt: train soft prompts on quantized LLMs and ship them inside an ONNX graph."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs at import, on AVX512-BF16 CPUs, that its hub kernel for 4-bit CPU *inference* could not
# be loaded (`pip install kernels`). qprompt switches that inference path off (models.keep_4bit_layers_trainable:
# it passes no gradient), so the advice does not apply; only that message is dropped.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))

# The method registry first, so the built-in methods register in its order (the CLI's) even when a method's own
# module is the first one imported.
from . import methods as _methods  # noqa: E402, F401
