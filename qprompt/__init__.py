"""qprompt: train soft prompts on quantized LLMs and ship them inside an ONNX graph."""

__version__ = "0.1.0"
