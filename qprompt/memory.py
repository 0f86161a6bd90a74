"""Training memory savers: each keeps the same results and trades a little compute for less memory.

Gradient checkpointing recomputes each layer in the backward pass; the lean gated MLP and grouped-query
SDPA drop activations autograd would keep but can get back cheaply; on glibc, freed activations go
back to the OS instead of staying resident. PeakMemory measures what a block of training took.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading

import torch

from .forward import base_of


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant: the base stays frozen)."""
    base = base_of(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers drops a layer's cache under checkpointing, since a layer that writes it would write twice.
    # qprompt's forward passes only a FixedPrefix, which is read-only: tell the layers to keep it.
    for layer in base.get_decoder().layers:
        layer._can_checkpoint_with_cache = True


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up that keeps only gate and up for the backward pass.

    Autograd would also keep act(gate), a third of a gated MLP's saved activations; recomputing it
    in the backward pass is one elementwise op per layer.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if isinstance(ctx.act, torch.nn.SiLU):  # closed form: silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
            s = torch.sigmoid(gate)
            activated = gate * s
            grad_gate = grad * up * (s * (1 + gate * (1 - s)))
        else:
            with torch.enable_grad():
                g = gate.detach().requires_grad_()
                activated = ctx.act(g)
            (grad_gate,) = torch.autograd.grad(activated, g, grad * up)
            activated = activated.detach()
        return grad_gate, grad * activated, None


def _lean_gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_GatedActivation.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def lean_gated_mlp(model) -> int:
    """Make the base's gated MLPs (down(act(gate(x)) * up(x)): Llama, Mistral, Qwen, Gemma...) keep
    two tensors per layer for the backward pass instead of three. Same outputs and gradients; returns
    how many MLPs were changed (0 when the architecture's MLP has another form)."""
    base = base_of(model)
    mlps = [m for m in base.modules()
            if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not mlps:
        return 0
    # Only where the stock forward is exactly the gated form: check it on the first MLP. The input needs
    # grad, as in training: a no-grad eval-mode pass would let bitsandbytes repack a 4-bit layer for
    # inference on some CPUs (see keep_4bit_layers_trainable).
    first = mlps[0]
    width = first.gate_proj.in_features
    embeddings = base.get_input_embeddings().weight  # the MLPs see hidden states of this dtype
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    x = x.to(first.gate_proj.weight.device, embeddings.dtype).requires_grad_()
    with torch.enable_grad():
        stock, lean = first(x).detach(), _lean_gated_forward(first, x).detach()
    if not torch.allclose(stock, lean, rtol=1e-3, atol=1e-4):
        return 0
    for m in mlps:
        m.forward = _lean_gated_forward.__get__(m)
    return len(mlps)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch, read at every attention call


@contextlib.contextmanager
def grouped_query_sdpa():
    """Inside: SDPA attends with the key/value heads as they are (enable_gqa) instead of repeating
    them to every query head first. transformers does so only without a mask, because CUDA's fused
    kernels then fall back to the slow one; on CPU it keeps the backward pass from saving the repeated
    keys and values (8% of SmolLM2's saved activations) at the same speed and with the same result."""
    previous = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_GQA, None)
        else:
            os.environ[_FORCE_GQA] = previous


def glibc():
    """The C library when it is glibc (its malloc has the knobs below), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory_to_the_os() -> None:
    """On glibc, serve allocations over 128 KiB with mmap, so a freed activation goes back to the OS at once.

    By default glibc keeps freed heap memory for reuse: each step's activations (GBs at batch 16) then
    leave the resident size at its high-water mark plus fragmentation. Measured on SmolLM2-135M nf4,
    batch 16: resident size after a forward pass 4.8 GiB by default, 3.8 GiB with this (2.7 GiB of it
    the activations autograd keeps), and back to 1.0 GiB after the backward instead of staying at 4.8.
    The price is fresh pages (faulted in and zeroed) every step: ~30% fewer tokens/s there.
    """
    libc = glibc()
    if libc is not None:  # not glibc: nothing to tune
        libc.mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


@contextlib.contextmanager
def training_settings(model, lean_memory: bool = False):
    """The memory settings every qprompt training loop runs under (the soft prompt trainer and the fine-tuning
    baselines alike, so peak memory compares methods, not settings): the lean gated MLP; on CPU, SDPA on grouped
    key/value heads and, with `lean_memory`, freed activations handed straight back to the OS. Yields the function
    to call after each optimizer step: on glibc it trims the heap, whose free pages would otherwise stay resident
    while batches of other lengths carve them up, so the resident size creeps above one step's needs (SmolLM2-135M
    nf4, batch 16, 20 steps: peak RSS 4.97 GiB without the trim, 4.42 with it)."""
    lean_gated_mlp(model)
    libc = glibc() if model.device.type == "cpu" else None
    after_step = (lambda: libc.malloc_trim(0)) if libc is not None else (lambda: None)
    if model.device.type != "cpu":
        yield after_step
        return
    if lean_memory:
        return_freed_memory_to_the_os()
    with grouped_query_sdpa():
        yield after_step


class PeakMemory:
    """The highest memory use while the block runs: CUDA's allocator peak on a GPU, else the process's resident
    size sampled every 20 ms (the process-lifetime peak from getrusage would include earlier work)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        else:  # no /proc: the process-lifetime peak is the best there is
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
