"""smollm2/chunked_loss.py: the chunked cross-entropy that never holds the whole (N, V) logits, under
no_grad (no weight-sized gradient buffer) and autocast (one cast of the weight per forward; fp16's
small-probability gradients kept)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_CONFIG as TINY, tiny_model
from smollm2.chunked_loss import ChunkedLoss, chunked_cross_entropy


class OpLog(TorchDispatchMode):
    """Every aten op run inside, with its first input's and its output's shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.ops.append((func.__name__, tuple(first.shape) if first is not None else None,
                         tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def loss_inputs(n=64, c=16, v=200):
    torch.manual_seed(0)
    x = torch.randn(n, c, requires_grad=True)
    w = torch.randn(v, c, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[5] = -1
    return x, w, targets


def test_chunked_loss_under_no_grad_allocates_no_weight_gradient_and_gives_the_same_loss():
    x, w, targets = loss_inputs()
    ref = F.cross_entropy(x @ w.t(), targets, ignore_index=-1)
    with torch.no_grad(), OpLog() as log:
        loss = chunked_cross_entropy(x, w, targets, chunk_rows=16)
    torch.testing.assert_close(loss, ref)
    assert not [op for op in log.ops if op[2] == tuple(w.shape)]  # nothing the weight's size is made
    with OpLog() as log:  # with gradients, the (V, C) gradient buffer does exist: the probe works
        chunked_cross_entropy(x, w, targets, chunk_rows=16)
    assert [op for op in log.ops if op[2] == tuple(w.shape)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_chunked_loss_under_autocast_casts_the_weight_once_per_forward(dtype, grad):
    x, w, targets = loss_inputs()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype), OpLog() as log:
        loss = chunked_cross_entropy(x, w, targets, chunk_rows=16)  # 4 chunks
        if grad:
            loss.backward()
    casts = [op for op in log.ops if op[0].startswith("_to_copy") and op[1] == tuple(w.shape)]
    assert len(casts) == 1


def test_chunked_loss_in_fp16_keeps_the_gradient_of_small_probabilities():
    """softmax - one_hot near 1/V is subnormal in fp16: scaled as GradScaler scales it, the gradients
    stay within fp16's rounding of the fp32 ones."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = (0.05 * torch.randn(8192, 32)).requires_grad_()  # V = 8192: probabilities near 1e-4
    targets = torch.randint(0, 8192, (64,))
    ref = F.cross_entropy(x @ w.t(), targets)
    gx, gw = torch.autograd.grad(ref, (x, w))
    scale = 2.0 ** 16  # GradScaler's initial scale
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_cross_entropy(x, w, targets, chunk_rows=16)
    cx, cw = (g / scale for g in torch.autograd.grad(loss * scale, (x, w)))
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=0)
    assert (cx - gx).norm() / gx.norm() < 2e-3 and (cw - gw).norm() / gw.norm() < 2e-3


def test_chunked_cross_entropy_equals_full_loss_and_gradients_with_ignored_targets():
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 10, 36]] = -1
    ref = F.cross_entropy(x @ w.t(), targets, ignore_index=-1)
    gx, gw = torch.autograd.grad(ref * 3, (x, w))
    loss = chunked_cross_entropy(x, w, targets, chunk_rows=8)  # 5 chunks, the last one short
    cx, cw = torch.autograd.grad(loss * 3, (x, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(cx, gx)
    torch.testing.assert_close(cw, gw)


def test_chunked_cross_entropy_backward_runs_once_or_says_why():
    x, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    loss = chunked_cross_entropy(x, w, torch.randint(0, 10, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_forward_without_logits_gives_the_same_loss_and_gradients():
    model = tiny_model().train()
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    idx[0, 5] = -1  # an ignored target
    logits, loss = model(idx[:, :-1].clamp(min=0), idx[:, 1:])
    ref = torch.autograd.grad(loss, list(model.parameters()))
    chunked = ChunkedLoss(model)(idx[:, :-1].clamp(min=0), idx[:, 1:])
    grads = torch.autograd.grad(chunked, list(model.parameters()))
    assert logits.shape == (2, 32, TINY.vocab_size)
    torch.testing.assert_close(chunked, loss)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_loss_chunks_are_cache_sized_on_cpu_and_a_gib_of_fp32_logits_on_a_gpu():
    from smollm2.chunked_loss import loss_chunk_rows
    assert loss_chunk_rows("cpu", 49152) == 256
    assert loss_chunk_rows("cuda", 49152) == 4096  # 4096 x 49152 x 4 bytes = 0.75 GiB: 8 chunks at 32K rows
    assert loss_chunk_rows("mps", 49152) == 4096
    assert loss_chunk_rows("cuda", 512) == 1 << 19  # a tiny vocabulary: one chunk for any batch
    assert loss_chunk_rows("cuda", 10**7) == 256  # never below the CPU's
    assert ChunkedLoss(tiny_model()).chunk_rows == 256  # a CPU model's
