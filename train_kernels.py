"""What only makes training faster or leaner, kept out of model.py (the model a reader and the
Space need): train.py, eval.py and bench.py use it. Each piece says what it measured.

- ChunkedLoss: the training loss without the (B, T, V) logits, 0.4 GB less at B=4, T=256.
- the GEMM route: fp32 training products through oneDNN on AMD CPUs, 1.7x on a 2-core Zen 5.
- LowPrecisionWeights: a bf16 copy of the weights for CPU bf16 training, 583 -> 631 tokens/s.
- CausalAttention: compiled bf16 CPU training's attention backward, 776 -> 855 tokens/s.
- deterministic_cpu_compile: compiled CPU training repeats bit for bit, so it resumes exactly.
- keep_freed_memory: glibc keeps what a step frees, a 2.7 s CPU step no longer takes 3.0-4.3 s.
"""
import contextlib
import ctypes
import math
import platform

import torch
import torch.nn as nn

from model import Attention, Linear


class ChunkedLoss(nn.Module):
    """ChunkedLoss(model)(idx, targets) -> the mean cross-entropy of model(idx, targets), computed a
    chunk of rows at a time (chunked_cross_entropy below) so the (B, T, V) fp32 logits and their
    gradient never exist. This is the module train.py trains (and DDP, torch.compile and
    LowPrecisionWeights wrap); its fp32 CPU products take the GEMM route below."""

    def __init__(self, model, chunk_rows=256):
        super().__init__()
        self.model, self.chunk_rows = model, chunk_rows
        routes = {Linear: RoutedLinear, Attention: RoutedAttention}
        for module in model.modules():
            if type(module) in routes:  # the same module and weights, one more forward path
                module.__class__ = routes[type(module)]

    def forward(self, idx, targets):
        x = self.model.hidden_states(idx)  # (B, T, C)
        return chunked_cross_entropy(x.flatten(0, 1), self.model.lm_head.weight, targets.reshape(-1),
                                     self.chunk_rows)


# ----------------------------------------------------------------------------- the GEMM route
# MKL picks its kernels by CPU vendor and on AMD CPUs with AVX-512 runs at less than half the speed
# that oneDNN (shipped in torch, picking kernels by instruction set) reaches on the same cores: on a
# 2-core Zen 5, 190-220 against 370-515 GFLOP/s for every matmul shape of a training step (on a Zen 4,
# whose AVX-512 runs on 256-bit units, 181 against 215: 187 -> 193 tokens/s). On Intel
# CPUs MKL is the faster one (2-core Sapphire Rapids: 438 against 404 GFLOP/s), so the route follows
# the vendor, not the architecture; a fixed rule, not a timing, so a run and its resume agree. Same
# fp32 arithmetic, another summation order (within 1e-6 relative). Inference keeps MKL, so logits
# stay bit-identical to transformers'. Set train_kernels.ONEDNN to compare (bench.py
# does).
def cpu_vendor(path="/proc/cpuinfo"):
    """The CPU's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "" where /proc/cpuinfo has none."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    return ""


def onednn_route(vendor, machine, mkldnn_available):
    """True where fp32 training products should go through oneDNN: x86 CPUs by AMD (MKL's dispatch
    slows non-Intel CPUs); MKL on Intel's and on every other CPU."""
    return mkldnn_available and machine.lower() in ("x86_64", "amd64") and vendor == "AuthenticAMD"


ONEDNN = onednn_route(cpu_vendor(), platform.machine(), torch.backends.mkldnn.is_available())


def onednn_ok(*tensors):
    """True where fp32 CPU products of these tensors may go through oneDNN (not under autocast)."""
    return (ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def matmul_nt(a, b):
    """a @ b.T for a (M, K) and b (N, K) -> (M, N): oneDNN's fp32 inner product where onednn_ok."""
    # a made contiguous out here, where torch.compile sees it: the weight gradient's transposed
    # g.t() is then Inductor's tiled transpose (fused with SiLU's backward for gate/up), not
    # aten's copy_ inside the op: a compiled 135M fp32 step 3-5% faster on a 2-core Zen 4
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


# ----------------------------------------------------------------------------- attention
# torch's CPU flash-attention backward took 8.7 ms a layer of a compiled bf16 training step of the
# 135M model (B=4, T=256; 2 Sapphire Rapids cores), a fifth of the step, for 0.75 GFLOP. Written as
# five batched products and elementwise steps that Inductor fuses, the backward takes ~4 ms: 776 ->
# 855 tokens/s. The scores are recomputed in fp32 from bf16 q and k; the gradients came out no
# further from fp32 than flash's own (a test). Only where Inductor compiles it: eager, the same
# elementwise steps are unfused and slower than flash's (12 against 9.6 ms), and so is fp32 (11.7
# against 9.8 ms compiled).
class RoutedAttention(Attention):
    """model.Attention whose causal attention, in a compiled bf16 CPU training step, is CausalAttention."""

    def attend(self, q, k, v, mask):
        dtype = _autocast_dtype("cpu") or q.dtype
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


def deterministic_cpu_compile():
    """Before torch.compile builds a CPU training step: Inductor's CPU kernels add into the
    embedding's gradient with atomics from every thread, so two runs of the same steps (a run and its
    resume) drift apart in the last bits within a few steps (seen at step 6 of the 135M model on 2
    threads). In torch's deterministic mode Inductor calls aten's serial index_put_ there instead:
    no slower (830-870 tokens/s either way). Process-wide, as torch's flag is."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of every new tensor


# ----------------------------------------------------------------------------- the chunked loss
def _autocast_dtype(device_type):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cross_entropy_chunks(x, weight, safe_targets, valid, chunk_rows, grad_x=None, grad_w=None, scale=None):
    """The summed loss over chunks of rows of x (N, C) against weight (V, C). Where grad_x (N, C) and
    grad_w (V, C) are given, add to them d(loss sum)/dx and /dweight, times scale (a tensor) if given.
    Products run in x's and weight's dtype; log-softmax and d loss / d logits in fp32."""
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    for s in range(0, x.size(0), chunk_rows):
        xc, tc, vc = x[s:s + chunk_rows], safe_targets[s:s + chunk_rows], valid[s:s + chunk_rows, None]
        logp = matmul_nt(xc, weight).float().log_softmax(-1)  # (n, V)
        loss -= (logp.gather(1, tc) * vc).sum()
        if grad_x is None and grad_w is None:
            continue
        g = logp.exp_().scatter_add_(1, tc, -vc.float()).mul_(vc)  # softmax - one_hot, 0 on ignored rows
        if scale is not None:
            g.mul_(scale)
        g = g.to(weight.dtype)
        if grad_x is not None:
            grad_x[s:s + chunk_rows] = matmul_nt(g, weight.t())  # (n, V) @ (V, C)
        if grad_w is not None and g.dtype == grad_w.dtype:
            grad_w.addmm_(g.t(), xc)  # (V, C)
        elif grad_w is not None:
            grad_w += g.t() @ xc  # in the products' 16-bit dtype, accumulated in the weight's fp32
    return loss


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets (-1 ignored), a chunk of rows at
    a time: the full (N, V) fp32 logits and their gradient (0.8 GB at B=4, T=256) never exist. The
    loss is a scalar, so each chunk's gradient is computed in the forward pass while its logits are
    at hand, and backward only scales it (as Liger-Kernel's fused linear cross-entropy does).

    Under autocast, x and the weight are cast once per forward (autocast itself would cast the tied
    weight twice per chunk: a .t() view escapes its cast cache) and the products run in that dtype.
    In fp16 the gradient waits for backward, where the loss scale is known: softmax - one_hot holds
    values near 1/V = 2e-5, subnormal in fp16 unless scaled as GradScaler scales every other
    gradient. So fp16 computes the logits twice, and the gradients as an unfused fp16 cross-entropy
    would (an overflow shows up as inf, a step that GradScaler skips)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        # x: (N, C), weight: (V, C), targets: (N,)
        dtype = _autocast_dtype(x.device.type)
        ctx.deferred = dtype == torch.float16
        want_x, want_w = (want and not ctx.deferred for want in ctx.needs_input_grad[:2])
        valid = targets != -1
        safe_targets = targets.clamp(min=0)[:, None]  # (N, 1); ignored rows are zeroed in the gradient
        grad_x = torch.zeros_like(x) if want_x else None
        grad_w = torch.zeros_like(weight) if want_w else None
        xm, wm = (x.to(dtype), weight.to(dtype)) if dtype else (x, weight)
        with torch.autocast(x.device.type, enabled=False) if dtype else contextlib.nullcontext():
            loss = _cross_entropy_chunks(xm, wm, safe_targets, valid, chunk_rows, grad_x, grad_w)
        ctx.count = valid.sum()
        # intermediates: kept on ctx, used once
        ctx.grads = (xm, wm, safe_targets, valid, chunk_rows, x.dtype) if ctx.deferred else (grad_x, grad_w)
        return loss / ctx.count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy: backward can run only once through this loss")
        saved, ctx.grads = ctx.grads, None
        scale = grad_loss / ctx.count
        if ctx.deferred:  # fp16: the gradient with the loss scale in it, as in any fp16 backward
            xm, wm, safe_targets, valid, chunk_rows, x_dtype = saved
            want_x, want_w = ctx.needs_input_grad[:2]
            grad_x = torch.zeros(xm.shape, dtype=x_dtype, device=xm.device) if want_x else None
            grad_w = torch.zeros(wm.shape, dtype=torch.float32, device=wm.device) if want_w else None
            _cross_entropy_chunks(xm, wm, safe_targets, valid, chunk_rows, grad_x, grad_w, scale)
            return grad_x, grad_w, None, None
        grad_x, grad_w = saved  # scaled in place: no second (V, C) tensor, 113 MB of fresh pages
        return (None if grad_x is None else grad_x.mul_(scale.to(grad_x.dtype)),
                None if grad_w is None else grad_w.mul_(scale.to(grad_w.dtype)), None, None)


def chunked_cross_entropy(x, weight, targets, chunk_rows=256):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) in chunks of rows (see above). Without
    gradients (evaluation, torch.no_grad) only the loss is computed: no gradient buffers."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, chunk_rows)
    dtype = _autocast_dtype(x.device.type)
    valid = targets != -1
    with torch.autocast(x.device.type, enabled=False) if dtype else contextlib.nullcontext():
        xm, wm = (x.to(dtype), weight.to(dtype)) if dtype else (x, weight)
        return _cross_entropy_chunks(xm, wm, targets.clamp(min=0)[:, None], valid, chunk_rows) / valid.sum()


# ----------------------------------------------------------------------------- bf16 weight copy
# Under bf16 autocast every product casts its fp32 weight (and its fp32 input) to bf16 on the fly,
# forward and backward; on a 2-core Sapphire Rapids those casts were a quarter of a 135M training
# step. Here the model's fp32 weights stay the masters (AdamW updates them, checkpoints save them)
# and a bf16 copy, refreshed once per optimizer step, runs forward and backward with
# torch.func.functional_call, no autocast: activations and gradients in bf16, as in a bf16 model,
# the gradients added into the masters' fp32 .grad after each backward. The copy is a function of
# the masters, so a resumed run rebuilds it bit for bit. Measured: 583 -> 631 tokens/s (135M, B=4,
# T=256, 2 Sapphire Rapids cores).
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
    pages in again: 150k-350k page faults a step for the 135M model on CPU, which made a 2.7 s step
    take 3.0-4.3 s on a 2-core VM. Returns False (and changes nothing) where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))  # no mmap; trim past 2 GB
