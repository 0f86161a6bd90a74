"""The deploy side: what runs an export on a box with no torch.

    manifest.py  qprompt-export.json as typed, versioned dataclasses
    runtime.py   the ONNX Runtime session, KV cache, scoring and the one decoding loop (`qprompt run/eval`)
    serve.py     `qprompt serve`: the HTTP endpoint, with concurrent requests batched
    genai.py     genai_config.json, so onnxruntime-genai runs an export folder unchanged

Its modules import only the standard library, the plain install's packages (onnxruntime, numpy, tokenizers,
starlette, uvicorn, ...) and, of qprompt, this package and the torch-free helpers (errors, templates,
metrics, owned): tests/test_layout.py keeps that boundary.
"""
