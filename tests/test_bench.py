"""The speed paths of model.py and train_kernels.py agree with the plain ones, and bench.py runs end to
end (tiny model)."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
import train_kernels
from model import PRESETS, KVCache, Linear, SmolLM2, SmolLM2Config
from train_kernels import CausalAttention, ChunkedLoss, RoutedAttention, RoutedLinear, chunked_cross_entropy

TINY = SmolLM2Config(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SmolLM2(TINY).eval()


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


def onednn_calls(fn):
    """(fn's result, how many times it called our oneDNN matmul)."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "smollm2::onednn_matmul_nt")


def test_gemm_route_follows_the_cpu_vendor_not_the_architecture(tmp_path):
    route = train_kernels.onednn_route
    assert route("AuthenticAMD", "x86_64", True)  # MKL's dispatch slows AMD: oneDNN
    assert not route("GenuineIntel", "x86_64", True)  # MKL is the faster one on Intel
    assert not route("", "x86_64", True) and not route("AuthenticAMD", "aarch64", True)
    assert not route("AuthenticAMD", "x86_64", False)  # torch built without oneDNN
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert train_kernels.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    assert train_kernels.cpu_vendor(str(tmp_path / "missing")) == ""


needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and train_kernels.platform.machine()
                                       .lower() in ("x86_64", "amd64")), reason="oneDNN matmuls: x86 CPUs only")


@needs_onednn
def test_onednn_linear_equals_f_linear_in_value_and_gradients(monkeypatch):
    monkeypatch.setattr(train_kernels, "ONEDNN", True)  # whichever route this CPU's vendor picks
    torch.manual_seed(0)
    layer = RoutedLinear(96, 160)
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
    monkeypatch.setattr(train_kernels, "ONEDNN", True)
    torch.manual_seed(0)
    layer, x = RoutedLinear(96, 160), torch.randn(4, 96)
    with torch.no_grad():  # inference: MKL, so logits stay identical to transformers'
        y, calls = onednn_calls(lambda: layer(x))
        assert calls == 0 and torch.equal(y, F.linear(x, layer.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 matmul, not an fp32 one
        y, calls = onednn_calls(lambda: layer(x))
        assert calls == 0 and y.dtype == torch.bfloat16


@needs_onednn
def test_training_step_without_onednn_gives_the_same_gradients(monkeypatch):
    monkeypatch.setattr(train_kernels, "ONEDNN", True)
    model = tiny_model().train()
    loss_fn = ChunkedLoss(model)  # routes every Linear of the model
    assert all(type(m) is RoutedLinear for m in model.modules() if isinstance(m, Linear))
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    fast, calls = onednn_calls(lambda: torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), list(model.parameters())))
    assert calls > 0  # the oneDNN products ran
    monkeypatch.setattr(train_kernels, "ONEDNN", False)
    plain = torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), list(model.parameters()))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("onednn", [pytest.param(True, marks=needs_onednn), False])
def test_compiled_training_step_matches_eager_loss_and_gradients(monkeypatch, onednn):
    monkeypatch.setattr(train_kernels, "ONEDNN", onednn)  # each GEMM route, whichever this CPU's vendor picks
    model = tiny_model().train()
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
    ChunkedLoss(model)
    attn = model.model.layers[0].self_attn
    assert type(attn) is RoutedAttention
    calls = []
    monkeypatch.setattr(CausalAttention, "apply", lambda *t: calls.append(t) or t[0])
    q, k, v = torch.randn(1, 6, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    attn.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)  # eager: flash's own backward
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    attn.attend(q, k, v, None)  # fp32
    with torch.no_grad():
        attn.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)  # no training
    assert calls == []
    attn.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn.attend(q, k, v.bfloat16(), None)  # autocast: cast to bf16 as SDPA would be
    assert len(calls) == 2 and all(t.dtype == torch.bfloat16 for t in calls[1])


@pytest.mark.slow
def test_compiled_bf16_training_step_is_as_close_to_fp32_as_eager_bf16():
    model = tiny_model().train()
    idx = torch.randint(0, TINY.vocab_size, (2, 65))
    loss_fn = ChunkedLoss(model)
    params = list(model.parameters())
    ref = torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), params)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = torch.autograd.grad(loss_fn(idx[:, :-1], idx[:, 1:]), params)
        compiled = torch.autograd.grad(torch.compile(loss_fn)(idx[:, :-1], idx[:, 1:]), params)
    err = lambda grads: max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))
    assert err(compiled) <= 1.5 * err(eager), (err(compiled), err(eager))


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


@pytest.mark.slow
def test_compiled_decode_step_matches_eager_logits_and_greedy_tokens():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()
    with torch.inference_mode():
        cache = KVCache(TINY, 1, 64, "cpu", torch.float32)
        model.hidden_states(torch.tensor([prompt]), cache)
        idx, positions = torch.tensor([[7]]), torch.tensor([cache.pos])
        eager = model.decode_step(idx, positions, cache)
        compiled = model.compiled_decode_step()(idx, positions, cache)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert model.generate(prompt, 40, compile=True) == model.generate(prompt, 40)
    # past the window (128 positions) the cache restarts; compiled and eager still agree
    long_prompt = torch.randint(0, TINY.vocab_size, (100,)).tolist()
    assert model.generate(long_prompt, 60, compile=True) == model.generate(long_prompt, 60)
    # a cache of a given size (as the Space asks for): roomier, the same tokens; smaller than prompt
    # and answer, the prompt keeps its last 63 tokens and the cache restarts, compiled as eager
    assert model.generate(prompt, 40, compile=True, cache_len=128) == model.generate(prompt, 40)
    small = model.generate(long_prompt, 60, compile=True, cache_len=64)
    assert small == model.generate(long_prompt, 60, cache_len=64)
    assert small[:1] == model.generate(long_prompt[-63:], 1)


@pytest.mark.slow
def test_compiled_decode_step_follows_weights_changed_after_it_was_built():
    # the guards skip unchanged module dicts (recursive dict tags): new values, a new dtype
    # (model.to swaps each tensor's .data, no dict changes) and a new Parameter must still count
    model, other = tiny_model(), tiny_model(seed=1)
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()

    def step_logits():
        out = []
        for step in (model.compiled_decode_step(), model.decode_step):
            dtype = model.lm_head.weight.dtype
            with torch.inference_mode():
                cache = KVCache(TINY, 1, 64, "cpu", dtype)
                model.hidden_states(torch.tensor([prompt]), cache)
                out.append(step(torch.tensor([[7]]), torch.tensor([cache.pos]), cache).float())
        return out

    compiled, eager = step_logits()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    model.load_state_dict(other.state_dict())  # new values in the same tensors
    before, (compiled, eager) = eager, step_logits()
    assert not torch.allclose(eager, before, atol=1e-3)  # the change shows in the logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    model.to(torch.bfloat16)  # a new dtype under every parameter
    compiled, eager = step_logits()
    assert torch.allclose(compiled, eager, atol=0.05, rtol=0.02)
    norm = model.model.layers[0].input_layernorm
    norm.weight = torch.nn.Parameter(torch.full_like(norm.weight, 3.0))  # a new Parameter object
    compiled, eager = step_logits()
    assert torch.allclose(compiled, eager, atol=0.05, rtol=0.02)
    assert model.generate(prompt, 20, compile=True) == model.generate(prompt, 20)


@pytest.mark.slow
def test_compiled_bf16_decode_step_is_as_close_to_fp32_as_eager_bf16():
    # the streaming products in bf16 accumulate in fp32 and round once, as F.linear does in eager
    prompt = torch.randint(0, TINY.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, dtype, compiled in (("fp32", torch.float32, False), ("eager", torch.bfloat16, False),
                                  ("compiled", torch.bfloat16, True)):
        model = tiny_model().to(dtype)
        with torch.inference_mode():
            cache = KVCache(TINY, 1, 64, "cpu", dtype)
            model.hidden_states(prompt[None], cache)
            step = model.compiled_decode_step() if compiled else model.decode_step
            logits[name] = step(torch.tensor([[7]]), torch.tensor([cache.pos]), cache).float()
    scale = logits["fp32"].abs().max()
    err_eager = (logits["eager"] - logits["fp32"]).abs().max()
    err_compiled = (logits["compiled"] - logits["fp32"]).abs().max()
    assert err_eager < 0.05 * scale  # bf16 itself: a few bf16 roundings of the logits' scale
    assert err_compiled <= 1.5 * err_eager, (err_compiled, err_eager)


@pytest.mark.slow
def test_bench_runs_on_a_tiny_model_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--model", "tiny", "--repeats", "1",
                          "--warmup", "0", "--no-compile-generate", "--checkpointing", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["train"]["ours"]["tokens_per_s"] > 0 and res["train"]["hf"]["peak_memory_bytes"] > 0
    if "ours-mkl" in res["train"] or "ours-onednn" in res["train"]:  # x86: the other GEMM route, and MFU
        other = res["train"].get("ours-mkl") or res["train"]["ours-onednn"]
        assert other["tokens_per_s"] > 0 and 0 < res["train"]["ours"]["mfu"] < 1
    assert res["generate"]["same_tokens_as_hf"] == {"ours_eager": True}
    assert 0 < res["generate"]["bound"]["tokens_per_s"]
    assert "tokens/s" in run.stdout and "ours/tf" in run.stdout
    rows = res["checkpointing"]["rows"]  # tiny's window is 1024: T=256 only
    assert set(rows) == {"T256_off", "T256_on"} and all(r["peak_memory_bytes"] > 0 for r in rows.values())
    assert "gradient checkpointing, ours" in run.stdout


@pytest.mark.slow
def test_bench_space_serves_a_tiny_model_and_compares_it_with_model_py(tmp_path):
    torch.manual_seed(0)
    config = SmolLM2Config(**{**PRESETS["tiny"].__dict__, "max_position_embeddings": 256})  # one cache size
    SmolLM2(config).save_pretrained(tmp_path / "tiny")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench_space.py"), "--weights", str(tmp_path / "tiny"),
                          "--tokens", "16", "--rounds", "1"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    space, ours, ratio = (float(re.search(pattern, run.stdout).group(1)) for pattern in (
        r"Space, one user .*: ([\d.]+) tokens/s", r"generate\(compile=True\): +([\d.]+) tokens/s",
        r"Space / model.py: ([\d.]+)"))
    assert space > 0 and ours > 0 and ratio == pytest.approx(space / ours, rel=0.01)


def test_bench_compiles_ours_as_train_py_would_and_transformers_only_when_asked():
    sys.path.insert(0, ROOT)
    import bench
    auto = lambda device, model="smollm2-135m": argparse.Namespace(compile="auto", device=device, model=model)
    assert bench.compiled(auto("cpu"), "ours") and bench.compiled(auto("cpu"), "ours-mkl")
    assert not bench.compiled(auto("cpu"), "ours-eager") and not bench.compiled(auto("cpu"), "hf")
    assert not bench.compiled(auto("cpu", "tiny"), "ours") and not bench.compiled(auto("cuda"), "ours")
    for setting in ("on", "off"):
        both = argparse.Namespace(compile=setting, device="cpu", model="smollm2-135m")
        assert bench.compiled(both, "ours") == bench.compiled(both, "hf") == (setting == "on")
