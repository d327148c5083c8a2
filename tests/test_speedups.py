"""smollm2/speedups.py: the bf16 copy of the weights that CPU bf16 training runs forward and backward
with, against fp32 and bf16 autocast (the same model, the same batch); the GEMM route; the compiled
attention backward; the attention kernels install chooses off the CPU."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG as TINY, tiny_model
from model import ScaledDotProductAttention, SmolLM2
from smollm2 import cpu_paths, speedups
from smollm2.chunked_loss import ChunkedLoss
from smollm2.speedups import (CausalAttention, CompiledCausalAttention, LowPrecisionWeights, RepeatedKVAttention,
                               RoutedLinear)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_bf16_copy_gives_fp32_gradients_close_to_fp32_and_autocast_and_accumulates_micro_batches():
    torch.manual_seed(0)
    model = SmolLM2(TINY).train()
    loss_fn = ChunkedLoss(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 2, 33))
    loss_fn(idx[0, :, :-1], idx[0, :, 1:]).backward()
    ref = grads(model)  # fp32
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(idx[0, :, :-1], idx[0, :, 1:]).backward()
    auto = grads(model)
    model.zero_grad(set_to_none=True)
    low = LowPrecisionWeights(loss_fn)
    assert all(p.dtype == torch.bfloat16 for p in low.low) and len(low.low) == len(list(model.parameters()))
    loss = low(idx[0, :, :-1], idx[0, :, 1:])
    loss.backward()  # its hooks add each copy's gradient into the master's .grad
    ours = grads(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters stay fp32
    assert all(g.dtype == torch.float32 for g in ours.values()) and all(p.grad is None for p in low.low)
    for n in ref:  # bf16 products: within a few bf16 ulps of the gradient's scale, as autocast is
        scale = ref[n].abs().max()
        assert (ours[n] - ref[n]).abs().max() <= 0.05 * scale, n
        assert (auto[n] - ref[n]).abs().max() <= 0.05 * scale, n
    # the tied embedding/lm_head gets both gradients, as in fp32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a second micro-batch adds into the fp32 .grad
    model.zero_grad(set_to_none=True)
    low(idx[1, :, :-1], idx[1, :, 1:]).backward()
    second = grads(model)
    low(idx[0, :, :-1], idx[0, :, 1:]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ours[n] + second[n])


def test_the_optimizers_step_refreshes_the_copy_from_the_updated_masters():
    model = SmolLM2(TINY)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    low = LowPrecisionWeights(model, optimizer)
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    low(idx)[0].square().mean().backward()
    before = [t.clone() for t in low.low]
    optimizer.step()  # its post-hook copies the updated masters into the copy
    for master, copy, old in zip(model.parameters(), low.low, before):
        assert torch.equal(copy, master.to(torch.bfloat16))
    assert not all(torch.equal(a, b) for a, b in zip(low.low, before))
    low.remove()  # unhooked: a step leaves the copy as it was
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    optimizer.step()
    assert not torch.equal(low.low[0], model.lm_head.weight.to(torch.bfloat16))


def onednn_calls(fn):
    """(fn's result, how many times it called our oneDNN matmul)."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "smollm2::onednn_matmul_nt")


needs_onednn = pytest.mark.skipif(not cpu_paths.onednn_available(), reason="oneDNN matmuls: x86 CPUs only")


@needs_onednn
def test_onednn_linear_equals_f_linear_in_value_and_gradients(monkeypatch):
    monkeypatch.setattr(speedups, "ONEDNN", True)  # whichever library cpu_paths measures faster here
    torch.manual_seed(0)
    layer = RoutedLinear(96, 160, bias=False)
    x = torch.randn(3, 17, 96, requires_grad=True)  # 3-D, as in the model
    y, calls = onednn_calls(lambda: layer(x))
    ref = F.linear(x, layer.weight)
    assert calls == 1  # the fast path was taken, not F.linear again
    dy = torch.randn_like(ref)
    (gx, gw), calls = onednn_calls(lambda: torch.autograd.grad(y, (x, layer.weight), dy))
    rx, rw = torch.autograd.grad(ref, (x, layer.weight), dy)
    assert calls == 2  # d/dx and d/dweight
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@needs_onednn
def test_inference_and_autocast_keep_f_linear_bit_for_bit(monkeypatch):
    monkeypatch.setattr(speedups, "ONEDNN", True)
    torch.manual_seed(0)
    layer, x = RoutedLinear(96, 160, bias=False), torch.randn(4, 96)
    with torch.no_grad():  # inference: MKL, so logits stay identical to transformers'
        y, calls = onednn_calls(lambda: layer(x))
        assert calls == 0 and torch.equal(y, F.linear(x, layer.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 matmul, not an fp32 one
        y, calls = onednn_calls(lambda: layer(x))
        assert calls == 0 and y.dtype == torch.bfloat16


@needs_onednn
def test_training_step_without_onednn_gives_the_same_gradients(monkeypatch):
    monkeypatch.setattr(speedups, "ONEDNN", False)  # restored after the test: install sets it
    model = tiny_model().train()
    installed = speedups.install(model, "cpu", "fp32", training=True, keep_memory=False, gemm="onednn")
    assert any("oneDNN" in line for line in installed)  # routes every Linear of the model, the head too
    assert all(type(m) is RoutedLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    loss_fn = ChunkedLoss(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    fast, calls = onednn_calls(lambda: torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), list(model.parameters())))
    assert calls > 0  # the oneDNN products ran
    monkeypatch.setattr(speedups, "ONEDNN", False)
    plain = torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), list(model.parameters()))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("onednn", [pytest.param(True, marks=needs_onednn), False])
def test_compiled_training_step_matches_eager_loss_and_gradients(monkeypatch, onednn):
    monkeypatch.setattr(speedups, "ONEDNN", False)  # restored after the test: install sets it
    model = tiny_model().train()  # each GEMM library, whichever cpu_paths measures faster here
    speedups.install(model, "cpu", "fp32", compiled=True, training=True, keep_memory=False,
                     gemm="onednn" if onednn else "mkl")
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    loss_fn = ChunkedLoss(model)
    eager = loss_fn(idx[:, :-1], idx[:, 1:])
    compiled = torch.compile(loss_fn)(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, list(model.parameters())),
                    torch.autograd.grad(eager, list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _attention_grads(fn, q, k, v, grad_out, dtype):
    q, k, v = (t.to(dtype).clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(dtype))
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def test_causal_attention_backward_is_sdpa_in_fp32_and_as_close_to_it_as_flash_in_bf16():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 64, 16) * 2, torch.randn(2, 2, 64, 16) * 2, torch.randn(2, 2, 64, 16)
    grad_out = torch.randn(2, 6, 64, 16)  # 3 query heads per K/V head, as in SmolLM2
    flash = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = _attention_grads(flash, q, k, v, grad_out, torch.float32)
    ours = _attention_grads(CausalAttention.apply, q, k, v, grad_out, torch.float32)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    flash_bf16 = _attention_grads(flash, q, k, v, grad_out, torch.bfloat16)
    ours_bf16 = _attention_grads(CausalAttention.apply, q, k, v, grad_out, torch.bfloat16)
    for name, r, a, b in zip(("out", "dq", "dk", "dv"), ref, flash_bf16, ours_bf16):
        err_flash, err_ours = (a - r).abs().max(), (b - r).abs().max()
        assert err_ours <= 1.25 * err_flash, (name, err_ours, err_flash)  # measured: 0.65-1.0x


def test_attention_is_routed_only_in_a_compiled_bf16_cpu_training_step(monkeypatch):
    model = tiny_model()
    assert not any("attention" in line for line in speedups.install(model, "cpu", "bf16", training=True,
                                                                                 keep_memory=False))
    assert not any("attention" in line for line in speedups.install(model, "cpu", "fp32", compiled=True,
                                                                                 training=True, keep_memory=False))
    installed = speedups.install(model, "cpu", "bf16", compiled=True, training=True, keep_memory=False)
    assert any("attention backward" in line for line in installed)
    attn = model.model.layers[0].self_attn.sdpa
    assert type(attn) is CompiledCausalAttention
    calls = []
    monkeypatch.setattr(CausalAttention, "apply", lambda *t: calls.append(t) or t[0])
    q, k, v = torch.randn(1, 6, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)  # eager: flash's own backward
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    attn(q, k, v, None)  # fp32
    with torch.no_grad():
        attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)  # no training
    assert calls == []
    attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(q, k, v.bfloat16(), None)  # autocast: cast to bf16 as SDPA would be
    assert len(calls) == 2 and all(t.dtype == torch.bfloat16 for t in calls[1])


@pytest.mark.slow
def test_compiled_bf16_training_step_is_as_close_to_fp32_as_eager_bf16():
    model = tiny_model().train()
    speedups.install(model, "cpu", "bf16", compiled=True, training=True, keep_memory=False)  # as train.py does
    idx = torch.randint(0, TINY.vocab_size, (2, 65))
    loss_fn = ChunkedLoss(model)
    params = list(model.parameters())
    ref = torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), params)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), params)
        compiled = torch.autograd.grad(torch.compile(loss_fn)(idx[:, :-1], idx[:, 1:]), params)
    err = lambda grads: max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))
    assert err(compiled) <= 1.5 * err(eager), (err(compiled), err(eager))


# ----------------------------------------------------------------------------- attention kernel choice
@pytest.mark.parametrize("device, dtype, masked, head_dim, capability, in_kernel", [
    ("cuda", torch.bfloat16, False, 64, (8, 0), True),  # A100: flash
    ("cuda", torch.float16, False, 64, (9, 0), True),  # H100/H200: flash
    ("cuda", torch.float16, False, 64, (7, 5), False),  # T4: no flash; the efficient kernel needs equal heads
    ("cuda", torch.float32, False, 64, (9, 0), False),  # fp32: no flash on any GPU
    ("cuda", torch.bfloat16, True, 64, (9, 0), False),  # a mask (generation): no flash
    ("cuda", torch.bfloat16, False, 60, (9, 0), False),  # head_dim not a multiple of 8
    ("cuda", torch.bfloat16, False, 512, (9, 0), False),  # head_dim over 256
    ("cuda", torch.bfloat16, False, 64, None, False),  # capability unknown: the safe way
    ("mps", torch.float32, False, 64, None, False)])  # MPS: install passes no capability
def test_gqa_runs_in_the_kernel_only_where_the_kernel_reads_grouped_heads(device, dtype, masked, head_dim,
                                                                         capability, in_kernel):
    assert speedups.flash_reads_groups(dtype, masked, head_dim, capability) is in_kernel


def test_install_swaps_attention_only_off_the_cpu_and_logs_what_it_installed(monkeypatch):
    """On CPU (inference) the model keeps model.py's attention, whose kernels read grouped K/V; on a
    GPU (faked: a T4's capability) every layer gets RepeatedKVAttention with the device's capability."""
    model = tiny_model()
    assert speedups.install(model, "cpu") == []
    assert all(type(layer.self_attn.sdpa) is ScaledDotProductAttention for layer in model.model.layers)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    installed = speedups.install(model, "cuda")
    assert len(installed) == 1 and "K/V repeated" in installed[0]
    assert all(type(layer.self_attn.sdpa) is RepeatedKVAttention and layer.self_attn.sdpa.capability == (7, 5)
               for layer in model.model.layers)


def test_the_repeated_kv_path_gives_the_grouped_paths_logits_and_gradients():
    """What a T4 or an fp32 GPU run takes (K/V repeated, no enable_gqa), run here on CPU."""
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    results = []
    for repeat in (False, True):
        m = tiny_model()
        if repeat:
            assert speedups.swap_modules(m, ScaledDotProductAttention, lambda old: RepeatedKVAttention(None)) == TINY.num_hidden_layers
        logits = m(idx)[0]  # (logits, loss)
        logits.square().mean().backward()
        results.append((logits, m.model.layers[0].self_attn.k_proj.weight.grad))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_a_decode_step_on_the_repeated_kv_path_reads_the_cache_without_copying_it(monkeypatch):
    """One query per head (a KV-cache decode step, rows at different lengths): each group's query
    heads read their K/V head as rows of queries; the tokens equal model.py's grouped path's, and no
    repeat of the cache is made."""
    from smollm2 import engine
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    outputs = []
    for repeat in (False, True):
        m = tiny_model().eval()
        if repeat:
            speedups.swap_modules(m, ScaledDotProductAttention, lambda old: RepeatedKVAttention((7, 5)))
        cache = engine.KVCache(TINY, 2, 16, "cpu", torch.float32)
        with torch.no_grad():
            for row, prompt in enumerate(prompts):  # each row's prompt, then one decode step for both
                one = engine.KVCache(TINY, 1, 16, "cpu", torch.float32)
                m.hidden_states(torch.tensor([prompt]), cache=one)
                for layer in range(TINY.num_hidden_layers):
                    cache.k[layer][row], cache.v[layer][row] = one.k[layer][0], one.v[layer][0]
                cache.lengths[row] = len(prompt)
            if repeat:
                monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: pytest.fail("a copy of K/V"))
            positions = cache.lengths[:, None].clone()
            outputs.append(engine.decode_step(m, torch.tensor([[11], [12]]), positions, cache))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
