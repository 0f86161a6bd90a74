"""The int4 base: the very 4-bit weights an int4 ONNX graph holds, for training a prompt against them.

ONNX Runtime's int4 graphs (MatMulNBits, and onnxruntime-genai's model builder, which qprompt's int4
export runs) quantize each weight matrix in blocks of `block_size` inputs per output, to 16 levels and one
float scale per block (plus a zero point when asymmetric). A prompt trained on another base (fp32, or
bitsandbytes' nf4) meets weights it never saw in that graph, and nothing compensates the error: on
SmolLM2-135M an nf4-trained sentiment prompt lost 11 points there. `--quant int4` trains on the graph's
own weights instead: this module quantizes every linear layer with ONNX Runtime's own quantizer (the C++
kernel the builder calls), so the codes and scales are the graph's, bit for bit, and the prompt learns
to compensate what they lose (soft prompts recover compressed models: Xu et al., ICML 2024).

Body layers keep only their packed codes and scales (half a byte per weight plus a scale per block) and
dequantize on the fly, in the forward and again in the backward pass, so a 4-bit base also trains on a
small GPU. A tied input embedding is the LM head's matrix, quantized the same way (the builder shares
it between the two); it is held dequantized, as a float parameter, because PEFT looks the embedding up
among the model's parameters. Quantizing float weights that already lie on the int4 grid returns the
same codes and scales (symmetric blocks: exactly; asymmetric: codes exactly, scales to the last bit),
so the export can hand the builder the dequantized weights and get this graph back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .errors import QPromptError


@dataclass(frozen=True)
class Int4Scheme:
    """How weights are quantized to 4 bits (the graph and the training base share it)."""

    block_size: int = 32  # inputs per block: 16, 32, 64, 128 or 256
    symmetric: bool = True  # levels -8..7 around zero with one scale; False adds a 4-bit zero point per block

    def __post_init__(self):
        if self.block_size not in (16, 32, 64, 128, 256):
            raise QPromptError(f"int4 block size {self.block_size} is not one ONNX Runtime supports: use 16, 32, 64, "
                               "128 or 256")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Int4Scheme:
        return cls(**{k: v for k, v in (data or {}).items() if k in ("block_size", "symmetric")})


def quantize(weight: torch.Tensor, scheme: Int4Scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Linear weight (out, in) as MatMulNBits stores it: codes (out, blocks, block/2) two per byte (low nibble
    first), scales (out, blocks) and, asymmetric only, zero points (out, ceil(blocks/2)). Computed by ONNX Runtime's
    own quantizer on the MatMul's (in, out) matrix, as the graph's exporter does."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric, bits=4)
    matrix = np.ascontiguousarray(weight.detach().float().cpu().numpy().T)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(matrix)
    return packed, scales, (None if scheme.symmetric else zero_points)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) that `quantize`'s codes stand for: (code - zero point) x scale."""
    out, blocks, half = codes.shape
    levels = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(out, blocks, 2 * half)
    if zero_points is None:
        zero = torch.full((1, 1, 1), 8, dtype=torch.uint8, device=codes.device)
    else:
        zero = torch.stack([zero_points & 0xF, zero_points >> 4], dim=-1).reshape(out, -1)[:, :blocks, None]
    weight = (levels.to(torch.float32) - zero.to(torch.float32)) * scales[..., None].to(torch.float32)
    return weight.reshape(out, blocks * 2 * half)[:, :in_features].to(dtype)


class _Int4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized from its codes in the forward pass and again in the backward pass, so autograd
    keeps the codes, never the float weight: a frozen 4-bit layer costs its codes in memory, not 4 bytes a weight."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.weight_float(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight_float(grad.dtype), None


class Int4Linear(nn.Module):
    """A frozen Linear layer on the int4 grid: packed codes and scales; the bias (if any) stays float."""

    def __init__(self, linear: nn.Linear, scheme: Int4Scheme):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scales, zero_points = quantize(linear.weight, scheme)
        device = linear.weight.device
        self.register_buffer("codes", torch.from_numpy(codes).to(device))
        self.register_buffer("scales", torch.from_numpy(scales).to(device))
        self.register_buffer("zero_points", None if zero_points is None else torch.from_numpy(zero_points).to(device))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the scales: they stay float32 (as in the graph), moved with the module.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.codes.device)
        return self

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zero_points, self.in_features, dtype)

    @property
    def weight(self) -> torch.Tensor:  # read by code that inspects a layer (dtype, device, shape)
        return self.weight_float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device)
        linear.weight.data = self.weight_float()
        if self.bias is not None:
            linear.bias.data = self.bias.data.float()
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


def _tied_head(model) -> nn.Module | None:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head if head is not None and embed is not None and head.weight is embed.weight else None


def quantize_model(model, scheme: Int4Scheme) -> int:
    """Put `model` (float, frozen) on the int4 grid in place, as the int4 graph holds it; returns how many layers.

    Every nn.Linear becomes an Int4Linear (the builder quantizes every MatMul, the LM head included). A tied
    embedding takes its dequantized values in place (the graph reads it through the LM head's codes), and the
    LM head stays tied to it, so the two remain one matrix, as in the graph."""
    tied = _tied_head(model)
    count = 0
    if tied is not None:
        codes, scales, zero_points = quantize(tied.weight, scheme)
        as_torch = [torch.from_numpy(a) for a in (codes, scales)]
        zp = None if zero_points is None else torch.from_numpy(zero_points)
        tied.weight.data = dequantize(*as_torch, zp, tied.weight.shape[1]).to(tied.weight.device, tied.weight.dtype)
        count += 1
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not tied:
                setattr(module, child_name, Int4Linear(child, scheme))
                count += 1
    if not count:
        raise QPromptError(f"{type(model).__name__} has no linear layers to quantize to int4; use --quant none")
    return count


def dequantize_model(model) -> int:
    """Replace every Int4Linear of `model` with a float nn.Linear holding the same (dequantized) weights, in place:
    what an export or `save_pretrained` needs. Returns how many layers changed."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Int4Linear):
                setattr(module, child_name, child.to_linear())
                count += 1
    return count
