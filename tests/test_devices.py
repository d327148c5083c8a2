"""smollm2/devices.py: the device choice (fake availability), the dtype choice (fake device facts),
the compile choice, /proc/cpuinfo, the GPU peak table, a new run's time estimate and peak memory;
--device cuda:N in one process."""
import os
import resource
import time

import pytest
import torch

from smollm2 import devices
from smollm2.devices import DeviceFacts, peak_flops, pick_device, pick_dtype
from smollm2.errors import UsageError


# ----------------------------------------------------------------------------- the device choice
def available(cuda=False, mps=False):
    return {"cuda": cuda, "mps": mps, "cpu": True}  # in available_devices()' order


@pytest.mark.parametrize("cuda, mps, chosen", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                               (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(cuda, mps, chosen):
    assert pick_device("auto", available(cuda, mps)) == chosen


@pytest.mark.parametrize("requested", ["cpu", "cuda", "cuda:1", "mps"])
def test_an_available_device_is_kept_as_asked(requested):
    assert pick_device(requested, available(cuda=True, mps=True)) == requested


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "mps", "tpu"])
def test_an_unavailable_device_is_a_usage_error_naming_it(requested):
    with pytest.raises(UsageError, match=f"--device {requested}: not available here"):
        pick_device(requested, available())


def test_available_devices_lists_cuda_mps_cpu_in_that_order_and_cpu_always():
    found = devices.available_devices()
    assert list(found) == ["cuda", "mps", "cpu"] and found["cpu"] is True
    assert found["cuda"] == torch.cuda.is_available()


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


# ----------------------------------------------------------------------------- /proc/cpuinfo
def test_cpu_flags_reads_the_bf16_flags_from_a_cpuinfo_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert devices.cpu_flags(str(path)) == ("Some Xeon", frozenset({"avx512_bf16"}))
    assert devices.cpu_flags(str(tmp_path / "none")) == ("", frozenset())


def test_cpu_info_reads_the_first_processors_name_vendor_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    first = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512_bf16\n"
    second = "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Other\nflags\t\t: fpu amx_bf16\n"
    path.write_text(first + "\n" + second)
    assert devices.cpu_info(str(path)) == ("AMD EPYC 9R14", "AuthenticAMD", frozenset({"fpu", "avx512_bf16"}))
    assert devices.cpu_info(str(tmp_path / "none")) == ("", "", frozenset())


# ----------------------------------------------------------------------------- GPU peak table, memory
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA RTX A1000", None), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("Tesla T4", 65e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_matches_whole_model_names_longest_first(name, peak):
    assert peak_flops(name) == peak


# ----------------------------------------------------------------------------- a new run's time
def test_time_estimate_is_tokens_times_flops_per_token_over_the_speed_said_roughly():
    # 700 steps of 1,024 tokens of 0.86 GFLOP at 100 GFLOP/s: 6,164 s
    assert devices.time_estimate(700 * 1024, 0.86e9, 100e9) == "about 1.7 h"
    assert devices.time_estimate(100 * 1024, 0.86e9, 100e9) == "about 15 min"  # 881 s
    assert devices.time_estimate(89, 1e9, 1e9) == "about 89 s" and devices.time_estimate(1, 1, 1e9) == "about 1 s"
    assert devices.time_estimate(90 * 60, 1e9, 1e9) == "about 1.5 h"  # 90 min: hours from there


def test_training_speed_is_a_share_of_the_peak_or_a_multiple_of_the_measured_matmul_rate():
    assert devices.training_flops_per_s("bf16", measured=200e9) == pytest.approx(1.7 * 200e9)
    assert devices.training_flops_per_s("fp32", measured=200e9) == pytest.approx(200e9)
    assert devices.training_flops_per_s("bf16", measured=200e9, peak=989e12) == pytest.approx(0.3 * 989e12)
    assert devices.training_flops_per_s("fp32", peak=989e12) == pytest.approx(0.15 * 989e12)  # TF32: half


def test_matmul_flops_measures_in_well_under_a_second_and_leaves_threads_and_rng_as_they_were():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    start = time.perf_counter()
    flops = devices.matmul_flops("cpu", 96, 64)
    assert time.perf_counter() - start < 0.5 and 1e8 < flops < 1e14  # 0.1 GFLOP/s to 100 TFLOP/s
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def test_peak_memory_on_cpu_is_the_peak_rss_and_sees_a_freed_block():
    before = devices.peak_memory("cpu")
    block = torch.ones(before // 4 + 2**26)  # the peak so far + 256 MB, written: a new peak
    del block
    after = devices.peak_memory("cpu")
    assert after >= before + 2**28 and after <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- GPU defects, on CPU
def test_device_cuda_n_in_one_process_calls_set_device(monkeypatch):
    from smollm2.distributed import Process
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    proc = Process("cuda:1")
    proc.start()
    assert proc.device == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]


# ----------------------------------------------------------------------------- GPU decisions, fake facts
@pytest.mark.parametrize("device, tokens, world, checkpointing, accum, sharded, mode", [
    ("cuda", 1024, 1, False, 1, False, "reduce-overhead"),  # train.py's defaults on one GPU: launches dominate
    ("cuda", 8192, 1, False, 1, False, "reduce-overhead"),  # docs/gpu.md's T4 command with --compile on
    ("cuda", 8193, 1, False, 1, False, None),  # large enough to keep the GPU busy
    ("cuda", 1024, 2, False, 1, False, None),  # DDP: graphs split at gradient buckets
    ("cuda", 1024, 1, True, 1, False, None),  # recomputation
    ("cuda", 1024, 1, False, 2, False, None),  # a second backward adds into gradients a replay overwrites
    ("cuda", 8192, 1, False, 8, False, None),
    ("cuda", 1024, 1, False, 1, True, None),  # FSDP on one rank: gathered weights allocated every step
    ("cpu", 1024, 1, False, 1, False, None), ("mps", 1024, 1, False, 1, False, None)])
def test_compile_mode_uses_cuda_graphs_for_small_single_micro_steps_on_one_unsharded_gpu_only(
        device, tokens, world, checkpointing, accum, sharded, mode):
    assert devices.compile_mode(device, tokens, world, checkpointing, accum, sharded) == mode


def test_batch_advice_is_given_on_a_gpu_for_small_steps_only():
    advice = devices.batch_advice("cuda", 1024)
    assert "1,024 tokens a step" in advice and "--batch-size" in advice and "--lr" in advice
    assert devices.batch_advice("cuda", 65536) is None
    assert devices.batch_advice("cpu", 1024) is None and devices.batch_advice("mps", 1024) is None


def test_mfu_counts_every_gpu_but_one_machine_for_cpu_processes():
    assert devices.mfu(1000, 1e9, 1e12, "cuda", 1) == pytest.approx(1.0)
    assert devices.mfu(1000, 1e9, 1e12, "cuda", 4) == pytest.approx(0.25)  # four GPUs' peak
    assert devices.mfu(1000, 1e9, 1e12, "cpu", 2) == pytest.approx(1.0)  # two processes, one CPU
    assert devices.mfu(1000, 1e9, 1e12, "mps", 1) == pytest.approx(1.0)


def test_only_gpus_are_synchronised_before_a_clock_read(monkeypatch):
    assert devices.asynchronous("cuda") and devices.asynchronous("mps") and not devices.asynchronous("cpu")
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    devices.synchronize("cpu")
    assert waited == []
    devices.synchronize("cuda:1")
    devices.synchronize("mps")
    assert waited == [("cuda", torch.device("cuda:1")), ("mps", None)]


def test_deterministic_mode_on_cuda_also_fixes_cublas_and_inductor_follows(monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert not inductor_config.deterministic
        devices.deterministic_mode("cpu")
        assert torch.are_deterministic_algorithms_enabled() and inductor_config.deterministic
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        devices.deterministic_mode("cuda")
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
