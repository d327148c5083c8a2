"""Every device, every precision: the dtype choice (fake device facts), fp16 with a GradScaler and
bf16 on CPU (train, resume bit for bit, overflow), gradient checkpointing, the chunked loss under
no_grad and autocast, the SmolLM2 presets and the GPU peak table."""
import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import devices
from conftest import ROOT, TINY, TRAIN_ENV, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train
from devices import DeviceFacts, peak_flops, pick_dtype
from model import PRESETS, SmolLM2, SmolLM2Config, param_breakdown
from train_kernels import ChunkedLoss, chunked_cross_entropy


# ----------------------------------------------------------------------------- the dtype choice
@pytest.mark.parametrize("capability, dtype", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                               ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_is_bf16_from_compute_capability_8_0_else_fp16(capability, dtype):
    chosen, reason = pick_dtype(DeviceFacts("cuda", "GPU", capability))
    assert chosen == dtype and f"{capability[0]}.{capability[1]}" in reason
    assert ("GradScaler" in reason) == (dtype == "fp16")


@pytest.mark.parametrize("flags, dtype", [({"amx_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                          ({"amx_bf16", "avx512_bf16"}, "bf16"), (set(), "fp32")])
def test_auto_on_cpu_is_bf16_only_with_native_bf16_matmuls(flags, dtype):
    chosen, reason = pick_dtype(DeviceFacts("cpu", cpu_flags=frozenset(flags)))
    assert chosen == dtype
    assert all(f in reason for f in flags)


def test_auto_on_mps_is_fp32_and_an_explicit_dtype_is_kept_with_a_warning_where_emulated():
    assert pick_dtype(DeviceFacts("mps"))[0] == "fp32"
    chosen, reason = pick_dtype(DeviceFacts("cuda", "Tesla T4", (7, 5)), "bf16")
    assert chosen == "bf16" and "emulated" in reason
    assert pick_dtype(DeviceFacts("cpu"), "fp16") == ("fp16", "fp16 autocast + GradScaler (--dtype fp16)")


@pytest.mark.parametrize("device, requested, n_params, steps, compiled", [
    ("cpu", "auto", 135e6, 5000, True),  # the real run on CPU
    ("cpu", "auto", 135e6, 499, False),  # a short one: compiling would not pay
    ("cpu", "auto", 5e6, 5000, False),  # a tiny model
    ("cuda", "auto", 135e6, 5000, False),  # not measured on GPUs here
    ("mps", "auto", 135e6, 5000, False),
    ("cuda", "on", 135e6, 10, True), ("cpu", "on", 1e6, 1, True), ("cpu", "off", 135e6, 5000, False),
])
def test_compile_auto_compiles_long_cpu_runs_of_large_models_and_on_off_are_kept(device, requested, n_params,
                                                                                 steps, compiled):
    on, reason = devices.pick_compile(device, requested, n_params, steps)
    assert on is compiled and reason


def test_cpu_flags_reads_the_bf16_flags_from_a_cpuinfo_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert devices.cpu_flags(str(path)) == ("Some Xeon", frozenset({"avx512_bf16"}))
    assert devices.cpu_flags(str(tmp_path / "none")) == ("", frozenset())


def test_auto_on_this_machine_logs_what_proc_cpuinfo_implies(tmp_path, corpus):
    with open("/proc/cpuinfo") as f:  # the oracle: the flags line itself
        flags = next(line for line in f if line.startswith("flags")).split()
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    proc = run_train(tmp_path, *TINY, "--dtype", "auto", "--data", corpus, "--steps", 1, "--val-frac", 0)
    if native:
        assert "device cpu, bf16" in proc.stdout
        assert f"precision: bf16 autocast: native bf16 matmuls on this CPU ({', '.join(native)})" in proc.stdout
        assert "training steps on a bf16 copy of the weights" in proc.stdout  # one process, eager
    else:
        assert "device cpu, fp32" in proc.stdout and "precision: fp32: this CPU has no native" in proc.stdout


# ----------------------------------------------------------------------------- fp16 and bf16 runs
# train.py with an inf put into one gradient at optimizer step {at} (1-based; 0: none), as if the
# backward had overflowed: just before GradScaler looks at the gradients
INJECT_INF = """
import runpy, sys
import torch
calls, real = [0], torch.amp.GradScaler.unscale_
def unscale_(self, optimizer):
    calls[0] += 1
    if calls[0] == {at}:
        optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
    return real(self, optimizer)
torch.amp.GradScaler.unscale_ = unscale_
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {root!r})
runpy.run_path({train_py!r}, run_name="__main__")
"""


def run_injected(folder, *args, at=0):
    script = folder / "inject_inf.py"
    script.write_text(INJECT_INF.format(at=at, root=ROOT, train_py=TRAIN_PY))
    return run_cmd(folder, sys.executable, script, *args)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_16_bit_runs_learn_and_resume_from_step_n_bit_for_bit(tmp_path, corpus, dtype):
    """12 steps (fp16: an inf gradient injected at step 3), then steps 7-12 again from step 6's checkpoint."""
    args = [*TINY, "--dtype", dtype, "--data", corpus, "--steps", 12, "--ckpt-interval", 6, "--keep-last", 0]
    full = run_injected(tmp_path, *args, "--save", "full/ckpt.pt", "--metrics", "full/metrics.jsonl",
                        at=3 if dtype == "fp16" else 0)
    assert f"device cpu, {dtype}" in full.stdout
    resumed = run_train(tmp_path, "--steps", 12, "--ckpt", "full/checkpoint_step_6.pt",
                        "--save", "resumed/ckpt.pt", "--metrics", "resumed/metrics.jsonl")
    assert "resuming a" not in resumed.stdout  # the same dtype: no notice
    a, b = losses(tmp_path / "full/metrics.jsonl"), losses(tmp_path / "resumed/metrics.jsonl")
    first, last = a[1], sum(a[s] for s in (10, 11, 12)) / 3
    assert first > 10.5 and last < first - 1.0, a  # it learns
    assert sorted(b) == list(range(7, 13)) and all(b[s] == a[s] for s in b)  # exact float equality
    end_full, end_resumed = load_ckpt(tmp_path / "full/ckpt.pt"), load_ckpt(tmp_path / "resumed/ckpt.pt")
    assert all(torch.equal(end_full["model"][k], end_resumed["model"][k]) for k in end_full["model"])
    assert end_full["scaler"] == end_resumed["scaler"]
    assert end_full["scaler"]["dtype"] == dtype


def test_a_compiled_bf16_run_resumes_compiled_from_step_n_bit_for_bit(tmp_path, corpus):
    """--compile auto's path on a CPU with native bf16 (here forced: --compile on, --dtype bf16), which
    the resumed run takes again from the checkpoint's settings."""
    args = [*TINY, "--dtype", "bf16", "--compile", "--data", corpus, "--steps", 4, "--ckpt-interval", 2,
            "--keep-last", 0, "--val-frac", 0]
    full = run_train(tmp_path, *args, "--save", "full/ckpt.pt", "--metrics", "full/metrics.jsonl")
    assert "device cpu, bf16, compiled" in full.stdout
    resumed = run_train(tmp_path, "--steps", 4, "--ckpt", "full/checkpoint_step_2.pt",
                        "--save", "resumed/ckpt.pt", "--metrics", "resumed/metrics.jsonl")
    assert "device cpu, bf16, compiled" in resumed.stdout
    a, b = losses(tmp_path / "full/metrics.jsonl"), losses(tmp_path / "resumed/metrics.jsonl")
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in b)  # exact float equality
    end_full, end_resumed = load_ckpt(tmp_path / "full/ckpt.pt"), load_ckpt(tmp_path / "resumed/ckpt.pt")
    assert all(torch.equal(end_full["model"][k], end_resumed["model"][k]) for k in end_full["model"])


@pytest.mark.parametrize("compile", ["on", "off"])
def test_cpu_runs_on_two_threads_repeat_bit_for_bit(tmp_path, corpus, compile):
    """Two threads, as a real run has them (the other tests run one thread a process). Compiled,
    Inductor's atomic adds into the embedding gradient would make two runs of the same steps differ."""
    env = {**TRAIN_ENV, "OMP_NUM_THREADS": "2"}
    args = [*TINY, "--dtype", "bf16", "--compile", compile, "--data", corpus, "--steps", 6, "--val-frac", 0,
            "--batch-size", 8, "--seq-len", 64]
    for run in ("a", "b"):
        proc = subprocess.run([sys.executable, TRAIN_PY, *map(str, args), "--save", f"{run}/ckpt.pt", "--metrics",
                               f"{run}/metrics.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
    a, b = losses(tmp_path / "a/metrics.jsonl"), losses(tmp_path / "b/metrics.jsonl")
    assert sorted(a) == list(range(1, 7)) and a == b  # exact float equality
    end_a, end_b = load_ckpt(tmp_path / "a/ckpt.pt"), load_ckpt(tmp_path / "b/ckpt.pt")
    assert all(torch.equal(end_a["model"][k], end_b["model"][k]) for k in end_a["model"])


def test_fp16_overflow_is_a_skipped_step_in_the_log_and_the_scaler_state_is_checkpointed(tmp_path, corpus):
    proc = run_injected(tmp_path, *TINY, "--dtype", "fp16", "--data", corpus, "--steps", 5,
                        "--ckpt-interval", 2, "--keep-last", 0, at=3)
    assert "diverged" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    lines = {int(line.split()[1].split("/")[0]): line for line in proc.stdout.splitlines()
             if line.startswith("step ") and "/" in line.split()[1]}
    assert "| skipped 0 |" in lines[2] and "| skipped 1 |" in lines[3] and "| skipped 1 |" in lines[5]
    assert "grad inf" in lines[3]
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert [records[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert all(r["peak_mem_bytes"] > 2**20 and "mfu" not in r for r in records.values())  # MFU: CUDA only
    assert " GiB | " in lines[5].split("| mem ")[1]
    before, after = load_ckpt(tmp_path / "checkpoint_step_2.pt"), load_ckpt(tmp_path / "checkpoint.pt")
    init = torch.amp.GradScaler("cpu").state_dict()  # the oracle: GradScaler's own defaults
    assert before["scaler"]["state"]["scale"] == init["scale"] == 2.0 ** 16
    assert after["scaler"]["state"]["scale"] == init["scale"] * init["backoff_factor"]  # halved once
    assert after["scaler"]["skipped_steps"] == 1
    assert set(after["scaler"]["state"]) == set(init)


def test_resuming_under_another_dtype_is_allowed_with_a_notice(tmp_path, corpus):
    run_train(tmp_path, *TINY, "--dtype", "fp16", "--data", corpus, "--steps", 2, "--val-frac", 0)
    proc = run_train(tmp_path, "--steps", 3, "--ckpt", "checkpoint.pt", "--dtype", "bf16")
    assert "resuming a fp16 run in bf16: its GradScaler state is dropped" in proc.stdout
    assert load_ckpt(tmp_path / "checkpoint.pt")["scaler"] == {"dtype": "bf16", "skipped_steps": 0, "state": None}


# ----------------------------------------------------------------------------- gradient checkpointing
TINY_CFG = SmolLM2Config(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)


def loss_and_grads(model, idx):
    loss = ChunkedLoss(model)(idx[:, :-1], idx[:, 1:])
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def test_gradient_checkpointing_recomputes_each_layer_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = SmolLM2(TINY_CFG).train()
    idx = torch.randint(0, TINY_CFG.vocab_size, (2, 33))
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    plain_loss, plain = loss_and_grads(model, idx)
    assert len(calls) == 3
    model.gradient_checkpointing = True
    ckpt_loss, ckpt = loss_and_grads(model, idx)
    assert len(calls) == 3 + 6  # each layer ran again in backward
    assert torch.equal(ckpt_loss, plain_loss)
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)
    with torch.no_grad():  # nothing to recompute without gradients
        model(idx)
    assert len(calls) == 12


def test_gradient_checkpointing_cli_with_grad_accum_gives_the_same_losses_and_says_so(tmp_path, corpus):
    args = [*TINY, "--data", corpus, "--steps", 3, "--grad-accum", 2, "--val-frac", 0]
    run_train(tmp_path, *args, "--save", "plain/ckpt.pt", "--metrics", "plain/metrics.jsonl")
    proc = run_train(tmp_path, *args, "--gradient-checkpointing", "--save", "gc/ckpt.pt", "--metrics", "gc/metrics.jsonl")
    assert "device cpu, fp32, gradient checkpointing" in proc.stdout
    assert losses(tmp_path / "gc/metrics.jsonl") == losses(tmp_path / "plain/metrics.jsonl")


def test_gradient_checkpointing_under_ddp_matches_one_process_with_grad_accum(tmp_path, corpus):
    args = [*TINY, "--data", corpus, "--steps", 2, "--val-frac", 0]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  TRAIN_PY, *args, "--gradient-checkpointing", "--save", "ddp/ckpt.pt", "--metrics", "ddp/metrics.jsonl")
    assert "2 processes" in ddp.stdout and "gradient checkpointing" in ddp.stdout
    run_train(tmp_path, *args, "--grad-accum", 2, "--save", "one/ckpt.pt", "--metrics", "one/metrics.jsonl")
    assert losses(tmp_path / "ddp/metrics.jsonl") == pytest.approx(losses(tmp_path / "one/metrics.jsonl"),
                                                                   abs=1e-5, rel=0)


@pytest.mark.slow
def test_gradient_checkpointing_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = SmolLM2(TINY_CFG).train()
    idx = torch.randint(0, TINY_CFG.vocab_size, (2, 33))
    eager_loss, eager = loss_and_grads(model, idx)
    model.gradient_checkpointing = True
    compiled_loss, compiled = loss_and_grads(torch.compile(model), idx)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- chunked loss
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


# ----------------------------------------------------------------------------- presets
HF_CONFIGS = {  # from the config.json files linked beside the presets in model.py
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         rope_theta=130000.0, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("name, total", [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
                                         ("smollm2-1.7b", 1_711_376_384)])
def test_presets_have_the_published_parameter_counts(name, total):
    with torch.device("meta"):
        model = SmolLM2(PRESETS[name])
    assert param_breakdown(model)["total"] == total
    for key, value in HF_CONFIGS.get(name, {}).items():
        assert getattr(PRESETS[name], key) == value, key


PRINT_1_7B = f"""
import runpy, sys
sys.argv = ["model.py", "--model", "smollm2-1.7b"]
runpy.run_path({os.path.join(ROOT, "model.py")!r}, run_name="__main__")
sys.path.insert(0, {ROOT!r})
import devices
print("peak RSS MB", devices.peak_memory("cpu") // 2**20)  # VmHWM: ru_maxrss would count pytest's own
"""


def test_model_py_prints_the_1_7b_breakdown_without_allocating_its_weights():
    out = subprocess.run([sys.executable, "-c", PRINT_1_7B], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1,711,376,384" in out.stdout and "rope_theta': 130000.0" in out.stdout
    assert int(out.stdout.split("peak RSS MB")[-1]) < 2000  # its fp32 weights alone are 6.8 GB


# ----------------------------------------------------------------------------- GPU peak table, memory
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA RTX A1000", None), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("Tesla T4", 65e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_matches_whole_model_names_longest_first(name, peak):
    assert peak_flops(name) == peak


def test_peak_memory_on_cpu_is_the_peak_rss_and_sees_a_freed_block():
    before = devices.peak_memory("cpu")
    block = torch.ones(before // 4 + 2**26)  # the peak so far + 256 MB, written: a new peak
    del block
    after = devices.peak_memory("cpu")
    assert after >= before + 2**28 and after <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- GPU defects, on CPU
def test_should_stop_all_reduces_only_at_the_steps_given_as_sync(monkeypatch):
    import train
    reduced = []
    monkeypatch.setattr(train.dist, "all_reduce", lambda t, op=None: reduced.append(float(t)))
    run = type("FakeRun", (), {"where": type("Where", (), {"world": 2, "device": "cpu"})(), "signal": 15})()
    assert train.Run.should_stop(run, sync=False) is False and reduced == []  # no collective, no host sync
    assert train.Run.should_stop(run, sync=True) is True and reduced == [1.0]


def test_device_cuda_n_in_one_process_calls_set_device(monkeypatch):
    import ddp
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    where = ddp.Dist("cuda:1")
    where.start()
    assert where.device == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]
