"""Training in every precision: fp16 with a GradScaler and bf16 on CPU (train, resume bit for bit,
compiled, overflow as a skipped step, resume under another dtype), what --dtype auto picks on this
machine, and smollm2/precision.py's Precision, the object the loop uses."""
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, TRAIN_ENV, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train
from smollm2.devices import DeviceFacts
from smollm2.precision import Precision


# ----------------------------------------------------------------------------- the Precision class
def one_step(precision, grad):
    """One optimizer step of a one-parameter model whose gradient is `grad`; the parameter after it."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    with precision.autocast:
        loss = (w * torch.tensor(grad)).sum()
    precision.backward(loss)
    precision.unscale(opt)
    norm = torch.nn.utils.clip_grad_norm_([w], 1e9)
    precision.step(opt, norm)
    return w.detach()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_precision_has_a_grad_scaler_for_fp16_only_and_steps_with_the_true_gradient(dtype):
    precision = Precision(DeviceFacts("cpu"), dtype, "cpu")
    assert precision.dtype == dtype and dtype in precision.reason
    assert (precision.scaler is not None) == (dtype == "fp16")
    assert torch.equal(one_step(precision, [1.0, -2.0]), torch.tensor([0.5, 2.0]))  # unscaled before the step
    assert precision.skipped_steps() == 0 and precision.notice is None


def test_an_fp16_overflow_is_a_skipped_step_counted_and_checkpointed_and_not_a_divergence():
    precision = Precision(DeviceFacts("cpu"), "fp16", "cpu")
    init = precision.scaler.get_scale()
    assert torch.equal(one_step(precision, [float("inf"), 1.0]), torch.ones(2))  # skipped: unchanged
    assert precision.skipped_steps() == 1 and precision.scaler.get_scale() == init * 0.5
    assert not precision.diverged(math.inf)  # GradScaler handles it while its scale is >= 1
    state = precision.state_dict()
    assert state["dtype"] == "fp16" and state["skipped_steps"] == 1 and state["state"]["scale"] == init * 0.5
    again = Precision(DeviceFacts("cpu"), "fp16", "cpu")
    again.load_state_dict(state)  # the same dtype: bit for bit, without a notice
    assert again.skipped_steps() == 1 and again.scaler.get_scale() == init * 0.5 and again.notice is None


def test_a_non_finite_loss_is_a_divergence_without_a_grad_scaler():
    precision = Precision(DeviceFacts("cpu"), "bf16", "cpu")
    assert precision.diverged(math.nan) and not precision.diverged(2.5)
    assert precision.state_dict() == {"dtype": "bf16", "skipped_steps": 0, "state": None}


def test_loading_another_dtypes_state_keeps_the_skipped_steps_and_sets_a_notice():
    fp16 = Precision(DeviceFacts("cpu"), "fp16", "cpu")
    bf16 = Precision(DeviceFacts("cpu"), "bf16", "cpu")
    bf16.load_state_dict(fp16.state_dict())
    assert bf16.notice == "resuming a fp16 run in bf16: its GradScaler state is dropped"
    fp16.load_state_dict({"dtype": "fp32", "skipped_steps": 3, "state": None})
    assert fp16.notice == "resuming a fp32 run in fp16; a new GradScaler starts" and fp16.skipped_steps() == 3
    bf16.load_state_dict(None)  # a checkpoint from before precision was saved: nothing to load


# ----------------------------------------------------------------------------- --dtype auto here
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
    resumed = run_train(tmp_path, "--steps", 12, "--ckpt", "full/ckpt_step_6.pt",
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
    resumed = run_train(tmp_path, "--steps", 4, "--ckpt", "full/ckpt_step_2.pt",
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
