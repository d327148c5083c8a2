"""What only makes the model faster, kept out of model.py (the model a reader needs): each a measured
gain (docs/performance.md), installed by one visible call where it is used (install, below: train.py,
eval.py, the Space) or by the object that needs it (LowPrecisionWeights, in training_loss.py).

- the GEMM route: fp32 training products through oneDNN on AMD CPUs, where MKL is slower.
- CompiledCausalAttention: compiled bf16 CPU training's attention backward as fusable tensor operations.
- RepeatedKVAttention: on CUDA (and MPS) K/V repeated where no kernel reads grouped heads itself.
- LowPrecisionWeights: a bf16 copy of the weights for eager CPU bf16 training, instead of casts.
- keep_freed_memory: glibc keeps what a step frees, instead of faulting the pages in again.
"""
import ctypes
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ScaledDotProductAttention


def install(model, device, dtype="fp32", compiled=False, training=False, sharded=False, keep_memory=True,
            gemm="mkl"):
    """Give model the speed-ups that pay for this work on this device (training: in dtype, compiled
    or not, sharded by FSDP or not; gemm: the fp32 product library cpu_paths chose, "mkl" or
    "onednn"); returns one line for each installed, for the start-up log. Call it before DDP or FSDP
    wrap the model (it swaps modules). keep_memory=False leaves malloc alone."""
    global ONEDNN
    device = torch.device(device)
    installed = []
    if device.type in ("cuda", "mps"):
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        swap_modules(model, ScaledDotProductAttention, lambda old: RepeatedKVAttention(capability))
        installed.append("K/V repeated for attention where no kernel reads grouped heads"
                         + (" (flash does: 16-bit, no mask, compute capability 8.0+)" if capability else ""))
    if device.type != "cpu" or not training:
        return installed
    if keep_memory and not sharded and keep_freed_memory():  # FSDP frees each gathered layer: give that back
        installed.append("glibc keeps freed memory (no page faults each step)")
    ONEDNN = dtype == "fp32" and gemm == "onednn"
    if ONEDNN:
        swap_modules(model, nn.Linear, linear_as(RoutedLinear))
        installed.append("fp32 training products through oneDNN (measured faster than MKL here)")
    if dtype == "bf16" and compiled:
        swap_modules(model, ScaledDotProductAttention, lambda old: CompiledCausalAttention())
        installed.append("attention backward as batched products Inductor fuses (compiled bf16)")
    return installed


def swap_modules(model, kind, make):
    """Replace each submodule of exactly type `kind` by make(old): a module of another kind over the
    same parameters (as torchao's module swaps). Returns how many it replaced."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child).train(child.training))
                swapped += 1
    return swapped


def linear_as(cls):
    """make() for swap_modules: an nn.Linear subclass cls holding the old layer's parameters."""
    def make(old):
        new = cls(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias  # the same Parameters: ties and optimizers hold
        return new
    return make


def autocast_dtype(device_type):
    """The dtype autocast casts to on device_type, None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


# ----------------------------------------------------------------------------- the GEMM route
# fp32 training products go through MKL (torch's own) or oneDNN (shipped in torch), whichever
# smollm2/cpu_paths.py measured faster on this CPU for this model: install(gemm="onednn") sets the
# route. Same fp32 arithmetic, another summation order (within 1e-6 relative). Inference keeps MKL, so
# logits stay bit-identical to transformers'. Figures: docs/performance.md.
ONEDNN = False  # fp32 CPU training products through oneDNN (install sets it; the benchmarks flip it)


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


class RoutedLinear(nn.Linear):
    """nn.Linear whose fp32 training products go through OneDNNLinear where ONEDNN; inference and
    autocast keep F.linear, so logits stay bit-identical to transformers'."""

    def forward(self, x):
        if torch.is_grad_enabled() and self.weight.requires_grad and onednn_ok(x, self.weight):
            return OneDNNLinear.apply(x, self.weight)
        return F.linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------- attention
# torch's CPU flash-attention backward takes a fifth of a compiled bf16 training step of the 135M
# model for little work. Written as five batched products and elementwise steps that Inductor fuses,
# it takes half the time. The scores are recomputed in fp32 from bf16 q and k; the gradients come out
# no further from fp32 than flash's own (a test). Only where Inductor compiles it: eager, the same
# steps are unfused and slower than flash's, and so is fp32 (docs/performance.md).
class CompiledCausalAttention(ScaledDotProductAttention):
    """model.py's attention, whose causal attention in a compiled bf16 CPU training step is CausalAttention."""

    def forward(self, q, k, v, mask=None):
        dtype = autocast_dtype("cpu") or q.dtype
        if (mask is None and q.size(2) > 1 and q.device.type == "cpu" and dtype == torch.bfloat16
                and torch.is_grad_enabled() and torch.compiler.is_compiling()):
            with torch.autocast("cpu", enabled=False):
                return CausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype))  # as autocast casts SDPA's
        return super().forward(q, k, v, mask)


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


# ----------------------------------------------------------------------------- attention on CUDA
def flash_reads_groups(dtype, masked, head_dim, capability):
    """Whether CUDA's SDPA reads grouped K/V heads itself (enable_gqa): only its flash kernel does
    (16-bit, no mask, head_dim a multiple of 8 up to 256, compute capability 8.0+). The
    memory-efficient kernel refuses unequal head counts, so enable_gqa elsewhere (a T4, fp32, a mask)
    falls back to the math kernel and its fp32 (B, nh, T, T) matrices kept for backward: 18 GB over
    30 layers at B=4, T=2048 in fp16, where the repeat copies of K and V take 19 MB a layer."""
    return (dtype in (torch.float16, torch.bfloat16) and not masked and head_dim % 8 == 0 and head_dim <= 256
            and capability is not None and tuple(capability) >= (8, 0))


class RepeatedKVAttention(ScaledDotProductAttention):
    """model.py's attention with K/V repeated to every query head where flash_reads_groups says no
    kernel reads grouped heads (capability None: MPS, where enable_gqa crashed in torch <= 2.6). A
    decode step's one query per head needs no repeat: the query heads of a group become that K/V
    head's rows of queries (the mask (B, 1, 1, S) reads alike for each), so the whole KV cache is not
    copied three times in every layer at every token."""

    def __init__(self, capability=None):
        super().__init__()
        self.capability = capability

    def forward(self, q, k, v, mask=None):
        B, nh, T, hs = q.shape
        groups = nh // k.size(1)
        if groups > 1 and T == 1:  # one query (decoding): a group's heads as the rows of one K/V head's
            y = super().forward(q.view(B, k.size(1), groups, hs), k, v, mask)  # queries, no copy of the cache
            return y.view(B, nh, 1, hs)
        if groups > 1 and not flash_reads_groups(q.dtype, mask is not None, hs, self.capability):
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))  # (B, nh, S, hs)
        return super().forward(q, k, v, mask)


# ----------------------------------------------------------------------------- bf16 weight copy
# Under bf16 autocast every product casts its fp32 weight (and its fp32 input) to bf16 on the fly,
# forward and backward: on CPU those casts were a quarter of a 135M training step. Here the model's
# fp32 weights stay the masters (AdamW updates them, checkpoints save them) and a bf16 copy runs
# forward and backward with torch.func.functional_call, no autocast: activations and gradients in
# bf16, as in a bf16 model. torch's own hooks keep the two in step: each copy's gradient is added into
# its master's fp32 .grad as soon as backward has accumulated it, and the optimizer's step refreshes
# the copy. The copy is a function of the masters, so a resumed run rebuilds it bit for bit.
def use_weight_copy(device_type, dtype, compiled, gradient_checkpointing, world=1):
    """Whether training steps run on LowPrecisionWeights: bf16 on CPU, one process, eager. Compiled,
    Inductor fuses autocast's casts into its kernels, and autocast was as fast; under gradient
    checkpointing the recomputation runs after the copy has been swapped out again; DDP wraps the
    module, not a functional call."""
    return (device_type == "cpu" and dtype == "bf16" and world == 1 and not compiled
            and not gradient_checkpointing)


class LowPrecisionWeights:
    """Calls `model` with a `dtype` copy of its parameters; the fp32 parameters stay the masters.
    optimizer: its steps refresh the copy (a step post-hook)."""

    def __init__(self, model, optimizer=None, dtype=torch.bfloat16):
        self.model = model
        self.names, self.masters = zip(*model.named_parameters())  # the tied embedding once
        self.low = [p.detach().to(dtype).requires_grad_(p.requires_grad) for p in self.masters]
        self.params = dict(zip(self.names, self.low))
        self.hooks = [low.register_post_accumulate_grad_hook(functools.partial(self.add_grad, master))
                      for master, low in zip(self.masters, self.low) if low.requires_grad]
        if optimizer is not None:
            self.hooks.append(optimizer.register_step_post_hook(lambda *_: self.refresh()))

    def __call__(self, *args, **kwargs):
        # tie_weights (the default): lm_head.weight is the same bf16 tensor as the embedding
        return torch.func.functional_call(self.model, self.params, args, kwargs)

    @staticmethod
    @torch.no_grad()
    def add_grad(master, low):
        """Backward has accumulated low's gradient: add it to the master's fp32 .grad (micro-batches
        sum in fp32) and free it."""
        if master.grad is None:
            master.grad = low.grad.to(master.dtype)
        else:
            master.grad.add_(low.grad)
        low.grad = None

    @torch.no_grad()
    def refresh(self):
        """Copy the masters into the bf16 copy: after every optimizer step."""
        torch._foreach_copy_(self.low, list(self.masters))

    def remove(self):
        """Unhook from the parameters and the optimizer (the copy is dropped)."""
        for hook in self.hooks:
            hook.remove()


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
