"""Quantizing a float32 graph after export: what the model builder does not make itself.

int8-dynamic (int8 weights and activations per call, onnxruntime's quantize_dynamic), nf4/fp4
(bitsandbytes' own 4-bit formats, MatMulBnb4, for a prompt trained on such a base), and, for the
written-out graph, int8/int4 weight-only blocks (MatMulNBits; the fused graph gets these from the builder).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..deploy.runtime import QUANTIZATIONS
from ..errors import QPromptError
from ..int4 import Int4Scheme

BNB4 = ("nf4", "fp4")  # bitsandbytes 4-bit formats, reproduced exactly from the quantized base


def quantize_graph(source: Path, target: Path, kind: str, scheme: Int4Scheme | None = None,
                   accuracy_level: int = 0) -> None:
    """Write `source` quantized as `kind` (see QUANTIZATIONS) to `target`."""
    import onnx

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's quantizers log generic advice on the root logger
    try:
        _quantize(onnx, source, target, kind, scheme or Int4Scheme(), accuracy_level)
    finally:
        root.setLevel(level)


def _quantize(onnx, source: Path, target: Path, kind: str, scheme: Int4Scheme, accuracy_level: int) -> None:
    model = onnx.load(str(source))
    if kind == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Unsigned weights (U8U8): with signed weights, AVX2 CPUs without VNNI saturate in the int8 dot
        # product; on SmolLM2 that took next-token agreement with fp32 from 96% to 0%.
        # The prefix's keys/values (4-D constants read by attention) stay float: they are activations, not weights.
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        prefix_reads = [n.name for n in model.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1], 2) != 2]
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8, per_channel=True,
                         nodes_to_exclude=prefix_reads)
        return
    if kind in ("int8", "int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # Weight-only: activations stay float, which is what keeps int8 within a point of fp32 (the
        # dynamic form, which quantizes activations too, agreed with fp32 on 92.9% of SmolLM2's labels).
        quantizer = MatMulNBitsQuantizer(model, bits=int(kind[-1]), block_size=scheme.block_size,
                                         is_symmetric=scheme.symmetric, accuracy_level=accuracy_level)
    elif kind in BNB4:
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        # bitsandbytes leaves the LM head unquantized; so do we. Blocks of 64 along the input dimension are
        # bitsandbytes' blocks too, so re-quantizing its dequantized weights gives back the same codes.
        head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
        quant_type = MatMulBnb4Quantizer.NF4 if kind == "nf4" else MatMulBnb4Quantizer.FP4
        quantizer = MatMulBnb4Quantizer(model, quant_type, 64, nodes_to_exclude=head)
    else:
        raise QPromptError(f"unknown quantization {kind!r}: use one of {', '.join(QUANTIZATIONS)}")
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
