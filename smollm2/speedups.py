"""What only makes CPU training faster, kept out of model.py (the model a reader and the Space
need). Each is a measured gain; docs/performance.md has the figures.

- the GEMM route: fp32 training products through oneDNN on AMD CPUs, where MKL is slower.
- CausalAttention: compiled bf16 CPU training's attention backward as fusable tensor operations.
- LowPrecisionWeights: a bf16 copy of the weights for eager CPU bf16 training, instead of casts.
- keep_freed_memory: glibc keeps what a step frees, instead of faulting the pages in again.
"""
import ctypes
import math
import platform

import torch

from model import Attention, Linear
from smollm2.devices import cpu_info


def autocast_dtype(device_type):
    """The dtype autocast casts to on device_type, None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


# ----------------------------------------------------------------------------- the GEMM route
# MKL picks its kernels by CPU vendor and on AMD CPUs with AVX-512 runs well below the speed that
# oneDNN (shipped in torch, picking kernels by instruction set) reaches on the same cores; on Intel
# CPUs MKL is the faster one. So the route follows the vendor, not the architecture: a fixed rule,
# not a timing, so a run and its resume agree. Same fp32 arithmetic, another summation order (within
# 1e-6 relative). Inference keeps MKL, so logits stay bit-identical to transformers'. Set
# speedups.ONEDNN to compare (the benchmark does). Figures: docs/performance.md.
def onednn_route(vendor, machine, mkldnn_available):
    """True where fp32 training products should go through oneDNN: x86 CPUs by AMD (MKL's dispatch
    slows non-Intel CPUs); MKL on Intel's and on every other CPU."""
    return mkldnn_available and machine.lower() in ("x86_64", "amd64") and vendor == "AuthenticAMD"


ONEDNN = onednn_route(cpu_info()[1], platform.machine(), torch.backends.mkldnn.is_available())


def onednn_ok(*tensors):
    """True where fp32 CPU products of these tensors may go through oneDNN (not under autocast)."""
    return (ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def matmul_nt(a, b):
    """a @ b.T for a (M, K) and b (N, K) -> (M, N): oneDNN's fp32 inner product where onednn_ok."""
    # a made contiguous out here, where torch.compile sees it: the weight gradient's transposed
    # g.t() is then Inductor's tiled transpose (fused with SiLU's backward for gate/up), not
    # aten's copy_ inside the op (a faster compiled step: docs/performance.md)
    return onednn_matmul_nt(a.contiguous(), b) if onednn_ok(a, b) else a @ b.t()


# A custom op, so that torch.compile calls it as it is (Inductor cannot lower the mkldnn op itself).
@torch.library.custom_op("smollm2::onednn_matmul_nt", mutates_args=())
def onednn_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # a contiguous: matmul_nt


@onednn_matmul_nt.register_fake
def _(a, b):
    return a.new_empty(a.size(0), b.size(0))


class OneDNNLinear(torch.autograd.Function):
    """x @ weight.T and its two gradients, each product through matmul_nt, as F.linear computes them."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return matmul_nt(x.reshape(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.size(-1))  # (M, N)
        grad_x = matmul_nt(g, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None  # (M, K)
        grad_w = matmul_nt(g.t(), x.reshape(-1, x.size(-1)).t()) if ctx.needs_input_grad[1] else None  # (N, K)
        return grad_x, grad_w


class RoutedLinear(Linear):
    """model.Linear whose fp32 training products go through OneDNNLinear where ONEDNN; inference
    and autocast keep F.linear, so logits stay bit-identical to transformers'."""

    def forward(self, x):
        if torch.is_grad_enabled() and self.weight.requires_grad and onednn_ok(x, self.weight):
            return OneDNNLinear.apply(x, self.weight)
        return super().forward(x)


def route(model):
    """Give model's Linear and Attention modules the forward paths above (the same modules and
    weights, one more path each): what ChunkedLoss trains."""
    routes = {Linear: RoutedLinear, Attention: RoutedAttention}
    for module in model.modules():
        if type(module) in routes:
            module.__class__ = routes[type(module)]


# ----------------------------------------------------------------------------- attention
# torch's CPU flash-attention backward takes a fifth of a compiled bf16 training step of the 135M
# model for little work. Written as five batched products and elementwise steps that Inductor fuses,
# it takes half the time. The scores are recomputed in fp32 from bf16 q and k; the gradients come out
# no further from fp32 than flash's own (a test). Only where Inductor compiles it: eager, the same
# steps are unfused and slower than flash's, and so is fp32 (docs/performance.md).
class RoutedAttention(Attention):
    """model.Attention whose causal attention, in a compiled bf16 CPU training step, is CausalAttention."""

    def attend(self, q, k, v, mask):
        dtype = autocast_dtype("cpu") or q.dtype
        if (mask is None and q.size(2) > 1 and q.device.type == "cpu" and dtype == torch.bfloat16
                and torch.is_grad_enabled() and torch.compiler.is_compiling()):
            with torch.autocast("cpu", enabled=False):
                return CausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype))  # as autocast casts SDPA's
        return super().attend(q, k, v, mask)


class CausalAttention(torch.autograd.Function):
    """Causal SDPA of q (B, nh, T, hs) over k, v (B, nkv, T, hs), GQA (nh a multiple of nkv): torch's
    CPU flash-attention forward, which also gives each row's log-sum-exp, and the backward as plain
    tensor operations (above: why)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, nh, T, hs = q.shape
        nkv = k.size(1)
        # the query heads that read one K/V head, stacked as rows: (B*nkv, group*T, hs), head-major
        # (query head h reads K/V head h // group), so each product also sums the group's gradients
        Q, O, dO = (t.reshape(B * nkv, nh // nkv * T, hs) for t in (q, out, grad_out))
        K, V = k.reshape(B * nkv, T, hs), v.reshape(B * nkv, T, hs)
        pos = torch.arange(T, device=q.device)
        future = (pos[None, :] > pos[:, None]).repeat(nh // nkv, 1)  # (group*T, T): keys after the query
        scale = 1 / math.sqrt(hs)
        scores = torch.bmm(Q.float(), K.float().transpose(1, 2))  # fp32: the exponent needs its bits
        P = torch.where(future, 0.0, (scores * scale - lse.reshape(B * nkv, -1, 1)).exp())  # softmax
        dP = torch.bmm(dO, V.transpose(1, 2)).float()
        D = (dO.float() * O.float()).sum(-1, keepdim=True)  # = rowsum(P * dP)
        dS = (P * (dP - D) * scale).to(q.dtype)  # d loss / d scores, softmax's backward
        dQ, dK = torch.bmm(dS, K), torch.bmm(dS.transpose(1, 2), Q)
        dV = torch.bmm(P.to(q.dtype).transpose(1, 2), dO)
        return dQ.view(q.shape), dK.view(k.shape), dV.view(v.shape)


# ----------------------------------------------------------------------------- bf16 weight copy
# Under bf16 autocast every product casts its fp32 weight (and its fp32 input) to bf16 on the fly,
# forward and backward: on CPU those casts were a quarter of a 135M training step. Here the model's
# fp32 weights stay the masters (AdamW updates them, checkpoints save them) and a bf16 copy, refreshed
# once per optimizer step, runs forward and backward with torch.func.functional_call, no autocast:
# activations and gradients in bf16, as in a bf16 model, the gradients added into the masters' fp32
# .grad after each backward. The copy is a function of the masters, so a resumed run rebuilds it bit
# for bit.
def use_weight_copy(device_type, dtype, compiled, gradient_checkpointing, world=1):
    """Whether training steps run on LowPrecisionWeights: bf16 on CPU, one process, eager. Compiled,
    Inductor fuses autocast's casts into its kernels, and autocast was as fast; under gradient
    checkpointing the recomputation runs after the copy has been swapped out again; DDP wraps the
    module, not a functional call."""
    return (device_type == "cpu" and dtype == "bf16" and world == 1 and not compiled
            and not gradient_checkpointing)


class LowPrecisionWeights:
    """Calls `model` with a `dtype` copy of its parameters; the fp32 parameters stay the masters."""

    def __init__(self, model, dtype=torch.bfloat16):
        self.model = model
        self.names, self.masters = zip(*model.named_parameters())  # the tied embedding once
        self.low = [p.detach().to(dtype).requires_grad_(p.requires_grad) for p in self.masters]
        self.params = dict(zip(self.names, self.low))

    def __call__(self, *args, **kwargs):
        # tie_weights (the default): lm_head.weight is the same bf16 tensor as the embedding
        return torch.func.functional_call(self.model, self.params, args, kwargs)

    @torch.no_grad()
    def accumulate_grads(self):
        """Add the copy's gradients into the masters' fp32 .grad (summing micro-batches in fp32)."""
        for master, low in zip(self.masters, self.low):
            if low.grad is None:
                continue
            if master.grad is None:
                master.grad = low.grad.to(master.dtype)
            else:
                master.grad.add_(low.grad)
            low.grad = None

    @torch.no_grad()
    def refresh(self):
        """Copy the masters into the bf16 copy: after every optimizer step."""
        torch._foreach_copy_(self.low, list(self.masters))


def keep_freed_memory():
    """Have glibc's malloc keep what a training step frees, for the next step to reuse. By default it
    hands blocks over 32 MB and a free heap top back to the kernel, so every step faults the same
    pages in again (hundreds of thousands of page faults a step for the 135M model on CPU, a step a
    third slower). Returns False (and changes nothing) where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))  # no mmap; trim past 2 GB
