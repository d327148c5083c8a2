"""The training loss without its logits: the mean cross-entropy of the model's next-token
predictions, computed a chunk of rows at a time so that the (B, T, V) fp32 logits and their gradient
never exist (0.8 GB at B=4, T=256 for the 135M model). train.py trains it and eval.py evaluates it.
"""
import contextlib

import torch
import torch.nn as nn

from smollm2.speedups import autocast_dtype, matmul_nt


class ChunkedLoss(nn.Module):
    """ChunkedLoss(model)(idx, targets) -> the mean cross-entropy of model(idx, targets), computed a
    chunk of rows at a time (chunked_cross_entropy below) so the (B, T, V) fp32 logits and their
    gradient never exist. This is the module train.py trains (and DDP, torch.compile and
    LowPrecisionWeights wrap)."""

    def __init__(self, model, chunk_rows=None):
        super().__init__()
        device_type = next(model.parameters()).device.type
        self.model = model
        self.chunk_rows = chunk_rows or loss_chunk_rows(device_type, model.config.vocab_size)

    def forward(self, idx, targets, doc=None):
        x = self.model.hidden_states(idx, doc=doc)  # (B, T, C); doc: packed rows (model.py)
        return chunked_cross_entropy(x.flatten(0, 1), self.model.lm_head.weight, targets.reshape(-1),
                                     self.chunk_rows)


CPU_CHUNK_ROWS = 256  # fastest on CPU caches (docs/performance.md)
CHUNK_LOGIT_BYTES = 2**30  # elsewhere: the largest chunk whose fp32 logits fit in 1 GiB


def loss_chunk_rows(device_type, vocab_size):
    """Rows per chunk of the loss on this kind of device. Each chunk adds its part to the whole (V, C)
    weight gradient: on a GPU, 256-row chunks would rewrite those 113 MB (fp32, 135M model) 128 times
    a step at B=64, T=512. So GPUs take chunks as large as 1 GiB of fp32 logits allows (4096 rows at
    V=49152), a power of two, and the CPU its cache-sized 256."""
    if device_type == "cpu":
        return CPU_CHUNK_ROWS
    rows = CHUNK_LOGIT_BYTES // (4 * vocab_size)
    return max(CPU_CHUNK_ROWS, 1 << (rows.bit_length() - 1))


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
        dtype = autocast_dtype(x.device.type)
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
    dtype = autocast_dtype(x.device.type)
    valid = targets != -1
    with torch.autocast(x.device.type, enabled=False) if dtype else contextlib.nullcontext():
        xm, wm = (x.to(dtype), weight.to(dtype)) if dtype else (x, weight)
        return _cross_entropy_chunks(xm, wm, targets.clamp(min=0)[:, None], valid, chunk_rows) / valid.sum()
