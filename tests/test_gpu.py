"""The GPU suite: `python -m pytest -m gpu` on a machine with CUDA (elsewhere every test here is
skipped with the reason "needs CUDA"; CI is CPU-only). Each test is short: the whole suite is meant
to take under 5 minutes on one H100. What it checks is what no CPU test can: the CUDA paths of
model.py, train.py and the Space (docs/gpu.md says what was measured where). Tests that change a
model's dtype or modules work on a copy of the session's real model (copy.deepcopy): a bf16 cast
and back keeps the rounding, and later exact tests in the same worker would read rounded weights."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TRAIN_PY, losses, read_metrics, run_cmd, run_train, text_file

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
        "all resolved rather to die than to famish?")
# A short GPU run of the tiny preset on the repo's Shakespeare: small enough to take seconds
GPU_TINY = ["--device", "cuda", "--model", "tiny", "--batch-size", "8", "--seq-len", "128", "--lr", "3e-3",
            "--warmup", "2", "--eval-iters", "2", "--eval-interval", "1000", "--log-interval", "1",
            "--sample-interval", "0", "--ckpt-interval", "0"]


@pytest.fixture(scope="module")
def text_ids():
    from smollm2.tokenizer import load_tokenizer
    return torch.tensor([load_tokenizer().encode(TEXT).ids], device="cuda")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("data"), 200_000)


def nll(logits, ids):
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()


def test_cuda_logits_equal_transformers_in_fp32_and_come_within_a_stated_tolerance_in_bf16(
        real_model, hf_real_model, text_ids):
    """fp32 with TF32 off: logits within 1e-4 of transformers'. bf16 weights: the loss within 0.02
    nats of fp32 transformers' and the same top-1 token at 95%+ of positions."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ours, hf = copy.deepcopy(real_model).to("cuda"), hf_real_model.to("cuda")
        with torch.no_grad():
            a, b = ours(text_ids)[0], hf(text_ids).logits
            assert (a - b).abs().max().item() < 1e-4
            ours.to(torch.bfloat16)  # the copy: the session's model stays exact
            c = ours(text_ids)[0].float()
        assert abs(nll(c, text_ids) - nll(b, text_ids)) < 0.02
        assert (c.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.95
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        hf_real_model.to("cpu")


def test_greedy_generation_on_cuda_with_the_installed_attention_equals_transformers(real_model, hf_real_model,
                                                                                   text_ids):
    """engine.generate on the model as eval.py and the Space have it (speedups.install: one-query
    decode steps read each K/V head as its group's rows of queries), fp32: transformers' tokens."""
    from smollm2 import engine, speedups
    try:
        ours, hf = copy.deepcopy(real_model).to("cuda"), hf_real_model.to("cuda")
        speedups.install(ours, "cuda")
        prompt = text_ids[:, :12]
        mine = engine.generate(ours, prompt[0].tolist(), max_new_tokens=24)
        theirs = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 12:].tolist()
        assert mine == theirs
    finally:
        hf_real_model.to("cpu")


def test_the_t4_attention_path_runs_without_the_math_kernel_on_a_gpu_that_has_flash(monkeypatch):
    """A T4 (compute capability 7.5) has no flash attention: K/V are repeated so that the
    memory-efficient kernel runs. With only that kernel allowed, an fp16 forward and backward at
    B=4, T=2048 must run (enable_gqa would need the math kernel: 'no available kernel')."""
    from model import PRESETS, SmolLM2
    from smollm2 import speedups
    from torch.nn.attention import SDPBackend, sdpa_kernel
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    model = SmolLM2(PRESETS["smollm2-135m"]).to("cuda")
    speedups.install(model, "cuda")  # as train.py, eval.py and the Space do: K/V repeated on a T4
    ids = torch.randint(0, 49152, (4, 2048), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", torch.float16):
        model.hidden_states(ids).float().square().mean().backward()
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert peak < 12, f"{peak:.1f} GiB: the (B, nh, T, T) matrices of the math kernel?"  # a T4 has 15 GB


def test_fp16_with_a_skipped_step_resumes_bit_for_bit_with_deterministic(tmp_path, shakespeare):
    """fp16 autocast + GradScaler, an inf injected into step 3's gradient (skipped, counted), then
    steps 5-8 again from step 4's checkpoint: the same losses, bit for bit, under --deterministic."""
    from test_precision import run_injected
    args = [*GPU_TINY, "--dtype", "fp16", "--deterministic", "--data", shakespeare, "--ckpt-interval", "4"]
    run_injected(tmp_path, *args, "--steps", "8", "--save", "a/c.pt", at=3)
    run_train(tmp_path, *args, "--steps", "8", "--ckpt", "a/c_step_4.pt", "--save", "b/c.pt",
              "--metrics", "b/metrics.jsonl")
    whole, resumed = read_metrics(tmp_path / "a/c_metrics.jsonl"), losses(tmp_path / "b/metrics.jsonl")
    assert whole[-1]["skipped_steps"] == 1
    assert {r["step"]: r["loss"] for r in whole if r["step"] > 4} == resumed


@pytest.mark.parametrize("compile", ["off", "on"])
def test_bf16_training_learns_with_and_without_compile_and_logs_memory_and_mfu(tmp_path, shakespeare, compile):
    """bf16 autocast on a GPU with native bf16 (fp16 below 8.0), eager and compiled (CUDA graphs at
    this step size: compile_mode), the log carrying peak memory and MFU."""
    proc = run_train(tmp_path, *GPU_TINY, "--data", shakespeare, "--steps", "30", "--compile", compile,
                     "--peak-flops", "1e14", "--save", "c.pt")
    records = read_metrics(tmp_path / "c_metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, records  # it learns
    assert all(r["peak_mem_bytes"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert "batch advice: " in proc.stdout  # 1,024 tokens a step: the log says to raise it
    if compile == "on":
        assert "mode reduce-overhead" in proc.stdout


def test_packed_conversations_on_cuda_attend_only_to_themselves_and_train_compiled(tmp_path, monkeypatch):
    """The block-diagonal mask of packed conversations (doc) on CUDA's kernels: hidden states equal
    each sequence alone (fp32, TF32 off), then train.py on the shipped conversations, compiled, in bf16."""
    import os
    from conftest import ROOT, tiny_model
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after the test
    model = tiny_model().cuda()
    seqs = [torch.randint(0, 512, (n,), device="cuda") for n in (7, 30, 11)]
    doc = torch.cat([torch.full((len(s),), d, device="cuda") for d, s in enumerate(seqs)])[None]
    packed = model.hidden_states(torch.cat(seqs)[None], doc=doc)[0]
    alone = torch.cat([model.hidden_states(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    chat = os.path.join(ROOT, "data", "chat", "train.jsonl")
    proc = run_train(tmp_path, *GPU_TINY, "--data", chat, "--steps", "30", "--seq-len", "256", "--compile", "on",
                     "--save", "c.pt")
    records = read_metrics(tmp_path / "c_metrics.jsonl")
    assert "packed, each attending only to itself" in proc.stdout and records[-1]["loss"] < records[0]["loss"]


def test_a_deterministic_gpu_run_resumes_bit_for_bit(tmp_path, shakespeare):
    args = [*GPU_TINY, "--dtype", "bf16", "--deterministic", "--data", shakespeare, "--ckpt-interval", "5"]
    run_train(tmp_path, *args, "--steps", "10", "--save", "a/c.pt")
    run_train(tmp_path, *args, "--steps", "10", "--ckpt", "a/c_step_5.pt", "--save", "b/c.pt",
              "--metrics", "b/metrics.jsonl")
    whole, resumed = losses(tmp_path / "a/c_metrics.jsonl"), losses(tmp_path / "b/metrics.jsonl")
    assert {s: v for s, v in whole.items() if s > 5} == resumed


def test_the_space_serves_the_real_weights_on_cuda_in_bf16_and_streams_greedy_answers(real_model, text_ids):
    from test_app import GREEDY, final, load_app_module
    from smollm2.tokenizer import load_tokenizer
    app = load_app_module()
    device, dtype = app.choose_device(*app.cuda_facts())
    capability = torch.cuda.get_device_capability()
    assert device == "cuda" and dtype == (torch.bfloat16 if capability >= (8, 0) else torch.float32)
    model = copy.deepcopy(real_model).to(device=device, dtype=dtype)  # a copy: the session's stays fp32
    model.source_info = {"source": "x.gguf", "format": "gguf", "why": "test", "name": "x.gguf"}
    engine = app.Engine(model, load_tokenizer())
    answer, status = final(engine.generate("What is the capital of France?", **GREEDY))
    assert answer.strip() and "tokens/s" in status, status


def test_zero_shot_tasks_on_cuda_choose_as_the_cpu_does_and_the_core_suite_prints_its_time(tmp_path, gguf_path):
    """eval.py --tasks core on CUDA (bf16 where native): every row's prediction against CPU fp32's on
    the first 100 rows of each task, at most 3 in 100 apart (bf16 rounding); the suite's seconds are
    printed (-s) for docs/eval.md, not asserted."""
    import json
    out = {}
    for device, limit in (("cuda", None), ("cpu", 100)):
        args = ["--device", device, "--json", str(tmp_path / f"{device}.json")] + (["--dtype", "fp32", "--limit", str(limit)]
                                                                                   if device == "cpu" else [])
        print(run_cmd(ROOT, sys.executable, "eval.py", gguf_path, "--tasks", "core", *args).stdout)
        out[device] = json.loads((tmp_path / f"{device}.json").read_text())["tasks"]
    for name, cpu in out["cpu"].items():
        cuda = out["cuda"][name]["results"][:100]
        assert sum(a != b for a, b in zip(cuda, cpu["results"])) <= 3, name


@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_on_two_gpus_with_nccl_matches_one_gpu_with_grad_accum_2(tmp_path, shakespeare):
    args = [*GPU_TINY, "--dtype", "fp32", "--data", shakespeare, "--steps", "6"]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  TRAIN_PY, *args, "--save", "ddp/c.pt", timeout=600)
    run_train(tmp_path, *args, "--grad-accum", "2", "--save", "one/c.pt")
    assert "2 processes" in ddp.stdout
    a, b = losses(tmp_path / "ddp/c_metrics.jsonl"), losses(tmp_path / "one/c_metrics.jsonl")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-3 for s in a), (a, b)  # TF32 on: not exact



# ----------------------------------------------------------------------------- the third review's findings
def capability():
    return torch.cuda.get_device_capability() if CUDA else (0, 0)


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def test_a_compiled_run_with_grad_accum_2_trains_without_cuda_graphs(tmp_path, shakespeare):
    """CUDA graphs and a second backward into the first's gradients crashed ("accessing tensor output
    of CUDAGraphs that has been overwritten"): with --grad-accum 2 compile_mode takes the default mode."""
    proc = run_train(tmp_path, *GPU_TINY, "--data", shakespeare, "--steps", "20", "--compile", "on",
                     "--grad-accum", "2", "--save", "c.pt")
    records = read_metrics(tmp_path / "c_metrics.jsonl")
    assert "reduce-overhead" not in proc.stdout and records[-1]["loss"] < records[0]["loss"] - 0.5


def test_compiled_and_eager_bf16_runs_have_the_same_losses_within_bf16_rounding(tmp_path, shakespeare):
    args = [*GPU_TINY, "--data", shakespeare, "--steps", "10", "--dtype", "bf16"]
    run_train(tmp_path, *args, "--compile", "off", "--save", "eager/c.pt")
    run_train(tmp_path, *args, "--compile", "on", "--save", "compiled/c.pt")
    eager, compiled = losses(tmp_path / "eager/c_metrics.jsonl"), losses(tmp_path / "compiled/c_metrics.jsonl")
    assert eager.keys() == compiled.keys() and all(abs(eager[s] - compiled[s]) < 0.05 for s in eager), (eager, compiled)


@pytest.mark.skipif(capability() < (8, 0), reason="flash attention needs compute capability 8.0+")
def test_flash_attention_runs_a_bf16_step_with_grouped_kv_heads():
    """With only the flash kernel allowed, the 135M model's bf16 forward and backward run: q, k, v
    reach SDPA in bf16 (RoPE tables cast to q's dtype) and K/V stay grouped (enable_gqa, no repeat)."""
    from model import PRESETS, SmolLM2
    from smollm2 import speedups
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = SmolLM2(PRESETS["smollm2-135m"]).cuda()
    speedups.install(model, "cuda", "bf16", training=True)
    ids = torch.randint(0, 49152, (4, 1024), device="cuda")
    repeats = []
    original = torch.Tensor.repeat_interleave
    torch.Tensor.repeat_interleave = lambda *a, **k: repeats.append(1) or original(*a, **k)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", torch.bfloat16):
            model.hidden_states(ids).float().square().mean().backward()
    finally:
        torch.Tensor.repeat_interleave = original
    assert not repeats and model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_a_training_step_that_does_not_log_never_waits_for_the_gpu(tmp_path, shakespeare):
    """torch.cuda.set_sync_debug_mode("error") from the loop's start to the first log line: any host
    sync inside steps 1-11 (an .item(), a blocking copy, a clock pause) raises and fails the run."""
    from conftest import patched_train
    script = patched_train(tmp_path, """
import torch
from smollm2 import loggers
clock_init, log_step = loggers.Clock.__init__, loggers.log_step
def init(self, step, device="cpu"):
    clock_init(self, step, device)
    if step == 0:
        torch.cuda.set_sync_debug_mode("error")
def logged(*args, **kwargs):
    torch.cuda.set_sync_debug_mode(0)
    return log_step(*args, **kwargs)
loggers.Clock.__init__, loggers.log_step = init, logged
""")
    run_cmd(tmp_path, sys.executable, script, *GPU_TINY, "--data", shakespeare, "--dtype", "bf16", "--val-frac", "0",
            "--steps", "12", "--log-interval", "12", "--compile", "off", "--save", "c.pt")


@pytest.mark.skipif(not CUDA or not any(n in torch.cuda.get_device_name() for n in ("H100", "H200")),
                    reason="the MFU floor is set for an H100 (or H200)")
def test_the_135m_model_trains_at_35_percent_mfu_or_more_at_b16_t2048_bf16_compiled(tmp_path):
    run_train(tmp_path, "--device", "cuda", "--data", os.path.join(ROOT, "input.txt"), "--val-frac", "0",
              "--batch-size", "16", "--seq-len", "2048", "--dtype", "bf16", "--compile", "on", "--steps", "30",
              "--log-interval", "10", "--sample-interval", "0", "--ckpt-interval", "0", "--save", "c.pt")
    mfu = read_metrics(tmp_path / "c_metrics.jsonl")[-1]["mfu"]  # steps 21-30: compiled, warm
    print(f"135M, B=16, T=2048, bf16, compiled, {torch.cuda.get_device_name()}: MFU {mfu:.1%}")
    assert mfu >= 0.35


@pytest.mark.skipif(capability() < (8, 0), reason="bf16 packed batches: compute capability 8.0+")
def test_a_packed_batch_on_cuda_keeps_one_attention_bias_for_backward_and_prints_its_memory():
    """B=4, T=2048 of the 135M model in bf16 with doc, on the kernels a GPU runs (K/V repeated for
    the memory-efficient kernel): one (4, 1, 2048, 2048) bias kept for backward, 32 MiB, not 30; the
    peak memory with and without doc is printed for docs/gpu.md."""
    from model import PRESETS, SmolLM2
    from smollm2 import speedups
    from test_model import saved_biases
    model = SmolLM2(PRESETS["smollm2-135m"]).cuda()
    speedups.install(model, "cuda", "bf16", training=True)
    ids = torch.randint(0, 49152, (4, 2048), device="cuda")
    doc = (torch.arange(2048, device="cuda") // 300).expand(4, -1)
    assert saved_biases(model, ids, doc, "cuda") == 1
    peaks = []
    for packed in (None, doc):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", torch.bfloat16):
            model.hidden_states(ids, doc=packed).float().square().mean().backward()
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    print(f"135M, B=4, T=2048, bf16: peak {peaks[0]:.2f} GiB unpacked, {peaks[1]:.2f} GiB packed")


@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus_in_bf16_saves_with_dcp_resumes_exactly_and_scores_tasks_split(tmp_path, shakespeare):
    args = [*GPU_TINY, "--dtype", "bf16", "--deterministic", "--data", shakespeare, "--steps", "6", "--fsdp",
            "--ckpt-interval", "3", "--val-frac", "0", "--eval-tasks", "arc_easy:32", "--eval-interval", "3"]
    first = run_cmd(tmp_path, *torchrun(2, TRAIN_PY, *args, "--save", "a/c.pt"), timeout=600)
    assert os.path.isdir(tmp_path / "a/c_step_3.pt") and "step 0 | arc_easy" in first.stdout
    run_cmd(tmp_path, *torchrun(2, TRAIN_PY, *args, "--ckpt", "a/c_step_3.pt", "--save", "b/c.pt",
                                "--metrics", "b/metrics.jsonl"), timeout=600)
    whole, resumed = losses(tmp_path / "a/c_metrics.jsonl"), losses(tmp_path / "b/metrics.jsonl")
    assert {s: v for s, v in whole.items() if s > 3} == resumed


def test_fsdp_on_one_gpu_compiles_without_cuda_graphs(tmp_path, shakespeare):
    """FSDP2 allocates the gathered weights anew every step: no reduce-overhead, even on one rank."""
    proc = run_cmd(tmp_path, *torchrun(1, TRAIN_PY, *GPU_TINY, "--data", shakespeare, "--steps", "10", "--fsdp",
                                       "--compile", "on", "--save", "c.pt"), timeout=600)
    assert "compile: --compile on" in proc.stdout and "reduce-overhead" not in proc.stdout


@pytest.mark.skipif(capability() >= (8, 0), reason="fp16 is the default below compute capability 8.0 (a T4)")
def test_fp16_compiled_training_learns_on_a_gpu_without_bf16(tmp_path, shakespeare):
    proc = run_train(tmp_path, *GPU_TINY, "--data", shakespeare, "--steps", "30", "--compile", "on", "--save", "c.pt")
    records = read_metrics(tmp_path / "c_metrics.jsonl")
    assert "fp16 autocast + GradScaler" in proc.stdout and records[-1]["loss"] < records[0]["loss"] - 1.0


def test_eval_data_on_cuda_batches_windows_and_matches_the_cpu(tmp_path, gguf_path):
    """eval.py --data on a GPU: 16 windows a pass and TF32 products by default; the loss of the CPU's
    one window at a time in fp32 within 2e-3."""
    import json
    text, out = text_file(tmp_path, 30_000), {}
    for device in ("cuda", "cpu"):
        run_cmd(ROOT, sys.executable, "eval.py", gguf_path, "--data", str(text), "--seq-len", "512",
                "--device", device, "--json", str(tmp_path / f"{device}.json"))
        out[device] = json.loads((tmp_path / f"{device}.json").read_text())
    assert out["cuda"]["tokens"] == out["cpu"]["tokens"]
    assert abs(out["cuda"]["loss"] - out["cpu"]["loss"]) < 2e-3  # TF32 products on the GPU
