"""What a benchmark ran on: the CPU (with the flags that change speed or code paths) and package versions.

Every bench script stores `describe()` in its JSON, so a number can always be traced to its machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

# Flags that pick different kernels in torch, bitsandbytes or onnxruntime.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "onnxruntime", "onnxruntime-gpu",
            "onnxruntime-genai", "onnx", "onnxscript", "numpy", "tokenizers")


def cpu() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux: the model name from platform is all there is
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}


def describe() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu(), "python": platform.python_version(), "packages": versions}


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=1))
